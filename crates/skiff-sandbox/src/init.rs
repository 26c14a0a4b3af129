//! The helper side: runs in a fresh, single-threaded process, builds the
//! instance and executes its start command. Nothing here returns to the caller.
//!
//! Control socket protocol (fd 3). The platform sends the configuration:
//! its length (4 bytes, little-endian; with them, as `SCM_RIGHTS`, the
//! descriptor of the image's warm root if it has one), then its JSON; for a held sandbox
//! it later sends `g`, the go. The helper answers one line per message:
//! `ns` once the namespaces exist, `held` when a held sandbox is built and
//! waits for the go, `exec` right before the start command is executed,
//! `err <text>` when something failed.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sched::{unshare, CloneFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::idmap::RootAs;
use crate::plan::{self, Facts, Plan};
use crate::syscalls::Kernel;
use crate::{outbound, Network, SandboxConfig};

/// The control socket's number in the helper.
pub(crate) const CONTROL_FD: i32 = 3;
/// Where the platform says which descriptors the helper inherited for its
/// cgroups (see `Cgroups::entry`): the v1 `tasks` files (memory, pids,
/// cpu), then the cgroup2 directory, as numbers (`64,65,66,67`). Fixed
/// numbers would be placed with dup2 after fork, where they could land on
/// the pipe the standard library reports a failed exec through.
pub(crate) const CGROUP_FDS_ENV: &str = "SKIFF_CGROUP_FDS";
/// The cgroup2 directory's descriptor once the helper has entered the v1
/// groups.
const CGROUP_DIR_FD: i32 = 4;

/// The largest configuration the helper reads.
const MAX_CONFIG: usize = 16 << 20;

/// Exit code of the helper when the sandbox could not be built (the reason
/// went over the control socket).
pub const SETUP_FAILED: i32 = 125;

type Res<T> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> Res<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Entry point of `skiff __sandbox-init`. Must run before any thread exists.
pub fn init_main() -> ! {
    // SAFETY: fd 3 was placed there by `Sandbox::spawn` (dup2 in pre_exec) and
    // nothing else in this fresh process owns it.
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    // Into the instance's v1 groups, by this (only) thread itself: the
    // kernel's path without the global lock. An error is reported once the
    // configuration has been read (the platform is writing it).
    let entered = enter_v1_groups();
    // Nothing skiff itself inherited (a CI runner's pipes, a socket from
    // whoever started skiff) may reach a build or a service: close every
    // descriptor above the cgroup2 directory's.
    // SAFETY: close_range on descriptors this fresh process does not use.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (CGROUP_DIR_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    // SAFETY: fcntl on a descriptor this process owns (or a harmless EBADF).
    unsafe { libc::fcntl(CGROUP_DIR_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // The start command must not inherit the control socket: once it has been
    // executed, the platform sees the socket close.
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let code = match helper(&mut control, entered) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(control, "err {}", e.replace('\n', " "));
            SETUP_FAILED
        }
    };
    std::process::exit(code)
}

