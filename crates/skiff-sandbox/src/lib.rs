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

mod cgroup;
mod init;
mod netns;
mod spawn;

pub use cgroup::{CgroupError, CgroupLimits, Cgroups};
pub use init::init_main;
pub use netns::NetNs;
pub use spawn::{Exit, Instance, Sandbox, SandboxError, StartTimings};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the cgroup hierarchies are mounted on this kind of host.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
    /// Image layers, top first. One layer is bind-mounted read-only; several
    /// are stacked with a read-only overlay.
    pub layers: Vec<PathBuf>,
    /// Host directory mounted read-only at [`SandboxConfig::app_path`].
    pub app_dir: PathBuf,
    /// Where the application's files appear inside, e.g. `/app`.
    pub app_path: String,
    /// Size of the private, writable `/tmp`, in bytes.
    pub tmp_size: u64,
    /// The non-root identity the start command runs as.
    pub uid: u32,
    pub gid: u32,
    /// The command, e.g. `["bash", "-c", "python3 app.py"]`.
    pub argv: Vec<String>,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
}
