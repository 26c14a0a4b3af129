//! The helper side: runs in a fresh, single-threaded process, builds the
//! instance and executes its start command. Nothing here returns to the caller.
//!
//! Control socket protocol (fd 3). The platform sends the configuration:
//! its length (4 bytes, little-endian), then its JSON; for a held sandbox
//! it later sends `g`, the go. The helper answers one line per message:
//! `ns` once the namespaces exist, `held` when a held sandbox is built and
//! waits for the go, `exec` right before the start command is executed,
//! `err <text>` when something failed.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::idmap::RootAs;
use crate::plan::{self, Facts, Plan};
use crate::syscalls::Kernel;
use crate::{outbound, Network, SandboxConfig};

/// The control socket's number in the helper.
pub(crate) const CONTROL_FD: i32 = 3;

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
    // Nothing skiff itself inherited (a CI runner's pipes, a socket from
    // whoever started skiff) may reach a build or a service: close every
    // descriptor above the control socket.
    // SAFETY: close_range on descriptors this fresh process does not use.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (CONTROL_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    // The start command must not inherit the control socket: once it has been
    // executed, the platform sees the socket close.
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let code = match helper(&mut control) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(control, "err {}", e.replace('\n', " "));
            SETUP_FAILED
        }
    };
    std::process::exit(code)
}

fn helper(control: &mut UnixStream) -> Res<i32> {
    // The configuration's length (4 bytes, little-endian), then its JSON:
    // the platform's side stays open for a held sandbox's go.
    let reading = || "reading the sandbox configuration".to_string();
    let mut len = [0u8; 4];
    ctx(control.read_exact(&mut len), reading)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONFIG {
        return Err(format!(
            "a sandbox configuration of {len} bytes is too large"
        ));
    }
    let mut buf = vec![0u8; len];
    ctx(control.read_exact(&mut buf), reading)?;
    let config: SandboxConfig = ctx(serde_json::from_slice(&buf), || {
        "parsing the sandbox configuration".into()
    })?;
    // Decided here, once, before pid 1 is forked: pid 1 and the command's
    // process only carry the plan out.
    let plan = plan::plan(&config, &facts(&config))?;

    // Made here, in the host's pid namespace, where /proc/<pid> names the
    // child it needs; pid 1 inherits the namespace's descriptor.
    let root_as = match config.layers_owned_by {
        Some(uid) => Some(RootAs::new(uid)?),
        None => None,
    };
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWNET;
    ctx(unshare(flags), || "creating namespaces".into())?;
    // Before the platform hears `ns` and connects slirp4netns: no packet
    // may leave before the reject routes are in place.
    if let Network::Outbound { blocked, .. } = &config.network {
        outbound::add_reject_routes(blocked)?;
    }
    ctx(control.write_all(b"ns\n"), || "control socket".into())?;

    // SAFETY: this process is single-threaded (a fresh exec of the skiff
    // binary that has started no threads), so fork cannot inherit a lock.
    match ctx(unsafe { fork() }, || "forking the instance's pid 1".into())? {
        ForkResult::Child => {
            let code = match pid1(&plan, root_as.as_ref(), control) {
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
            Ok(wait_for(child))
        }
    }
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
fn facts(config: &SandboxConfig) -> Facts {
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
    }
}
