//! The sandbox as a plan: everything the instance's pid 1 and its start
//! command's process do, in order, decided from the [`SandboxConfig`] alone.
//!
//! Deciding is apart from doing: [`plan`] makes no system call (the few
//! facts of the host it depends on come in as [`Facts`]), so what the
//! security model requires of a sandbox — every mount `nosuid,nodev`, the
//! root read-only, only `/tmp` writable, the limits, privileges dropped and
//! the system-call filter installed last before exec — is checked by unit
//! tests without root. [`run`] carries a list of [`Step`]s out through a
//! [`Syscalls`]: the kernel (`syscalls::Kernel`) or a recording double in tests.
//!
//! The plan is made in the helper before it forks pid 1, so pid 1 and the
//! command's process get it ready-made (copy-on-write) and only execute.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::resource::Resource;

use crate::seccomp::Filters;
use crate::syscalls::Syscalls;
use crate::{Identity, Network, SandboxConfig};

type Res<T> = Result<T, String>;

/// What a build's root keeps: the default set of container engines, enough
/// for apt, dpkg, pip and npm, and nothing that reaches past the sandbox
/// (no SYS_ADMIN, SYS_MODULE, SYS_PTRACE, NET_ADMIN, NET_RAW, SYS_TIME...).
pub(crate) const BUILD_CAPS: &[caps::Capability] = &[
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

/// The resource limits of the command's processes besides open files,
/// soft and hard, so that they do not depend on how skiff itself was
/// started. What is per host user (message queues, pending signals) is per
/// service, since each has its own uid; processes are bounded by the
/// instance's cgroup.
pub(crate) const LIMITS: &[(Resource, &str, u64)] = {
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

/// The character devices of the instance's `/dev`: name, major, minor.
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Entries of `/proc` kept read-only (defence in depth: the instance is not
/// root, but they stay read-only even if that ever changed).
const PROC_READ_ONLY: [&str; 4] = ["sys", "sysrq-trigger", "irq", "bus"];

/// What the plan needs to know of the host, gathered by the helper before
/// it forks pid 1 (see `init.rs`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// Per bind of the configuration, whether its source is a regular file
    /// (a read-only file is copied to the staging directory, so that its
    /// mount shows no host path).
    pub bind_is_file: Vec<bool>,
    /// Whether this process may raise a hard limit (CAP_SYS_RESOURCE).
    pub may_raise_limits: bool,
    /// This process's hard limits, where known: without CAP_SYS_RESOURCE a
    /// limit can be set at most to them.
    pub hard_limits: Vec<(Resource, u64)>,
    /// The descriptor of the image's warm root, if the platform sent one
    /// (`SandboxConfig::warm_root`).
    pub warm_root: Option<RawFd>,
}

/// Where a mount goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A path on the host side (the mount point, the staging directory, a
    /// place already checked).
    Host(PathBuf),
    /// A place in the image, which a build wrote: resolved beneath the
    /// root with no link on the way and mounted on through its descriptor,
    /// so a link in the image can never redirect a mount to a host path.
    /// `plain` is the same place by name, for messages and for what follows.
    InImage { rel: PathBuf, plain: PathBuf },
}

impl Target {
    /// The place by name.
    pub fn path(&self) -> &Path {
        match self {
            Target::Host(p) => p,
            Target::InImage { plain, .. } => plain,
        }
    }
}

/// One mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub source: Option<PathBuf>,
    pub target: Target,
    pub fstype: Option<&'static str>,
    pub flags: MsFlags,
    pub data: Option<String>,
    /// Skipped when the target does not exist (a `/proc` entry this kernel
    /// does not have).
    pub if_present: bool,
}

/// One step of a sandbox's construction.
#[derive(Debug)]
pub(crate) enum Step {
    /// If the helper dies (the platform was killed), pid 1 dies, and with
    /// it every process of its pid namespace.
    DieWithParent,
    Mount(Mount),
    /// Bind `source` on `target` as the idmapped layer of a persistent
    /// instance (see `idmap.rs`).
    IdmappedBind {
        source: PathBuf,
        target: PathBuf,
    },
    /// Mounts a copy of the image's warm root (the descriptor the platform
    /// sent, see `SandboxConfig::warm_root`) on `target`, read-only,
    /// without set-user-id programs or device files; then closes it.
    AttachWarmRoot {
        fd: RawFd,
        target: PathBuf,
    },
    CreateDir(PathBuf),
    CopyFile {
        from: PathBuf,
        to: PathBuf,
    },
    Chdir(PathBuf),
    /// Opens the root file system, beneath which [`Target::InImage`]s are
    /// resolved from now on.
    OpenImage(PathBuf),
    /// A character device, usable by anyone (0666, whatever the umask).
    CharDevice {
        path: PathBuf,
        major: u64,
        minor: u64,
    },
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    /// `pivot_root(".", ".")`: stacks the old root under the new one.
    PivotRoot,
    /// Detaches what is mounted on the working directory's path: after
    /// [`Step::PivotRoot`], the host's root.
    DetachOldRoot,
    SetHostname(String),
    LoopbackUp,
    /// Waits for slirp4netns to configure the build's interface.
    WaitForOutbound,
    /// stdin becomes `/dev/null`: a service reads requests from its port,
    /// not a terminal.
    StdinFromDevNull,
    SetRlimit {
        resource: Resource,
        what: &'static str,
        value: u64,
    },
    ClearCaps(caps::CapSet),
    DropBoundingCap(caps::Capability),
    SetCaps(caps::CapSet, caps::CapsHashSet),
    SetGroups(Vec<u32>),
    SetResGid(u32),
    SetResUid(u32),
    NoNewPrivs,
    /// Says everything is built and waits for the platform's go
    /// (`SandboxConfig::hold`).
    Hold,
    /// Tells the platform the command is about to be executed.
    AnnounceExec,
    InstallFilters(Filters),
    Exec {
        argv: Vec<CString>,
        env: Vec<CString>,
        /// The command as configured, for messages.
        program: String,
    },
}