fn helper(control: &mut UnixStream, entered: Res<()>) -> Res<i32> {
    // The configuration's length (4 bytes, little-endian), then its JSON:
    // the platform's side stays open for a held sandbox's go.
    let reading = || "reading the sandbox configuration".to_string();
    let mut len = [0u8; 4];
    let (got, warm_root) = ctx(receive_length(&mut len), reading)?;
    ctx(control.read_exact(&mut len[got..]), reading)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONFIG {
        return Err(format!(
            "a sandbox configuration of {len} bytes is too large"
        ));
    }
    let mut buf = vec![0u8; len];
    ctx(control.read_exact(&mut buf), reading)?;
    entered?;
    let config: SandboxConfig = ctx(serde_json::from_slice(&buf), || {
        "parsing the sandbox configuration".into()
    })?;
    // Decided here, once, before pid 1 is forked: pid 1 and the command's
    // process only carry the plan out.
    // From here a plain number: pid 1's step that mounts it takes it over
    // (and closes it); the helper closes its own copy after the fork.
    let warm_root = warm_root.map(IntoRawFd::into_raw_fd);
    let facts = facts(&config, warm_root);
    let plan = plan::plan(&config, &facts)?;

    // Made here, in the host's pid namespace, where /proc/<pid> names the
    // child it needs; pid 1 inherits the namespace's descriptor.
    let root_as = match config.layers_owned_by {
        Some(uid) => Some(RootAs::new(uid)?),
        None => None,
    };
    // The cgroup namespace is pid 1's own, made once it is in its groups
    // (see `pid1_into_cgroup`).
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    ctx(unshare(flags), || "creating namespaces".into())?;
    // Before the platform hears `ns` and connects slirp4netns: no packet
    // may leave before the reject routes are in place.
    if let Network::Outbound { blocked, .. } = &config.network {
        outbound::add_reject_routes(blocked)?;
    }
    ctx(control.write_all(b"ns\n"), || "control socket".into())?;

    match ctx(pid1_into_cgroup(), || "forking the instance's pid 1".into())? {
        ForkResult::Child => {
            let code = match own_cgroup_namespace()
                .and_then(|()| pid1(&plan, root_as.as_ref(), control))
            {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(control, "err {}", e.replace('\n', " "));
                    SETUP_FAILED
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            close_control();
            if let Some(fd) = warm_root {
                // SAFETY: closing this process's copy of a descriptor it owns.
                unsafe { libc::close(fd) };
            }
            // SAFETY: closing a descriptor this process owns.
            unsafe { libc::close(CGROUP_DIR_FD) };
            Ok(wait_for(child))
        }
    }
}

/// Receives the first bytes of the configuration's length into `len`, and
/// the descriptor sent with them (closed on exec: only pid 1 uses it, to
/// mount the root, and no command inherits it).
fn receive_length(len: &mut [u8; 4]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(len)];
    let msg = recvmsg::<()>(
        CONTROL_FD,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor in this
                // process; nothing else owns it. Extra ones are closed.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    if msg.bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((msg.bytes, fd))
}

/// Moves this process (its one thread) into the instance's v1 groups, by
/// writing `0` to each group's `tasks`, and closes those descriptors; puts
/// the cgroup2 directory's at `CGROUP_DIR_FD`.
fn enter_v1_groups() -> Res<()> {
    let fds: Vec<i32> = std::env::var(CGROUP_FDS_ENV)
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .filter(|fd| *fd > CGROUP_DIR_FD)
        .collect();
    // SAFETY: this process is single-threaded: nothing reads the
    // environment meanwhile. Pid 1 and the command need not see it.
    unsafe { std::env::remove_var(CGROUP_FDS_ENV) };
    let [tasks @ .., dir] = fds.as_slice() else {
        return Err("the platform passed no cgroup descriptors".into());
    };
    if tasks.len() != 3 {
        return Err("the platform passed no cgroup descriptors".into());
    }
    let mut failed = None;
    for &fd in tasks {
        // SAFETY: a write of a borrowed buffer to a descriptor the platform
        // passed for this.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if written != 1 && failed.is_none() {
            failed = Some(std::io::Error::last_os_error());
        }
        // SAFETY: closing a descriptor this process owns.
        unsafe { libc::close(fd) };
    }
    // SAFETY: dup3 and close on descriptors this process owns; whatever was
    // inherited at CGROUP_DIR_FD is replaced.
    let moved = unsafe { libc::dup3(*dir, CGROUP_DIR_FD, libc::O_CLOEXEC) };
    let e = std::io::Error::last_os_error();
    // SAFETY: as above.
    unsafe { libc::close(*dir) };
    match failed {
        Some(e) => Err(format!("entering the instance's cgroups: {e}")),
        None if moved < 0 => Err(format!("the instance's cgroup2 directory: {e}")),
        None => Ok(()),
    }
}

