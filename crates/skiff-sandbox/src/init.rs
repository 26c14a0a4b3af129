//! The helper side: runs in a fresh, single-threaded process, builds the
//! instance and executes its start command. Nothing here returns to the caller.
//!
//! Control socket protocol (fd 3, one line per message, helper to platform):
//! `ns` once the namespaces exist, `exec` right before the start command is
//! executed, `err <text>` when something failed. The platform sends the
//! configuration as JSON and closes its writing side first.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chdir, execvpe, fork, pivot_root, setgroups, sethostname, setresgid, setresuid, ForkResult,
    Gid, Pid, Uid,
};

use crate::beneath::Tree;
use crate::{outbound, Identity, Network, SandboxConfig};

/// What a build's root keeps: the default set of container engines, enough
/// for apt, dpkg, pip and npm, and nothing that reaches past the sandbox
/// (no SYS_ADMIN, SYS_MODULE, SYS_PTRACE, NET_ADMIN, NET_RAW, SYS_TIME...).
const BUILD_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_AUDIT_WRITE,
];

/// The control socket's number in the helper.
pub(crate) const CONTROL_FD: i32 = 3;

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
    let mut buf = Vec::new();
    ctx(control.read_to_end(&mut buf), || {
        "reading the sandbox configuration".into()
    })?;
    let config: SandboxConfig = ctx(serde_json::from_slice(&buf), || {
        "parsing the sandbox configuration".into()
    })?;

    // Made here, in the host's pid namespace, where /proc/<pid> names the
    // child it needs; pid 1 inherits the namespace's descriptor.
    let root_as = match config.layers_owned_by {
        Some(uid) => Some(crate::idmap::RootAs::new(uid)?),
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
            let code = match pid1(&config, root_as.as_ref(), control) {
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
fn pid1(
    config: &SandboxConfig,
    root_as: Option<&crate::idmap::RootAs>,
    control: &mut UnixStream,
) -> Res<i32> {
    // If the helper dies (the platform was killed), the whole instance goes:
    // pid 1 dying takes every process of its pid namespace with it.
    ctx(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL), || {
        "prctl".into()
    })?;
    build_root(config, root_as)?;
    ctx(sethostname(&config.hostname), || {
        "setting the host name".into()
    })?;
    loopback_up()?;
    if matches!(config.network, Network::Outbound { .. }) {
        outbound::wait_until_configured()?;
    }

    // SAFETY: still single-threaded (see `helper`).
    match ctx(unsafe { fork() }, || "forking the start command".into())? {
        ForkResult::Child => {
            let e = exec_command(config, control);
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

fn mnt(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Res<()> {
    ctx(mount(src, target, fstype, flags, data), || {
        format!(
            "mounting {} on {}",
            src.map_or_else(
                || fstype.unwrap_or("?").to_string(),
                |s| s.display().to_string()
            ),
            target.display()
        )
    })
}

/// Bind-mounts `src` read-only on `target`; `then_at` is the path that
/// leads to the new mount (for a [`Target`], its checked plain path: the
/// descriptor still names what lies beneath the mount).
fn bind_ro(src: &Path, target: &Path, then_at: &Path, extra: MsFlags) -> Res<()> {
    mnt(
        Some(src),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mnt(
        None,
        then_at,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra,
        None,
    )
}

fn build_root(config: &SandboxConfig, root_as: Option<&crate::idmap::RootAs>) -> Res<()> {
    // Nothing mounted from here on may leak back to the host.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let root = &config.mount_point;
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let staged = stage(config, root_as)?;
    let lower = staged.lower.join(":");
    match (config.layers.as_slice(), &staged.writable) {
        ([], _) => return Err("the image has no layers".into()),
        (_, Some((upper, work))) => mnt(
            Some(Path::new("overlay")),
            root,
            Some("overlay"),
            nosuid_nodev,
            Some(&format!("lowerdir={lower},upperdir={upper},workdir={work}")),
        )?,
        ([only], None) => bind_ro(only, root, root, nosuid_nodev)?,
        (_, None) => mnt(
            Some(Path::new("overlay")),
            root,
            Some("overlay"),
            MsFlags::MS_RDONLY | nosuid_nodev,
            Some(&format!("lowerdir={lower}")),
        )?,
    }
    // Mount targets are places in the image, which a build wrote: each is
    // resolved beneath the root with no link on the way and mounted on
    // through its descriptor, so a link in the image can never redirect a
    // mount to a host path.
    let image = ctx(Tree::open(root), || {
        format!("opening the root file system at {}", root.display())
    })?;
    let inside = |p: &str| -> Res<Target> {
        let rel = Path::new(p.trim_start_matches('/'));
        let fd = ctx(image.open_beneath(rel, OFlag::O_PATH), || {
            format!("the image's {p} cannot be mounted on (it must be a real directory or file, not a link)")
        })?;
        Ok(Target {
            path: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            plain: root.join(rel),
            _fd: fd,
        })
    };

    for (bind, source) in config.binds.iter().zip(&staged.bind_sources) {
        let checked = inside(&bind.target)?;
        let target = &checked.path;
        if bind.writable {
            mnt(
                Some(source),
                target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
        } else {
            bind_ro(source, target, &checked.plain, nosuid_nodev)?;
        }
    }

    mnt(
        Some(Path::new("tmpfs")),
        &inside("/tmp")?.path,
        Some("tmpfs"),
        nosuid_nodev,
        Some(&format!("size={},mode=1777", config.tmp_size)),
    )?;

    let proc_target = inside("/proc")?;
    mnt(
        Some(Path::new("proc")),
        &proc_target.path,
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;
    let proc_dir = &proc_target.plain;
    // Defence in depth: the instance is not root, but /proc/sys and friends
    // stay read-only even if that ever changed.
    for p in ["sys", "sysrq-trigger", "irq", "bus"] {
        let path = proc_dir.join(p);
        if path.exists() {
            bind_ro(&path, &path, &path, nosuid_nodev | MsFlags::MS_NOEXEC)?;
        }
    }

    mnt(
        Some(Path::new("sysfs")),
        &inside("/sys")?.path,
        Some("sysfs"),
        MsFlags::MS_RDONLY | nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;

    let dev = inside("/dev")?;
    build_dev(&dev.path, &dev.plain)?;

    ctx(chdir(root), || "entering the root file system".into())?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching
    // it leaves only the image visible. No directory in the image is needed.
    ctx(pivot_root(".", "."), || "pivot_root".into())?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching the host's root".into()
    })?;
    ctx(chdir("/"), || "chdir /".into())?;
    Ok(())
}

/// What the overlay is made of, under short names relative to the staging
/// directory (the working directory while the sandbox is built).
struct Staged {
    lower: Vec<String>,
    /// Upper and work directory.
    writable: Option<(String, String)>,
    /// Per bind, where to mount it from.
    bind_sources: Vec<PathBuf>,
}

/// Gathers the layers (and the read-only files to bind) under short names
/// on a small tmpfs over the mount point, and makes it the working
/// directory. The overlay's options then read `lowerdir=l0:l1`, so the
/// instance's `/proc/self/mountinfo` shows no host path (the state
/// directory, the image cache); the tmpfs ends up beneath the overlay and
/// leaves with the host's old root.
fn stage(config: &SandboxConfig, root_as: Option<&crate::idmap::RootAs>) -> Res<Staged> {
    let root = &config.mount_point;
    mnt(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=16m,mode=700"),
    )?;
    let make = |name: &str| {
        let path = root.join(name);
        ctx(std::fs::create_dir(&path), || {
            format!("creating {}", path.display())
        })?;
        Ok::<_, String>(path)
    };
    let mut lower = Vec::new();
    for (i, layer) in config.layers.iter().enumerate() {
        let name = format!("l{i}");
        match root_as {
            Some(map) => map.bind(layer, &make(&name)?)?,
            None => mnt(Some(layer), &make(&name)?, None, MsFlags::MS_BIND, None)?,
        }
        lower.push(name);
    }
    let writable = match &config.writable {
        None => None,
        Some(w) => {
            let (Some(dir), Some(upper), Some(work)) =
                (w.upper.parent(), w.upper.file_name(), w.work.file_name())
            else {
                return Err("the writable layer has no upper or work directory".into());
            };
            if w.work.parent() != Some(dir) {
                return Err(format!(
                    "the writable layer's upper and work directories must share a parent: {} {}",
                    w.upper.display(),
                    w.work.display()
                ));
            }
            mnt(Some(dir), &make("w")?, None, MsFlags::MS_BIND, None)?;
            let name = |n: &std::ffi::OsStr| format!("w/{}", n.to_string_lossy());
            Some((name(upper), name(work)))
        }
    };
    let mut bind_sources = Vec::new();
    for (i, bind) in config.binds.iter().enumerate() {
        // A read-only file is copied here, so its bind shows no host path.
        let source = if !bind.writable && bind.source.is_file() {
            let name = format!("f{i}");
            ctx(std::fs::copy(&bind.source, root.join(&name)), || {
                format!("copying {}", bind.source.display())
            })?;
            PathBuf::from(name)
        } else {
            bind.source.clone()
        };
        bind_sources.push(source);
    }
    ctx(chdir(root), || "entering the staging directory".into())?;
    Ok(Staged {
        lower,
        writable,
        bind_sources,
    })
}

/// A place in the image to mount on, held open while it is used.
struct Target {
    /// `/proc/self/fd/N`: mounting on it mounts on what the descriptor
    /// holds, whatever the path would resolve to now.
    path: PathBuf,
    /// The same place by name: checked to hold no link when the descriptor
    /// was opened, and nothing else writes the image while the sandbox is
    /// built; after the mount it leads into the new mount.
    plain: PathBuf,
    _fd: OwnedFd,
}

/// A minimal `/dev`: the usual character devices, and a read-only `/dev/shm`
/// (docs/contract.md: shared memory is not supported). The tmpfs is mounted on
/// `target` (the image's checked `/dev`), then filled through `dev`, the
/// path that now leads into it.
fn build_dev(target: &Path, dev: &Path) -> Res<()> {
    mnt(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        ctx(
            mknod(
                &path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(major, minor),
            ),
            || format!("creating /dev/{name}"),
        )?;
        // mknod is subject to the umask; the devices must be usable by anyone.
        ctx(
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)),
            || format!("chmod /dev/{name}"),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(std::os::unix::fs::symlink(target, dev.join(link)), || {
            format!("creating /dev/{link}")
        })?;
    }
    let shm = dev.join("shm");
    ctx(std::fs::create_dir(&shm), || "creating /dev/shm".into())?;
    mnt(
        Some(Path::new("shm")),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=1777"),
    )?;
    mnt(
        None,
        dev,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755"),
    )
}

/// A new network namespace starts with `lo` down; the service and the
/// platform's health checks both need it up.
fn loopback_up() -> Res<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq
    // whose name is a NUL-terminated "lo"; the socket is closed by OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let _guard = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(format!(
                "reading lo flags: {}",
                std::io::Error::last_os_error()
            ));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(format!(
                "bringing lo up: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Drops to the service's identity with no capabilities and runs the command.
/// Returns only on failure, with the reason.
fn exec_command(config: &SandboxConfig, control: &mut UnixStream) -> String {
    match prepare_exec(config) {
        Ok((argv, env, filters)) => {
            let _ = control.write_all(b"exec\n");
            // The filter last: nothing of skiff's own runs under it.
            if let Some(filters) = filters {
                if let Err(e) = filters.install() {
                    return e;
                }
            }
            let e = execvpe(&argv[0], &argv, &env).unwrap_err();
            format!("cannot run {:?}: {e}", config.argv[0])
        }
        Err(e) => e,
    }
}

type ReadyToExec = (Vec<CString>, Vec<CString>, Option<crate::seccomp::Filters>);

fn prepare_exec(config: &SandboxConfig) -> Res<ReadyToExec> {
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let argv = config
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Res<Vec<_>>>()?;
    if argv.is_empty() {
        return Err("empty command".into());
    }
    let env = config
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Res<Vec<_>>>()?;

    // stdin is /dev/null: a service reads requests from its port, not a terminal.
    let null = ctx(File::open("/dev/null"), || "opening /dev/null".into())?;
    ctx(nix::unistd::dup2_stdin(&null), || "stdin".into())?;
    drop(null);

    ctx(chdir(Path::new(&config.cwd)), || {
        format!("chdir {}", config.cwd)
    })?;
    set_limits(config.open_files)?;
    let filters = if config.syscall_filter {
        Some(crate::seccomp::compile()?)
    } else {
        None
    };

    match config.identity {
        Identity::User { uid, gid } => {
            // The bounding set first (needs CAP_SETPCAP, which we lose with setuid).
            ctx(caps::clear(None, caps::CapSet::Bounding), || {
                "dropping capabilities".into()
            })?;
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            ctx(setgroups(&[gid]), || "setgroups".into())?;
            ctx(setresgid(gid, gid, gid), || "setresgid".into())?;
            ctx(setresuid(uid, uid, uid), || "setresuid".into())?;
            // setuid away from 0 cleared effective and permitted; inheritable
            // and ambient are cleared explicitly.
            for set in [caps::CapSet::Inheritable, caps::CapSet::Ambient] {
                ctx(caps::clear(None, set), || "clearing capabilities".into())?;
            }
        }
        Identity::BuildRoot => {
            let keep: caps::CapsHashSet = BUILD_CAPS.iter().copied().collect();
            for cap in caps::all() {
                if !keep.contains(&cap) {
                    ctx(caps::drop(None, caps::CapSet::Bounding, cap), || {
                        format!("dropping {cap}")
                    })?;
                }
            }
            ctx(setgroups(&[Gid::from_raw(0)]), || "setgroups".into())?;
            for set in [
                caps::CapSet::Effective,
                caps::CapSet::Permitted,
                caps::CapSet::Inheritable,
            ] {
                ctx(caps::set(None, set, &keep), || {
                    "setting capabilities".into()
                })?;
            }
            ctx(caps::clear(None, caps::CapSet::Ambient), || {
                "clearing capabilities".into()
            })?;
        }
    }
    ctx(nix::sys::prctl::set_no_new_privs(), || {
        "no_new_privs".into()
    })?;
    Ok((argv, env, filters))
}

/// The resource limits of the command's processes, soft and hard, so that
/// they do not depend on how skiff itself was started. What is per host
/// user (message queues, pending signals) is per service, since each has
/// its own uid; processes are bounded by the instance's cgroup.
const LIMITS: &[(nix::sys::resource::Resource, &str, u64)] = {
    use nix::sys::resource::Resource::*;
    &[
        // No core dumps: they would fill /tmp, and carry the memory along.
        (RLIMIT_CORE, "core dumps", 0),
        (RLIMIT_MEMLOCK, "locked memory", 8 << 20),
        (RLIMIT_MSGQUEUE, "POSIX message queues", 800 << 10),
        // No real-time scheduling, no raised priority.
        (RLIMIT_RTPRIO, "real-time priority", 0),
        (RLIMIT_NICE, "nice ceiling", 0),
    ]
};

/// Sets [`LIMITS`] and `RLIMIT_NOFILE` = `open_files`. Set while still
/// root: raising a hard limit needs CAP_SYS_RESOURCE, which a host may
/// withhold even from root; then the most is skiff's own hard limit.
fn set_limits(open_files: u64) -> Res<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let may_raise = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false);
    let nofile = (Resource::RLIMIT_NOFILE, "open files", open_files);
    for &(resource, what, wanted) in LIMITS.iter().chain([&nofile]) {
        let value = match getrlimit(resource) {
            Ok((_, hard)) if !may_raise => wanted.min(hard),
            _ => wanted,
        };
        ctx(setrlimit(resource, value, value), || {
            format!("setting the limit of {what} to {value}")
        })?;
    }
    Ok(())
}