impl Step {
    /// What the step does, as an error message names it; `None` for steps
    /// whose errors say it themselves.
    fn what(&self) -> Option<String> {
        Some(match self {
            Step::DieWithParent => "prctl".into(),
            Step::Mount(m) => format!(
                "mounting {} on {}",
                m.source.as_deref().map_or_else(
                    || m.fstype.unwrap_or("?").to_string(),
                    |s| s.display().to_string()
                ),
                m.target.path().display()
            ),
            Step::IdmappedBind { .. }
            | Step::LoopbackUp
            | Step::WaitForOutbound
            | Step::InstallFilters(_) => return None,
            Step::AttachWarmRoot { target, .. } => {
                format!("mounting the image's root on {}", target.display())
            }
            Step::CreateDir(p) => format!("creating {}", p.display()),
            Step::CopyFile { from, .. } => format!("copying {}", from.display()),
            Step::Chdir(p) => format!("chdir {}", p.display()),
            Step::OpenImage(p) => format!("opening the root file system at {}", p.display()),
            Step::CharDevice { path, .. } | Step::Symlink { link: path, .. } => {
                format!("creating /dev/{}", file_name(path))
            }
            Step::PivotRoot => "pivot_root".into(),
            Step::DetachOldRoot => "detaching the host's root".into(),
            Step::SetHostname(_) => "setting the host name".into(),
            Step::StdinFromDevNull => "stdin from /dev/null".into(),
            Step::SetRlimit { what, value, .. } => {
                format!("setting the limit of {what} to {value}")
            }
            Step::ClearCaps(caps::CapSet::Bounding) => "dropping capabilities".into(),
            Step::ClearCaps(_) => "clearing capabilities".into(),
            Step::DropBoundingCap(cap) => format!("dropping {cap}"),
            Step::SetCaps(..) => "setting capabilities".into(),
            Step::SetGroups(_) => "setgroups".into(),
            Step::SetResGid(_) => "setresgid".into(),
            Step::SetResUid(_) => "setresuid".into(),
            Step::NoNewPrivs => "no_new_privs".into(),
            Step::AnnounceExec | Step::Hold => "control socket".into(),
            Step::Exec { program, .. } => format!("cannot run {program:?}"),
        })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What pid 1 does before it forks the start command, and what the start
/// command's process does up to and including exec.
#[derive(Debug)]
pub(crate) struct Plan {
    pub pid1: Vec<Step>,
    pub command: Vec<Step>,
}

impl Plan {
    /// Every mount, in order.
    #[cfg(test)]
    pub fn mounts(&self) -> impl Iterator<Item = &Mount> {
        self.pid1.iter().filter_map(|s| match s {
            Step::Mount(m) => Some(m),
            _ => None,
        })
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Decides how the sandbox for `config` is built. No system call.
pub(crate) fn plan(config: &SandboxConfig, facts: &Facts) -> Res<Plan> {
    let mut p = Vec::new();
    p.push(Step::DieWithParent);
    build_root(config, facts, &mut p)?;
    p.push(Step::SetHostname(config.hostname.clone()));
    p.push(Step::LoopbackUp);
    if matches!(config.network, Network::Outbound { .. }) {
        p.push(Step::WaitForOutbound);
    }
    Ok(Plan {
        pid1: p,
        command: command(config, facts)?,
    })
}

fn mount(
    p: &mut Vec<Step>,
    source: Option<&Path>,
    target: Target,
    fstype: Option<&'static str>,
    flags: MsFlags,
    data: Option<String>,
) {
    p.push(Step::Mount(Mount {
        source: source.map(Path::to_path_buf),
        target,
        fstype,
        flags,
        data,
        if_present: false,
    }));
}

/// Bind-mounts `src` read-only on `target`; the remount goes through the
/// target's plain path, which leads to the new mount (for a place in the
/// image, the descriptor still names what lies beneath it).
fn bind_ro(p: &mut Vec<Step>, src: &Path, target: Target, extra: MsFlags) {
    let then_at = Target::Host(target.path().to_path_buf());
    mount(
        p,
        Some(src),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    );
    mount(
        p,
        None,
        then_at,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra,
        None,
    );
}

fn build_root(config: &SandboxConfig, facts: &Facts, p: &mut Vec<Step>) -> Res<()> {
    let root = &config.mount_point;
    if config.layers.is_empty() {
        return Err("the image has no layers".into());
    }
    // Nothing mounted from here on may leak back to the host.
    mount(
        p,
        None,
        Target::Host("/".into()),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    );
    // Stacked once for every instance of the image (`WarmRoot`), unless the
    // root is writable (its own upper directory) or one layer (a bind).
    let warm = facts
        .warm_root
        .filter(|_| config.writable.is_none() && config.layers.len() > 1);
    let staged = stage(config, facts, warm.is_none(), p)?;
    let lower = staged.lower.join(":");
    let overlay = Some(Path::new("overlay"));
    let at_root = || Target::Host(root.clone());
    match (config.layers.as_slice(), &staged.writable) {
        _ if warm.is_some() => p.extend(warm.map(|fd| Step::AttachWarmRoot {
            fd,
            target: root.clone(),
        })),
        (_, Some((upper, work))) => mount(
            p,
            overlay,
            at_root(),
            Some("overlay"),
            NOSUID_NODEV,
            Some(format!("lowerdir={lower},upperdir={upper},workdir={work}")),
        ),
        ([only], None) => bind_ro(p, only, at_root(), NOSUID_NODEV),
        (_, None) => mount(
            p,
            overlay,
            at_root(),
            Some("overlay"),
            MsFlags::MS_RDONLY | NOSUID_NODEV,
            Some(format!("lowerdir={lower}")),
        ),
    }
    p.push(Step::OpenImage(root.clone()));
    let inside = |at: &str| {
        let rel = PathBuf::from(at.trim_start_matches('/'));
        Target::InImage {
            plain: root.join(&rel),
            rel,
        }
    };

    for (bind, source) in config.binds.iter().zip(&staged.bind_sources) {
        let target = inside(&bind.target);
        if bind.writable {
            mount(
                p,
                Some(source),
                target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            );
        } else {
            bind_ro(p, source, target, NOSUID_NODEV);
        }
    }

    mount(
        p,
        Some(Path::new("tmpfs")),
        inside("/tmp"),
        Some("tmpfs"),
        NOSUID_NODEV,
        Some(format!("size={},mode=1777", config.tmp_size)),
    );

    let proc_target = inside("/proc");
    let proc_dir = proc_target.path().to_path_buf();
    mount(
        p,
        Some(Path::new("proc")),
        proc_target,
        Some("proc"),
        NOSUID_NODEV | MsFlags::MS_NOEXEC,
        None,
    );
    for entry in PROC_READ_ONLY {
        let path = proc_dir.join(entry);
        let first = p.len();
        bind_ro(
            p,
            &path,
            Target::Host(path.clone()),
            NOSUID_NODEV | MsFlags::MS_NOEXEC,
        );
        for step in &mut p[first..] {
            if let Step::Mount(m) = step {
                m.if_present = true;
            }
        }
    }

    mount(
        p,
        Some(Path::new("sysfs")),
        inside("/sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | NOSUID_NODEV | MsFlags::MS_NOEXEC,
        None,
    );

    build_dev(inside("/dev"), p);

    p.push(Step::Chdir(root.clone()));
    // pivot_root(".", ".") stacks the old root under the new one; detaching
    // it leaves only the image visible. No directory in the image is needed.
    p.push(Step::PivotRoot);
    p.push(Step::DetachOldRoot);
    p.push(Step::Chdir("/".into()));
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
fn stage(
    config: &SandboxConfig,
    facts: &Facts,
    with_layers: bool,
    p: &mut Vec<Step>,
) -> Res<Staged> {
    let root = &config.mount_point;
    mount(
        p,
        Some(Path::new("tmpfs")),
        Target::Host(root.clone()),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=16m,mode=700".into()),
    );
    let mut lower = Vec::new();
    let layers = if with_layers { &config.layers[..] } else { &[] };
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("l{i}");
        let dir = root.join(&name);
        p.push(Step::CreateDir(dir.clone()));
        if config.layers_owned_by.is_some() {
            p.push(Step::IdmappedBind {
                source: layer.clone(),
                target: dir,
            });
        } else {
            mount(
                p,
                Some(layer),
                Target::Host(dir),
                None,
                MsFlags::MS_BIND,
                None,
            );
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
            let staged = root.join("w");
            p.push(Step::CreateDir(staged.clone()));
            mount(
                p,
                Some(dir),
                Target::Host(staged),
                None,
                MsFlags::MS_BIND,
                None,
            );
            let name = |n: &std::ffi::OsStr| format!("w/{}", n.to_string_lossy());
            Some((name(upper), name(work)))
        }
    };
    if facts.bind_is_file.len() != config.binds.len() {
        // A read-only file taken for a directory would be bound from its
        // host path: never guess.
        return Err(format!(
            "the facts name {} binds, the configuration {}",
            facts.bind_is_file.len(),
            config.binds.len()
        ));
    }
    let mut bind_sources = Vec::new();
    for (i, bind) in config.binds.iter().enumerate() {
        // A read-only file is copied here, so its bind shows no host path.
        let is_file = facts.bind_is_file.get(i).copied().unwrap_or(false);
        let source = if !bind.writable && is_file {
            let name = format!("f{i}");
            p.push(Step::CopyFile {
                from: bind.source.clone(),
                to: root.join(&name),
            });
            PathBuf::from(name)
        } else {
            bind.source.clone()
        };
        bind_sources.push(source);
    }
    p.push(Step::Chdir(root.clone()));
    Ok(Staged {
        lower,
        writable,
        bind_sources,
    })
}

/// A minimal `/dev`: the usual character devices, and a read-only `/dev/shm`
/// (docs/contract.md: shared memory is not supported). The tmpfs is mounted
/// on the image's checked `/dev`, then filled through its plain path, which
/// now leads into it.
fn build_dev(target: Target, p: &mut Vec<Step>) {
    let dev = target.path().to_path_buf();
    mount(
        p,
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755".into()),
    );
    for (name, major, minor) in DEVICES {
        p.push(Step::CharDevice {
            path: dev.join(name),
            major,
            minor,
        });
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        p.push(Step::Symlink {
            target: target.into(),
            link: dev.join(link),
        });
    }
    let shm = dev.join("shm");
    p.push(Step::CreateDir(shm.clone()));
    mount(
        p,
        Some(Path::new("shm")),
        Target::Host(shm),
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=1777".into()),
    );
    mount(
        p,
        None,
        Target::Host(dev),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755".into()),
    );
}

/// The start command's process: stdin, working directory, limits, the
/// identity with no privilege, then the filter, last, and exec.
fn command(config: &SandboxConfig, facts: &Facts) -> Res<Vec<Step>> {
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

    let mut p = vec![
        Step::StdinFromDevNull,
        Step::Chdir(PathBuf::from(&config.cwd)),
    ];
    // Set while still root: raising a hard limit needs CAP_SYS_RESOURCE,
    // which a host may withhold even from root; then the most is skiff's
    // own hard limit.
    let nofile = (Resource::RLIMIT_NOFILE, "open files", config.open_files);
    for &(resource, what, wanted) in LIMITS.iter().chain([&nofile]) {
        let hard = facts
            .hard_limits
            .iter()
            .find(|(r, _)| *r == resource)
            .map(|&(_, h)| h);
        let value = match hard {
            Some(hard) if !facts.may_raise_limits => wanted.min(hard),
            _ => wanted,
        };
        p.push(Step::SetRlimit {
            resource,
            what,
            value,
        });
    }

    match config.identity {
        Identity::User { uid, gid } => {
            // The bounding set first (needs CAP_SETPCAP, which we lose with setuid).
            p.push(Step::ClearCaps(caps::CapSet::Bounding));
            p.push(Step::SetGroups(vec![gid]));
            p.push(Step::SetResGid(gid));
            p.push(Step::SetResUid(uid));
            // setuid away from 0 cleared effective and permitted; inheritable
            // and ambient are cleared explicitly.
            p.push(Step::ClearCaps(caps::CapSet::Inheritable));
            p.push(Step::ClearCaps(caps::CapSet::Ambient));
        }
        Identity::BuildRoot => {
            let keep: caps::CapsHashSet = BUILD_CAPS.iter().copied().collect();
            let mut dropped: Vec<_> = caps::all().difference(&keep).copied().collect();
            dropped.sort_by_key(|c| c.index());
            p.extend(dropped.into_iter().map(Step::DropBoundingCap));
            p.push(Step::SetGroups(vec![0]));
            for set in [
                caps::CapSet::Effective,
                caps::CapSet::Permitted,
                caps::CapSet::Inheritable,
            ] {
                p.push(Step::SetCaps(set, keep.clone()));
            }
            p.push(Step::ClearCaps(caps::CapSet::Ambient));
        }
    }
    p.push(Step::NoNewPrivs);
    // A held sandbox waits here: built, with no privilege left, the filter
    // and the exec still to come.
    if config.hold {
        p.push(Step::Hold);
    }
    p.push(Step::AnnounceExec);
    // The filter last: nothing of skiff's own runs under it.
    if config.syscall_filter {
        p.push(Step::InstallFilters(crate::seccomp::compile()?));
    }
    p.push(Step::Exec {
        argv,
        env,
        program: config.argv[0].clone(),
    });
    Ok(p)
}

/// Carries `steps` out, in order, through `sys`; stops at the first that
/// fails and says which. After a real exec nothing returns; a double's
/// exec returns `Ok`.
pub(crate) fn run<S: Syscalls>(steps: &[Step], sys: &mut S) -> Res<()> {
    for step in steps {
        do_step(step, sys)?;
    }
    Ok(())
}

fn do_step<S: Syscalls>(step: &Step, sys: &mut S) -> Res<()> {
    let failed = |e: std::io::Error| match step.what() {
        Some(what) => format!("{what}: {e}"),
        None => e.to_string(),
    };
    match step {
        Step::DieWithParent => sys.set_parent_death_signal(),
        Step::Mount(m) => {
            // Only the host's own paths (fresh /proc entries) may be
            // missing: existence is checked by a path that follows links,
            // never in the image a tenant made.
            if m.if_present {
                if let Target::Host(path) = &m.target {
                    if !sys.exists(path) {
                        return Ok(());
                    }
                }
            }
            // A place in the image is held open until it has been mounted on.
            let (target, _held) = match &m.target {
                Target::Host(path) => (path.clone(), None),
                Target::InImage { rel, .. } => {
                    let (fd_path, held) = sys.resolve_in_image(rel).map_err(|e| {
                        format!(
                            "the image's /{} cannot be mounted on (it must be a real \
                             directory or file, not a link): {e}",
                            rel.display()
                        )
                    })?;
                    (fd_path, Some(held))
                }
            };
            sys.mount(
                m.source.as_deref(),
                &target,
                m.fstype,
                m.flags,
                m.data.as_deref(),
            )
        }
        Step::IdmappedBind { source, target } => sys.bind_idmapped(source, target),
        Step::AttachWarmRoot { fd, target } => sys.attach_warm_root(*fd, target),
        Step::CreateDir(p) => sys.create_dir(p),
        Step::CopyFile { from, to } => sys.copy_file(from, to),
        Step::Chdir(p) => sys.chdir(p),
        Step::OpenImage(p) => sys.open_image(p),
        Step::CharDevice { path, major, minor } => sys
            .mknod_char(path, 0o666, *major, *minor)
            // mknod is subject to the umask; the devices must be usable by anyone.
            .and_then(|()| sys.chmod(path, 0o666)),
        Step::Symlink { target, link } => sys.symlink(target, link),
        Step::PivotRoot => sys.pivot_root_here(),
        Step::DetachOldRoot => sys.detach_here(),
        Step::SetHostname(name) => sys.sethostname(name),
        Step::LoopbackUp => sys.loopback_up(),
        Step::WaitForOutbound => sys.wait_for_outbound(),
        Step::StdinFromDevNull => sys.stdin_from_dev_null(),
        Step::SetRlimit {
            resource, value, ..
        } => sys.setrlimit(*resource, *value),
        Step::ClearCaps(set) => sys.clear_caps(*set),
        Step::DropBoundingCap(cap) => sys.drop_bounding_cap(*cap),
        Step::SetCaps(set, caps) => sys.set_caps(*set, caps),
        Step::SetGroups(gids) => sys.setgroups(gids),
        Step::SetResGid(gid) => sys.setresgid(*gid),
        Step::SetResUid(uid) => sys.setresuid(*uid),
        Step::NoNewPrivs => sys.set_no_new_privs(),
        Step::Hold => sys.hold(),
        Step::AnnounceExec => sys.announce_exec(),
        Step::InstallFilters(filters) => sys.install_filters(filters),
        Step::Exec { argv, env, .. } => sys.execvpe(argv, env),
    }
    .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::recording::{Call, Recorder, HELD_PREFIX};
    use crate::{Bind, WritableLayer};
    use caps::{CapSet, Capability};

    const ROOT: &str = "/mnt/skiff";
    const NOSUID: MsFlags = MsFlags::MS_NOSUID;
    const NODEV: MsFlags = MsFlags::MS_NODEV;
    const NOEXEC: MsFlags = MsFlags::MS_NOEXEC;
    const RDONLY: MsFlags = MsFlags::MS_RDONLY;
    const BIND: MsFlags = MsFlags::MS_BIND;
    const REC: MsFlags = MsFlags::MS_REC;
    const REMOUNT: MsFlags = MsFlags::MS_REMOUNT;

    /// A serverless instance as the runtime configures one: three read-only
    /// layers, the account files bound read-only, loopback only.
    fn serverless() -> SandboxConfig {
        SandboxConfig {
            hostname: "hello".into(),
            mount_point: ROOT.into(),
            layers: vec!["/s/img-b".into(), "/s/src-a".into(), "/c/base".into()],
            writable: None,
            binds: vec![Bind {
                source: "/s/accounts/passwd".into(),
                target: "/etc/passwd".into(),
                writable: false,
            }],
            cwd: "/app".into(),
            tmp_size: 64 << 20,
            identity: Identity::User {
                uid: 1_800_000_001,
                gid: 1_800_000_001,
            },
            network: Network::Loopback,
            argv: vec!["bash".into(), "-c".into(), "python3 app.py".into()],
            env: vec![("PORT".into(), "8080".into())],
            open_files: 65536,
            syscall_filter: true,
            layers_owned_by: None,
            warm_root: None,
            hold: false,
        }
    }

    /// A persistent instance: its own writable layer, idmapped layers.
    fn persistent() -> SandboxConfig {
        SandboxConfig {
            writable: Some(WritableLayer {
                upper: "/s/rw/svc/upper".into(),
                work: "/s/rw/svc/work".into(),
            }),
            layers_owned_by: Some(1_800_000_001),
            ..serverless()
        }
    }

    /// A build: root with a package manager's capabilities, outbound
    /// network, its cache bound writable.
    fn build() -> SandboxConfig {
        SandboxConfig {
            writable: Some(WritableLayer {
                upper: "/s/img-new/disk/upper".into(),
                work: "/s/img-new/disk/work".into(),
            }),
            binds: vec![
                Bind {
                    source: "/s/cache/svc/disk".into(),
                    target: "/.skiff-cache".into(),
                    writable: true,
                },
                Bind {
                    source: "/etc/ssl/certs/ca-certificates.crt".into(),
                    target: "/etc/ssl/certs/ca-certificates.crt".into(),
                    writable: false,
                },
            ],
            identity: Identity::BuildRoot,
            network: Network::Outbound {
                slirp4netns: "/usr/bin/slirp4netns".into(),
                blocked: vec![],
            },
            ..serverless()
        }
    }

    fn facts(config: &SandboxConfig) -> Facts {
        Facts {
            bind_is_file: config
                .binds
                .iter()
                .map(|b| b.source.extension().is_some() || b.source.ends_with("passwd"))
                .collect(),
            may_raise_limits: false,
            hard_limits: vec![(Resource::RLIMIT_NOFILE, 1 << 20)],
            warm_root: None,
        }
    }

    fn planned(config: &SandboxConfig) -> Plan {
        plan(config, &facts(config)).unwrap()
    }

    fn at(p: &str) -> PathBuf {
        Path::new(ROOT).join(p)
    }

    /// (source, target by name, fstype, flags, data) of every mount.
    type Row = (
        Option<String>,
        String,
        Option<&'static str>,
        MsFlags,
        Option<String>,
    );

    fn rows(plan: &Plan) -> Vec<Row> {
        plan.mounts()
            .map(|m| {
                (
                    m.source.as_ref().map(|s| s.display().to_string()),
                    m.target.path().display().to_string(),
                    m.fstype,
                    m.flags,
                    m.data.clone(),
                )
            })
            .collect()
    }

    fn row(
        source: Option<&str>,
        target: &str,
        fstype: Option<&'static str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Row {
        (
            source.map(str::to_string),
            target.to_string(),
            fstype,
            flags,
            data.map(str::to_string),
        )
    }

    /// The mounts an instance sees: those from the root file system's on
    /// (the staging mounts before it end up beneath it).
    fn visible(plan: &Plan) -> Vec<&Mount> {
        let mounts: Vec<&Mount> = plan.mounts().collect();
        let first = mounts
            .iter()
            .position(|m| m.target == Target::Host(ROOT.into()) && m.fstype != Some("tmpfs"))
            .unwrap();
        mounts[first..].to_vec()
    }

    /// What each place ends up as: the flags of the last mount on it (a
    /// bind's remount sets its flags to exactly those given).
    fn final_flags(plan: &Plan) -> Vec<(PathBuf, MsFlags)> {
        let mut out: Vec<(PathBuf, MsFlags)> = Vec::new();
        for m in visible(plan) {
            let path = m.target.path().to_path_buf();
            out.retain(|(p, _)| *p != path);
            out.push((path, m.flags));
        }
        out
    }

    #[test]
    fn a_serverless_instance_mounts_exactly_these() {
        let p = planned(&serverless());
        let ro = RDONLY | NOSUID | NODEV;
        assert_eq!(
            rows(&p),
            vec![
                row(None, "/", None, REC | MsFlags::MS_PRIVATE, None),
                // Staging: the layers under short names.
                row(
                    Some("tmpfs"),
                    ROOT,
                    Some("tmpfs"),
                    NOSUID | NODEV | NOEXEC,
                    Some("size=16m,mode=700")
                ),
                row(Some("/s/img-b"), "/mnt/skiff/l0", None, BIND, None),
                row(Some("/s/src-a"), "/mnt/skiff/l1", None, BIND, None),
                row(Some("/c/base"), "/mnt/skiff/l2", None, BIND, None),
                // The root: a read-only overlay with no upper directory.
                row(
                    Some("overlay"),
                    ROOT,
                    Some("overlay"),
                    ro,
                    Some("lowerdir=l0:l1:l2")
                ),
                // The account file, copied to the staging directory.
                row(Some("f0"), "/mnt/skiff/etc/passwd", None, BIND | REC, None),
                row(
                    None,
                    "/mnt/skiff/etc/passwd",
                    None,
                    BIND | REMOUNT | ro,
                    None
                ),
                row(
                    Some("tmpfs"),
                    "/mnt/skiff/tmp",
                    Some("tmpfs"),
                    NOSUID | NODEV,
                    Some("size=67108864,mode=1777")
                ),
                row(
                    Some("proc"),
                    "/mnt/skiff/proc",
                    Some("proc"),
                    NOSUID | NODEV | NOEXEC,
                    None
                ),
                row(
                    Some("/mnt/skiff/proc/sys"),
                    "/mnt/skiff/proc/sys",
                    None,
                    BIND | REC,
                    None
                ),
                row(
                    None,
                    "/mnt/skiff/proc/sys",
                    None,
                    BIND | REMOUNT | ro | NOEXEC,
                    None
                ),
                row(
                    Some("/mnt/skiff/proc/sysrq-trigger"),
                    "/mnt/skiff/proc/sysrq-trigger",
                    None,
                    BIND | REC,
                    None
                ),
                row(
                    None,
                    "/mnt/skiff/proc/sysrq-trigger",
                    None,
                    BIND | REMOUNT | ro | NOEXEC,
                    None
                ),
                row(
                    Some("/mnt/skiff/proc/irq"),
                    "/mnt/skiff/proc/irq",
                    None,
                    BIND | REC,
                    None
                ),
                row(
                    None,
                    "/mnt/skiff/proc/irq",
                    None,
                    BIND | REMOUNT | ro | NOEXEC,
                    None
                ),
                row(
                    Some("/mnt/skiff/proc/bus"),
                    "/mnt/skiff/proc/bus",
                    None,
                    BIND | REC,
                    None
                ),
                row(
                    None,
                    "/mnt/skiff/proc/bus",
                    None,
                    BIND | REMOUNT | ro | NOEXEC,
                    None
                ),
                row(
                    Some("sysfs"),
                    "/mnt/skiff/sys",
                    Some("sysfs"),
                    ro | NOEXEC,
                    None
                ),
                row(
                    Some("tmpfs"),
                    "/mnt/skiff/dev",
                    Some("tmpfs"),
                    NOSUID | NOEXEC,
                    Some("size=64k,mode=755")
                ),
                row(
                    Some("shm"),
                    "/mnt/skiff/dev/shm",
                    Some("tmpfs"),
                    ro | NOEXEC,
                    Some("size=4k,mode=1777")
                ),
                row(
                    None,
                    "/mnt/skiff/dev",
                    None,
                    REMOUNT | RDONLY | NOSUID | NOEXEC,
                    Some("size=64k,mode=755")
                ),
            ]
        );
    }

    #[test]
    fn a_warm_root_replaces_the_layers_unless_the_root_is_writable_or_one_layer() {
        let warm = |config: &SandboxConfig| {
            let facts = Facts {
                warm_root: Some(7),
                ..facts(config)
            };
            plan(config, &facts).unwrap()
        };
        let p = warm(&serverless());
        let attached: Vec<&Step> = p
            .pid1
            .iter()
            .filter(|s| matches!(s, Step::AttachWarmRoot { .. }))
            .collect();
        assert!(
            matches!(attached[..], [Step::AttachWarmRoot { fd: 7, target }] if target == Path::new(ROOT)),
            "{attached:?}"
        );
        // No layer is bound, no overlay made: the copy is the root, on the
        // staging tmpfs (where the account file is still copied), before
        // the image is opened and everything else mounted in it.
        let mounts = rows(&p);
        assert!(!mounts.iter().any(|r| r.1.contains("/l")), "{mounts:?}");
        assert!(!mounts.iter().any(|r| r.2 == Some("overlay")), "{mounts:?}");
        let at = |f: &dyn Fn(&Step) -> bool| p.pid1.iter().position(f).unwrap();
        let staging = at(&|s| matches!(s, Step::Mount(m) if m.fstype == Some("tmpfs")));
        let root = at(&|s| matches!(s, Step::AttachWarmRoot { .. }));
        let opened = at(&|s| matches!(s, Step::OpenImage(_)));
        assert!(staging < root && root < opened, "{:?}", p.pid1);
        assert_eq!(
            mounts
                .iter()
                .filter(|r| r.0.as_deref() == Some("f0"))
                .count(),
            1
        );
        assert_eq!(mounts.len(), rows_without_layers(&planned(&serverless())));
        // A writable root has its own upper directory; one layer is bound.
        for config in [
            persistent(),
            build(),
            SandboxConfig {
                layers: vec!["/c/base".into()],
                ..serverless()
            },
        ] {
            let p = warm(&config);
            assert!(
                !p.pid1
                    .iter()
                    .any(|s| matches!(s, Step::AttachWarmRoot { .. })),
                "{config:?}"
            );
            assert_eq!(rows(&p), rows(&planned(&config)));
        }
    }

    /// The mounts of a plan but those of its layers (their binds and the
    /// overlay), which a warm root stands in for.
    fn rows_without_layers(p: &Plan) -> usize {
        rows(p)
            .iter()
            .filter(|r| !r.1.starts_with("/mnt/skiff/l") && r.2 != Some("overlay"))
            .count()
    }

    #[test]
    fn every_mount_an_instance_sees_is_nosuid_and_only_tmp_and_proc_stay_writable() {
        for config in [serverless(), persistent(), build()] {
            let p = planned(&config);
            for (path, flags) in final_flags(&p) {
                // A writable bind keeps the flags of what it binds (the
                // build cache: a disk mounted nosuid,nodev).
                let writable_bind = config
                    .binds
                    .iter()
                    .any(|b| b.writable && path == at(&b.target[1..]));
                if !writable_bind {
                    assert!(flags.contains(NOSUID), "{path:?} {flags:?}");
                    // Only /dev holds devices.
                    if path != at("dev") {
                        assert!(flags.contains(NODEV), "{path:?} {flags:?}");
                    }
                }
            }
            let writable: Vec<PathBuf> = final_flags(&p)
                .into_iter()
                .filter(|(_, f)| !f.contains(RDONLY))
                .map(|(p, _)| p)
                .collect();
            let mut expected = vec![at("tmp"), at("proc")];
            // The root is writable only with a writable layer.
            if config.writable.is_some() {
                expected.insert(0, ROOT.into());
            }
            for b in config.binds.iter().filter(|b| b.writable) {
                expected.insert(1, at(&b.target[1..]));
            }
            assert_eq!(writable, expected, "{:?}", config.identity);
        }
    }

    #[test]
    fn one_layer_is_bound_read_only_as_the_root() {
        let config = SandboxConfig {
            layers: vec!["/c/base".into()],
            ..serverless()
        };
        let p = planned(&config);
        let root: Vec<Row> = rows(&p)
            .into_iter()
            .filter(|r| r.1 == ROOT && r.2 != Some("tmpfs"))
            .collect();
        assert_eq!(
            root,
            vec![
                row(Some("/c/base"), ROOT, None, BIND | REC, None),
                row(
                    None,
                    ROOT,
                    None,
                    BIND | REMOUNT | RDONLY | NOSUID | NODEV,
                    None
                ),
            ]
        );
    }

    #[test]
    fn a_persistent_instance_writes_to_its_own_layer_through_idmapped_layers() {
        let p = planned(&persistent());
        let idmapped: Vec<_> = p
            .pid1
            .iter()
            .filter_map(|s| match s {
                Step::IdmappedBind { source, target } => Some((source.clone(), target.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            idmapped,
            vec![
                ("/s/img-b".into(), at("l0")),
                ("/s/src-a".into(), at("l1")),
                ("/c/base".into(), at("l2")),
            ]
        );
        let r = rows(&p);
        // No plain bind of a layer: every one is idmapped.
        assert!(!r.iter().any(|r| r.0.as_deref() == Some("/s/img-b")));
        assert!(r.contains(&row(Some("/s/rw/svc"), "/mnt/skiff/w", None, BIND, None)));
        assert!(r.contains(&row(
            Some("overlay"),
            ROOT,
            Some("overlay"),
            NOSUID | NODEV,
            Some("lowerdir=l0:l1:l2,upperdir=w/upper,workdir=w/work")
        )));
        // No host path in the overlay's options.
        assert!(!r.iter().any(|r| r
            .4
            .as_deref()
            .is_some_and(|d| d.contains("/s/") || d.contains("/c/"))));
    }

    #[test]
    fn a_build_binds_its_cache_writable_and_copies_read_only_files() {
        let p = planned(&build());
        let r = rows(&p);
        assert!(r.contains(&row(
            Some("/s/cache/svc/disk"),
            "/mnt/skiff/.skiff-cache",
            None,
            BIND | REC,
            None
        )));
        assert!(r.contains(&row(
            Some("f1"),
            "/mnt/skiff/etc/ssl/certs/ca-certificates.crt",
            None,
            BIND | REC,
            None
        )));
        let copies: Vec<_> = p
            .pid1
            .iter()
            .filter(|s| matches!(s, Step::CopyFile { .. }))
            .collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        // Mount targets in the image are resolved beneath it, never by path.
        for m in p.mounts() {
            let t = m.target.path();
            if t.starts_with(ROOT) && t != Path::new(ROOT) && m.source.is_some() {
                let staged = ["l0", "l1", "l2", "w"].iter().any(|n| t == at(n));
                let proc_entry = t.starts_with(at("proc")) && t != at("proc");
                let shm = t == at("dev/shm");
                if !(staged || proc_entry || shm) {
                    assert!(matches!(m.target, Target::InImage { .. }), "{m:?}");
                }
            }
        }
    }

    #[test]
    fn a_read_only_directory_is_bound_from_the_host_and_made_read_only() {
        let config = SandboxConfig {
            binds: vec![Bind {
                source: "/s/app".into(),
                target: "/app".into(),
                writable: false,
            }],
            ..serverless()
        };
        let p = plan(
            &config,
            &Facts {
                bind_is_file: vec![false],
                ..facts(&config)
            },
        )
        .unwrap();
        let r = rows(&p);
        assert!(r.contains(&row(
            Some("/s/app"),
            "/mnt/skiff/app",
            None,
            BIND | REC,
            None
        )));
        assert!(r.contains(&row(
            None,
            "/mnt/skiff/app",
            None,
            BIND | REMOUNT | RDONLY | NOSUID | NODEV,
            None
        )));
        assert!(!p.pid1.iter().any(|s| matches!(s, Step::CopyFile { .. })));
    }

    #[test]
    fn tmp_has_the_configured_size() {
        for size in [1u64 << 20, 512 << 20] {
            let p = planned(&SandboxConfig {
                tmp_size: size,
                ..serverless()
            });
            let tmp = p.mounts().find(|m| m.target.path() == at("tmp")).unwrap();
            assert_eq!(tmp.data, Some(format!("size={size},mode=1777")));
            assert_eq!(tmp.flags, NOSUID | NODEV);
        }
    }

    #[test]
    fn dev_holds_the_usual_devices_and_a_read_only_shm() {
        let p = planned(&serverless());
        let devices: Vec<_> = p
            .pid1
            .iter()
            .filter_map(|s| match s {
                Step::CharDevice { path, major, minor } => Some((path.clone(), *major, *minor)),
                _ => None,
            })
            .collect();
        assert_eq!(
            devices,
            vec![
                (at("dev/null"), 1, 3),
                (at("dev/zero"), 1, 5),
                (at("dev/full"), 1, 7),
                (at("dev/random"), 1, 8),
                (at("dev/urandom"), 1, 9),
                (at("dev/tty"), 5, 0),
            ]
        );
        let shm = p
            .mounts()
            .find(|m| m.target.path() == at("dev/shm"))
            .unwrap();
        assert_eq!(shm.flags, RDONLY | NOSUID | NODEV | NOEXEC);
        assert_eq!(shm.data.as_deref(), Some("size=4k,mode=1777"));
        // /dev ends read-only, after it was filled.
        let last_dev = p
            .pid1
            .iter()
            .rposition(|s| matches!(s, Step::Mount(m) if m.target.path() == at("dev")))
            .unwrap();
        let last_fill = p
            .pid1
            .iter()
            .rposition(|s| {
                matches!(
                    s,
                    Step::CharDevice { .. } | Step::Symlink { .. } | Step::CreateDir(_)
                )
            })
            .unwrap();
        assert!(last_fill < last_dev);
        let Step::Mount(m) = &p.pid1[last_dev] else {
            unreachable!()
        };
        assert!(m.flags.contains(REMOUNT | RDONLY));
    }

    fn limits(p: &Plan) -> Vec<(Resource, u64)> {
        p.command
            .iter()
            .filter_map(|s| match s {
                Step::SetRlimit {
                    resource, value, ..
                } => Some((*resource, *value)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn limits_are_as_documented_and_open_files_as_configured() {
        let p = planned(&serverless());
        assert_eq!(
            limits(&p),
            vec![
                (Resource::RLIMIT_CORE, 0),
                (Resource::RLIMIT_MEMLOCK, 8 << 20),
                (Resource::RLIMIT_MSGQUEUE, 800 << 10),
                (Resource::RLIMIT_RTPRIO, 0),
                (Resource::RLIMIT_NICE, 0),
                (Resource::RLIMIT_NOFILE, 65536),
            ]
        );
    }

    #[test]
    fn open_files_are_capped_by_the_hard_limit_unless_it_may_be_raised() {
        let config = SandboxConfig {
            open_files: 100_000,
            ..serverless()
        };
        let nofile = |facts: Facts| {
            let p = plan(&config, &facts).unwrap();
            limits(&p)
                .into_iter()
                .find(|(r, _)| *r == Resource::RLIMIT_NOFILE)
                .unwrap()
                .1
        };
        let capped = Facts {
            bind_is_file: vec![true],
            may_raise_limits: false,
            hard_limits: vec![(Resource::RLIMIT_NOFILE, 4096)],
            warm_root: None,
        };
        assert_eq!(nofile(capped.clone()), 4096);
        assert_eq!(
            nofile(Facts {
                may_raise_limits: true,
                ..capped.clone()
            }),
            100_000
        );
        // A hard limit that is not known does not cap.
        assert_eq!(
            nofile(Facts {
                hard_limits: vec![],
                ..capped
            }),
            100_000
        );
    }

    /// The command's steps by kind, to check their order.
    fn kinds(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .map(|s| match s {
                Step::StdinFromDevNull => "stdin",
                Step::Chdir(_) => "chdir",
                Step::SetRlimit { .. } => "rlimit",
                Step::ClearCaps(CapSet::Bounding) => "clear bounding",
                Step::ClearCaps(_) => "clear caps",
                Step::DropBoundingCap(_) => "drop bounding",
                Step::SetCaps(..) => "set caps",
                Step::SetGroups(_) => "setgroups",
                Step::SetResGid(_) => "setresgid",
                Step::SetResUid(_) => "setresuid",
                Step::NoNewPrivs => "no_new_privs",
                Step::Hold => "hold",
                Step::AnnounceExec => "announce",
                Step::InstallFilters(_) => "seccomp",
                Step::Exec { .. } => "exec",
                other => panic!("unexpected in the command's steps: {other:?}"),
            })
            .collect()
    }

    /// A sandbox built ahead holds after every privilege is gone and
    /// before the filter and the exec; the rest of its plan is the same.
    #[test]
    fn a_held_sandbox_waits_with_no_privilege_before_the_filter() {
        let plain = planned(&serverless());
        let held = planned(&SandboxConfig {
            hold: true,
            ..serverless()
        });
        let mut k = kinds(&held.command);
        k.dedup();
        let at = |name| k.iter().position(|s| *s == name).unwrap();
        assert_eq!(at("hold"), at("no_new_privs") + 1);
        assert_eq!(at("announce"), at("hold") + 1);
        assert!(at("hold") > at("setresuid") && at("hold") < at("seccomp"));
        assert_eq!(held.command.len(), plain.command.len() + 1);
        assert_eq!(format!("{:?}", held.pid1), format!("{:?}", plain.pid1));
        assert!(!kinds(&plain.command).contains(&"hold"));
    }

    #[test]
    fn a_service_drops_every_privilege_then_installs_the_filter_last_before_exec() {
        let p = planned(&serverless());
        let mut k = kinds(&p.command);
        k.dedup();
        assert_eq!(
            k,
            vec![
                "stdin",
                "chdir",
                "rlimit",
                "clear bounding",
                "setgroups",
                "setresgid",
                "setresuid",
                "clear caps",
                "no_new_privs",
                "announce",
                "seccomp",
                "exec",
            ]
        );
        let ids: Vec<_> = p
            .command
            .iter()
            .filter_map(|s| match s {
                Step::SetGroups(g) => Some(format!("groups {g:?}")),
                Step::SetResGid(g) => Some(format!("gid {g}")),
                Step::SetResUid(u) => Some(format!("uid {u}")),
                Step::ClearCaps(set) => Some(format!("clear {set:?}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                "clear Bounding",
                "groups [1800000001]",
                "gid 1800000001",
                "uid 1800000001",
                "clear Inheritable",
                "clear Ambient",
            ]
        );
        let Some(Step::Exec { argv, env, program }) = p.command.last() else {
            panic!("the command does not end with exec")
        };
        let text = |v: &[CString]| -> Vec<String> {
            v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(text(argv), ["bash", "-c", "python3 app.py"]);
        assert_eq!(text(env), ["PORT=8080"]);
        assert_eq!(program, "bash");
        assert_eq!(
            p.command.iter().find_map(|s| match s {
                Step::Chdir(d) => Some(d.clone()),
                _ => None,
            }),
            Some(PathBuf::from("/app"))
        );
    }

    #[test]
    fn without_the_filter_nothing_is_installed() {
        let p = planned(&SandboxConfig {
            syscall_filter: false,
            ..serverless()
        });
        let k = kinds(&p.command);
        assert!(!k.contains(&"seccomp"));
        assert_eq!(k[k.len() - 3..], ["no_new_privs", "announce", "exec"]);
    }

    #[test]
    fn a_build_keeps_a_package_managers_capabilities_and_nothing_that_leaves_the_sandbox() {
        let p = planned(&build());
        let dropped: Vec<Capability> = p
            .command
            .iter()
            .filter_map(|s| match s {
                Step::DropBoundingCap(c) => Some(*c),
                _ => None,
            })
            .collect();
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_NET_RAW,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_MODULE,
            Capability::CAP_SYS_TIME,
            Capability::CAP_SYS_RESOURCE,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_BPF,
        ] {
            assert!(dropped.contains(&cap), "{cap} is kept");
        }
        assert!(BUILD_CAPS.iter().all(|c| !dropped.contains(c)));
        assert_eq!(dropped.len() + BUILD_CAPS.len(), caps::all().len());
        let keep: caps::CapsHashSet = BUILD_CAPS.iter().copied().collect();
        let sets: Vec<_> = p
            .command
            .iter()
            .filter_map(|s| match s {
                Step::SetCaps(set, caps) => {
                    assert_eq!(caps, &keep);
                    Some(format!("{set:?}"))
                }
                _ => None,
            })
            .collect();
        assert_eq!(sets, ["Effective", "Permitted", "Inheritable"]);
        let mut k = kinds(&p.command);
        k.dedup();
        assert_eq!(
            k[3..],
            [
                "drop bounding",
                "setgroups",
                "set caps",
                "clear caps",
                "no_new_privs",
                "announce",
                "seccomp",
                "exec"
            ]
        );
        // Root keeps uid 0: no setresuid.
        assert!(!k.contains(&"setresuid"));
        // It waits for its network after lo is up.
        let n = p.pid1.len();
        assert!(matches!(
            p.pid1[n - 2..],
            [Step::LoopbackUp, Step::WaitForOutbound]
        ));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let refused = |config: SandboxConfig| plan(&config, &facts(&config)).unwrap_err();
        // Facts that do not cover every bind: never guessed at.
        let config = build();
        let mut short = facts(&config);
        short.bind_is_file.pop();
        assert!(plan(&config, &short)
            .unwrap_err()
            .contains("binds, the configuration"));
        assert_eq!(
            refused(SandboxConfig {
                layers: vec![],
                ..serverless()
            }),
            "the image has no layers"
        );
        assert_eq!(
            refused(SandboxConfig {
                argv: vec![],
                ..serverless()
            }),
            "empty command"
        );
        assert!(refused(SandboxConfig {
            argv: vec!["a\0b".into()],
            ..serverless()
        })
        .contains("contains a NUL byte"));
        assert!(refused(SandboxConfig {
            env: vec![("K".into(), "v\0".into())],
            ..serverless()
        })
        .contains("contains a NUL byte"));
        let apart = refused(SandboxConfig {
            writable: Some(WritableLayer {
                upper: "/a/upper".into(),
                work: "/b/work".into(),
            }),
            ..serverless()
        });
        assert!(apart.contains("must share a parent"), "{apart}");
        assert!(refused(SandboxConfig {
            writable: Some(WritableLayer {
                upper: "/".into(),
                work: "/work".into(),
            }),
            ..serverless()
        })
        .contains("no upper or work directory"));
    }

    fn recorded(steps: &[Step], rec: &mut Recorder) -> Result<(), String> {
        run(steps, rec)
    }

    #[test]
    fn pid_1_makes_the_calls_in_the_planned_order() {
        let p = planned(&serverless());
        let mut rec = Recorder {
            // This kernel has no /proc/irq.
            missing: vec![at("proc/irq")],
            ..Recorder::default()
        };
        recorded(&p.pid1, &mut rec).unwrap();
        let c = &rec.calls;
        assert_eq!(c[0], Call::ParentDeathSignal);
        assert!(matches!(&c[1], Call::Mount { target, flags, .. }
            if target == Path::new("/") && flags.contains(MsFlags::MS_PRIVATE)));
        // A place in the image is resolved right before it is mounted on,
        // and mounted on through what was resolved.
        let tmp = c
            .iter()
            .position(|c| *c == Call::ResolveInImage("tmp".into()))
            .unwrap();
        assert!(
            matches!(&c[tmp + 1], Call::Mount { target, fstype: Some(t), .. }
                if target == &Path::new(HELD_PREFIX).join("tmp") && t == "tmpfs")
        );
        let opened = c
            .iter()
            .position(|c| *c == Call::OpenImage(ROOT.into()))
            .unwrap();
        let first_resolve = c
            .iter()
            .position(|c| matches!(c, Call::ResolveInImage(_)))
            .unwrap();
        assert!(opened < first_resolve);
        // The missing /proc entry is asked about and skipped.
        assert!(c.contains(&Call::Exists(at("proc/irq"))));
        assert!(!c
            .iter()
            .any(|c| matches!(c, Call::Mount { target, .. } if target == &at("proc/irq"))));
        assert!(c
            .iter()
            .any(|c| matches!(c, Call::Mount { target, .. } if target == &at("proc/bus"))));
        // Devices: made, then made usable by anyone.
        let null = c
            .iter()
            .position(|c| *c == Call::Mknod(at("dev/null"), 0o666, 1, 3))
            .unwrap();
        assert_eq!(c[null + 1], Call::Chmod(at("dev/null"), 0o666));
        assert_eq!(
            c[c.len() - 6..],
            [
                Call::Chdir(ROOT.into()),
                Call::PivotRoot,
                Call::DetachOldRoot,
                Call::Chdir("/".into()),
                Call::SetHostname("hello".into()),
                Call::LoopbackUp,
            ]
        );
    }

    #[test]
    fn the_command_drops_privileges_then_installs_the_filter_then_execs() {
        let p = planned(&serverless());
        let mut rec = Recorder::default();
        recorded(&p.command, &mut rec).unwrap();
        let n = rec.calls.len();
        assert_eq!(
            rec.calls[n - 10..],
            [
                Call::ClearCaps("Bounding".into()),
                Call::SetGroups(vec![1_800_000_001]),
                Call::SetResGid(1_800_000_001),
                Call::SetResUid(1_800_000_001),
                Call::ClearCaps("Inheritable".into()),
                Call::ClearCaps("Ambient".into()),
                Call::NoNewPrivs,
                Call::AnnounceExec,
                Call::InstallFilters,
                Call::Execvpe(
                    vec!["bash".into(), "-c".into(), "python3 app.py".into()],
                    vec!["PORT=8080".into()],
                ),
            ]
        );
        assert_eq!(rec.calls[0], Call::StdinFromDevNull);
        assert_eq!(rec.calls[1], Call::Chdir("/app".into()));
        assert!(rec
            .calls
            .contains(&Call::SetRlimit(Resource::RLIMIT_NOFILE, 65536)));
        let rlimits = rec
            .calls
            .iter()
            .rposition(|c| matches!(c, Call::SetRlimit(..)))
            .unwrap();
        let uid = rec
            .calls
            .iter()
            .position(|c| matches!(c, Call::SetResUid(_)))
            .unwrap();
        // Limits are set while still root.
        assert!(rlimits < uid);
    }

    #[test]
    fn any_failing_call_stops_the_sandbox_and_says_what_failed() {
        for config in [serverless(), persistent(), build()] {
            let p = planned(&config);
            for steps in [&p.pid1, &p.command] {
                let mut all = Recorder::default();
                recorded(steps, &mut all).unwrap();
                for (i, call) in all.calls.iter().enumerate() {
                    if matches!(call, Call::Exists(_)) {
                        continue;
                    }
                    let mut rec = Recorder {
                        fail: Some(Box::new(move |n, _| n == i)),
                        ..Recorder::default()
                    };
                    let err = recorded(steps, &mut rec).unwrap_err();
                    assert_eq!(rec.calls.len(), i + 1, "went on after {call:?} failed");
                    assert!(
                        err.ends_with("Operation not permitted (os error 1)"),
                        "{call:?}: {err}"
                    );
                    // Named by the step, except where the real call's
                    // error names itself (the double's does not).
                    let says_itself = matches!(
                        call,
                        Call::LoopbackUp
                            | Call::WaitForOutbound
                            | Call::BindIdmapped(..)
                            | Call::InstallFilters
                    );
                    if !says_itself {
                        let (what, _) = err.split_once(": ").unwrap();
                        assert!(what.len() > 4, "{call:?}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn failures_name_the_step() {
        let p = planned(&serverless());
        let fail_on = |pick: fn(&Call) -> bool, steps: &[Step]| {
            let mut rec = Recorder {
                fail: Some(Box::new(move |_, c| pick(c))),
                ..Recorder::default()
            };
            recorded(steps, &mut rec).unwrap_err()
        };
        assert_eq!(
            fail_on(
                |c| matches!(c, Call::Mount { fstype: Some(t), .. } if t == "sysfs"),
                &p.pid1
            ),
            "mounting sysfs on /mnt/skiff/sys: Operation not permitted (os error 1)"
        );
        assert_eq!(
            fail_on(|c| *c == Call::ResolveInImage("tmp".into()), &p.pid1),
            "the image's /tmp cannot be mounted on (it must be a real directory or file, \
             not a link): Operation not permitted (os error 1)"
        );
        assert_eq!(
            fail_on(|c| matches!(c, Call::SetResUid(_)), &p.command),
            "setresuid: Operation not permitted (os error 1)"
        );
        assert_eq!(
            fail_on(
                |c| matches!(c, Call::SetRlimit(Resource::RLIMIT_NOFILE, _)),
                &p.command
            ),
            "setting the limit of open files to 65536: Operation not permitted (os error 1)"
        );
        assert_eq!(
            fail_on(|c| matches!(c, Call::Execvpe(..)), &p.command),
            "cannot run \"bash\": Operation not permitted (os error 1)"
        );
        // The double's EPERM stands for what these steps say themselves.
        assert_eq!(
            fail_on(|c| *c == Call::LoopbackUp, &p.pid1),
            "Operation not permitted (os error 1)"
        );
    }
}