/// Forks pid 1 straight into the instance's cgroup2 group (`clone3` with
/// `CLONE_INTO_CGROUP`: no move afterwards, so no global lock). A kernel
/// without it gets a fork and a move by pid 1 itself.
fn pid1_into_cgroup() -> nix::Result<ForkResult> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: CGROUP_DIR_FD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork: this process is
    // single-threaded (a fresh exec of the skiff binary that has started no
    // threads), so the child cannot inherit a lock; `args` outlives the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        0 => {
            // SAFETY: closing a descriptor this process owns.
            unsafe { libc::close(CGROUP_DIR_FD) };
            Ok(ForkResult::Child)
        }
        -1 => match nix::errno::Errno::last() {
            nix::errno::Errno::ENOSYS | nix::errno::Errno::E2BIG | nix::errno::Errno::EINVAL => {
                // SAFETY: as above; single-threaded.
                match unsafe { fork() }? {
                    ForkResult::Child => {
                        let entered = enter_by_move();
                        // SAFETY: closing a descriptor this process owns.
                        unsafe { libc::close(CGROUP_DIR_FD) };
                        entered?;
                        Ok(ForkResult::Child)
                    }
                    parent => Ok(parent),
                }
            }
            e => Err(e),
        },
        pid => Ok(ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        }),
    }
}

/// The fallback: this process moves itself into the cgroup2 group.
fn enter_by_move() -> nix::Result<()> {
    let procs = nix::fcntl::openat(
        // SAFETY: the directory descriptor the platform placed here.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(CGROUP_DIR_FD) },
        "cgroup.procs",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&procs, b"0")?;
    Ok(())
}

/// Pid 1's own cgroup namespace, made in its groups: inside, they are
/// the root, and no path of the host's hierarchy shows.
fn own_cgroup_namespace() -> Res<()> {
    ctx(unshare(CloneFlags::CLONE_NEWCGROUP), || {
        "creating the cgroup namespace".into()
    })
}

/// Closes this process's copy of the control socket without shutting the
/// socket down for the children that still hold it. Callers only leave
/// through `std::process::exit`, so the `UnixStream` is never dropped after.
fn close_control() {
    // SAFETY: closing a descriptor this process owns; see above for why the
    // owning UnixStream is not used again.
    unsafe { libc::close(CONTROL_FD) };
}

/// Waits for `pid` and turns its end into an exit code the way a shell does.
fn wait_for(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return SETUP_FAILED,
        }
    }
}

/// The instance's pid 1: builds the file system, starts the command in a
/// child, reaps orphans and exits with the command's status.
fn pid1(plan: &Plan, root_as: Option<&RootAs>, control: &mut UnixStream) -> Res<i32> {
    plan::run(&plan.pid1, &mut Kernel::new(root_as, None))?;

    // SAFETY: still single-threaded (see `helper`).
    match ctx(unsafe { fork() }, || "forking the start command".into())? {
        ForkResult::Child => {
            // Returns only when something failed: the command replaces
            // this process.
            let e = match plan::run(&plan.command, &mut Kernel::new(None, Some(control))) {
                Ok(()) => "the start command returned".to_string(),
                Err(e) => e,
            };
            let _ = writeln!(control, "err {}", e.replace('\n', " "));
            std::process::exit(127)
        }
        ForkResult::Parent { child } => {
            // Reap everything; leave with the start command's status. Our
            // copy of the control socket must close so the platform sees EOF.
            close_control();
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                        return Ok(128 + sig as i32)
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for the start command: {e}")),
                }
            }
        }
    }
}

/// What the plan needs to know of this process and the host: asked here,
/// in the helper, once.
fn facts(config: &SandboxConfig, warm_root: Option<RawFd>) -> Facts {
    use nix::sys::resource::{getrlimit, Resource};
    let may_raise_limits = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false);
    let hard_limits = plan::LIMITS
        .iter()
        .map(|&(r, _, _)| r)
        .chain([Resource::RLIMIT_NOFILE])
        .filter_map(|r| getrlimit(r).ok().map(|(_, hard)| (r, hard)))
        .collect();
    Facts {
        bind_is_file: config.binds.iter().map(|b| b.source.is_file()).collect(),
        may_raise_limits,
        hard_limits,
        warm_root,
    }
}
