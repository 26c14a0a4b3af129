//! One instance = one sandboxed process tree.
//!
//! The platform calls [`Sandbox::spawn`]; that starts a fresh copy of the skiff
//! binary as a helper (`skiff __sandbox-init`), because forking a
//! multi-threaded tokio process and then mounting and changing identity is not
//! safe. The helper, single-threaded, reads its [`SandboxConfig`] from a
//! control socket, unshares the mount, pid, ipc, uts, network and cgroup
//! namespaces, and forks the instance's pid 1, which builds the read-only root
//! file system, drops every privilege and runs the start command in a child.
//!
//! Everything the sandbox mounts lives in its own mount namespace, so it all
//! disappears with the last process: there is nothing to unmount on the host.
//! Cgroups are the one host-side thing, and [`Cgroups`] removes them.

// The one crate that talks to the kernel: unsafe is allowed here, and only
// here; every block says why it is sound (clippy::undocumented_unsafe_blocks).
#![allow(unsafe_code)]

pub mod beneath;
mod cgroup;
pub mod disk;
mod idmap;
mod init;
mod mountapi;
mod netns;
pub mod outbound;
mod plan;
pub mod seccomp;
mod spawn;
mod syscalls;
mod warm;

pub use cgroup::{CgroupError, CgroupLimits, Cgroups, Freezer};
pub use init::init_main;
pub use netns::{Listeners, NetNs};
pub use spawn::{Exit, Held, Instance, Prepared, Sandbox, SandboxError, StartTimings};
pub use warm::WarmRoot;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Gives the calling process a mount namespace of its own, which receives
/// the host's mounts but shows none of its own to the host: the disks the
/// platform mounts for layers (see [`disk`]) stay out of the host's mount
/// table and are unmounted by the kernel when the process ends, however it
/// ends. Call it before any thread starts (it applies to the calling
/// thread; later threads and children inherit it).
pub fn own_mount_namespace() -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    Ok(())
}

/// Restores the default action of SIGPIPE (the Rust runtime ignores it), so
/// that a command whose output is closed (`skiff logs NAME | head -1`) ends
/// quietly, as `cat` would, instead of failing on a write. Only for the
/// short-lived client commands: the platform must outlive closed pipes.
pub fn end_quietly_on_closed_output() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installs the default disposition, no handler code runs; called
    // before any thread starts.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// How many bytes wait to be read in the pipe (or socket) `fd`: written by
/// the other end, not yet read by this one.
pub fn unread_bytes(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points
    // at a live, aligned c_int; the descriptor is borrowed, so open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Where the cgroup hierarchies are mounted on this kind of host.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn unread_bytes_are_what_the_writer_wrote_and_nobody_read() {
        let (reader, writer) = std::io::pipe().unwrap();
        assert_eq!(super::unread_bytes(reader.as_fd()).unwrap(), 0);
        (&writer).write_all(b"hello\n").unwrap();
        assert_eq!(super::unread_bytes(reader.as_fd()).unwrap(), 6);
    }
}

/// The argument that makes the skiff binary act as the sandbox helper.
pub const INIT_ARG: &str = "__sandbox-init";

/// Everything the helper needs to build one instance. Sent over the control
/// socket, never on the command line, so `[env]` values do not show in `ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// The instance's host name (its uts namespace).
    pub hostname: String,
    /// An empty directory on the host where the root file system is mounted
    /// inside the instance's mount namespace. Many instances can share it.
    pub mount_point: PathBuf,
    /// Image layers, top first. Without `writable`, one layer is
    /// bind-mounted read-only and several are stacked with a read-only
    /// overlay (no upper directory: read-only by construction).
    pub layers: Vec<PathBuf>,
    /// Makes the root writable: writes land in this overlay upper directory
    /// (a build's new layer, or a persistent instance's own layer).
    pub writable: Option<WritableLayer>,
    /// Host paths mounted into the sandbox, e.g. the host's resolv.conf
    /// during a build.
    pub binds: Vec<Bind>,
    /// The working directory inside, e.g. `/app`.
    pub cwd: String,
    /// Size of the private, writable `/tmp`, in bytes.
    pub tmp_size: u64,
    /// Who the command runs as.
    pub identity: Identity,
    /// The sandbox's own network namespace: loopback only, or outbound too.
    pub network: Network,
    /// The command, e.g. `["bash", "-c", "python3 app.py"]`.
    pub argv: Vec<String>,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
    /// Open files per process (`RLIMIT_NOFILE`, soft and hard). Core dumps
    /// are always off.
    pub open_files: u64,
    /// The system-call filter of [`seccomp`]; off only to measure its cost.
    pub syscall_filter: bool,
    /// Persistent mode: the image's layers show what root owns as this
    /// uid (and gid), so that the service, running as it, may change any
    /// file of its writable root, those the build made included.
    pub layers_owned_by: Option<u32>,
    /// Build everything, down to the command's identity, then hold before
    /// the exec until the platform says go (see [`Prepared::hold`]): the
    /// start then costs only the exec.
    #[serde(default)]
    pub hold: bool,
    /// The image's layers already stacked ([`WarmRoot`]), for an instance
    /// without a writable layer: its root is a copy of that mount instead
    /// of an overlay of its own. Sent to the helper as a descriptor.
    #[serde(skip)]
    pub warm_root: Option<std::sync::Arc<WarmRoot>>,
}

/// What a sandbox's network namespace holds. No sandbox shares the host's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// Loopback only (instances: the platform reaches them from inside).
    Loopback,
    /// Loopback and outbound connections through slirp4netns (builds
    /// download packages), except to `blocked`, which get reject routes
    /// the sandbox cannot remove. See [`outbound`].
    Outbound {
        slirp4netns: PathBuf,
        blocked: Vec<outbound::Ipv4Net>,
    },
}

/// An overlay upper and work directory pair on the host (same file system).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WritableLayer {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// A host path mounted at `target` inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub writable: bool,
}

/// The identity of the sandboxed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Identity {
    /// A non-root user with no capabilities at all: every service instance.
    User { uid: u32, gid: u32 },
    /// Root with the capabilities a package manager needs (the default set
    /// of container engines: chown, setuid for apt's sandbox user, ...) and
    /// nothing that could leave the sandbox (no mount, no module loading,
    /// no raw network, no ptrace of the host): builds.
    BuildRoot,
}

/// Puts the calling thread in the batch class (SCHED_BATCH): its wake-ups
/// do not preempt a running thread, so a burst of its work waits for the
/// next tick instead of cutting into the gateway's; yet it keeps its fair
/// share of the CPU under load (unlike SCHED_IDLE or a low nice level),
/// so what it holds, such as a database's write lock, is never held long.
/// For the platform's bulk writers. Best effort, as `idle_priority`.
pub fn batch_priority() {
    // SAFETY: sched_setscheduler on the calling thread (0) with a zeroed
    // parameter, as SCHED_BATCH requires.
    unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

/// Puts the calling thread at idle priority (SCHED_IDLE): it runs only on
/// a CPU nothing else wants. Best effort: a thread left at its priority
/// works the same, only less politely.
pub fn idle_priority() {
    // SAFETY: sched_setscheduler on the calling thread (0) with a zeroed
    // parameter, as SCHED_IDLE requires.
    unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}
