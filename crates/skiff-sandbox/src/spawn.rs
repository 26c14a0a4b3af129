//! The platform side of a sandbox: start the helper, hand it the
//! configuration, follow it until the start command runs, stop it again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::cgroup::{CgroupError, CgroupLimits, Cgroups};
use crate::init::{CGROUP_FDS_ENV, CONTROL_FD};
use crate::netns::NetNs;
use crate::{outbound, Network, SandboxConfig, INIT_ARG};

/// How long building a sandbox may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an instance could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the sandbox helper {helper}: {source}")]
    Helper { helper: PathBuf, source: io::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Building the sandbox failed before the start command ran.
    #[error("the sandbox could not be set up: {0}")]
    Setup(String),
    #[error("talking to the sandbox helper: {0}")]
    Io(#[from] io::Error),
}

/// Where the time went while an instance was being started.
#[derive(Debug, Clone, Copy)]
pub struct StartTimings {
    /// When `spawn` was called.
    pub requested: Instant,
    /// Namespaces created (helper running, cgroups joined).
    pub namespaces: Duration,
    /// The start command was executed: the sandbox's own start cost.
    pub started: Duration,
}

/// How an instance ended, from the start command's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + signal number, as a shell reports it.
    pub code: i32,
}

impl Exit {
    /// The signal that ended the command, when it was killed by one.
    pub fn signal(self) -> Option<i32> {
        (self.code > 128 && self.code < 128 + 65).then_some(self.code - 128)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal().and_then(|s| Signal::try_from(s).ok()) {
            Some(sig) => write!(f, "exit code {} (killed by {sig})", self.code),
            None => write!(f, "exit code {}", self.code),
        }
    }
}

/// Starts sandboxed instances. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sandbox {
    helper: PathBuf,
    cgroup_root: PathBuf,
}

impl Sandbox {
    /// `helper` is the skiff binary (it is started as `helper __sandbox-init`).
    pub fn new(helper: PathBuf) -> Self {
        Self {
            helper,
            cgroup_root: PathBuf::from(crate::CGROUP_ROOT),
        }
    }

    /// Starts one instance and returns once its command has been executed.
    /// `id` names its cgroups and must be unique on this host.
    pub async fn spawn(
        &self,
        id: &str,
        config: &SandboxConfig,
        limits: CgroupLimits,
    ) -> Result<Instance, SandboxError> {
        self.prepare(id, limits).await?.start(config).await
    }

    /// Does the part of a start that does not depend on the command: the
    /// cgroups and the helper process, already moved into them. Moving a
    /// process into a v1 cgroup waits for an RCU grace period when the host
    /// has been quiet (10-20 ms here); a prepared sandbox has paid that in
    /// advance, so [`Prepared::start`] is a warm start.
    pub async fn prepare(&self, id: &str, limits: CgroupLimits) -> Result<Prepared, SandboxError> {
        let prepared_at = Instant::now();
        let cgroups = Cgroups::create(&self.cgroup_root, id, limits)?;
        // The helper enters the groups itself (see `Cgroups::entry`).
        let entry = match cgroups.entry() {
            Ok(entry) => entry,
            Err(e) => {
                let _ = cgroups.remove(Duration::ZERO);
                return Err(e.into());
            }
        };
        let entry_fds: Vec<i32> = entry
            .tasks
            .iter()
            .chain([&entry.unified])
            .map(|fd| fd.as_raw_fd())
            .collect();
        let entry_list = entry_fds
            .iter()
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let theirs_fd = theirs.as_raw_fd();

        let mut cmd = Command::new(&self.helper);
        // The instance's pid 1 is a fork of the helper: with this name, its
        // /proc/1/cmdline shows no host path.
        cmd.arg0("skiff")
            .arg(INIT_ARG)
            .env(CGROUP_FDS_ENV, entry_list)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe calls (setsid, prctl, dup2, fcntl)
        // between fork and exec; no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                // Own session: Ctrl-C in the user's terminal reaches skiff,
                // which stops instances gracefully, not the instances directly.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // If skiff dies, so does the helper, and with it the instance.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if theirs_fd == CONTROL_FD {
                    if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, CONTROL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The cgroup descriptors stay where they are (64 or above);
                // the helper learns their numbers from its environment.
                for &fd in &entry_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        drop(theirs);
        drop(entry);
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                let _ = cgroups.remove(Duration::ZERO);
                return Err(SandboxError::Helper {
                    helper: self.helper.clone(),
                    source,
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        let instance = Instance {
            id: id.to_string(),
            pid,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            netns: None,
            slirp: None,
            cgroups: Some(cgroups),
            timings: StartTimings {
                requested: prepared_at,
                namespaces: Duration::ZERO,
                started: Duration::ZERO,
            },
        };
        // The helper enters the v1 groups before it reads its
        // configuration, and pid 1 starts in the cgroup2 group: nothing it
        // starts can escape them.
        tracing::debug!(instance = id, took = ?prepared_at.elapsed(), "sandbox prepared");
        Ok(Prepared {
            instance,
            control: ours,
        })
    }
}

/// A sandbox helper waiting in its cgroups for a command (see
/// [`Sandbox::prepare`]). Dropping it kills the helper; [`Prepared::discard`]
/// also removes the cgroups.
#[derive(Debug)]
pub struct Prepared {
    instance: Instance,
    control: std::os::unix::net::UnixStream,
}

impl Prepared {
    /// The id its cgroups are named by.
    pub fn id(&self) -> &str {
        &self.instance.id
    }

    /// Builds the sandbox from `config` and runs its command; returns once
    /// the command has been executed. Timings count from this call.
    pub async fn start(self, config: &SandboxConfig) -> Result<Instance, SandboxError> {
        let Self {
            mut instance,
            control,
        } = self;
        instance.timings.requested = Instant::now();
        let config = SandboxConfig {
            hold: false,
            ..config.clone()
        };
        let outcome = bounded(async {
            let mut control = Control::send(control, &config).await?;
            instance.follow(&mut control, &config, Until::Exec).await
        })
        .await;
        finish(instance, outcome).await
    }

    /// Builds the sandbox from `config` down to the command's identity,
    /// and holds it there: [`Held::start`] then only executes the command.
    pub async fn hold(self, config: &SandboxConfig) -> Result<Held, SandboxError> {
        let Self {
            mut instance,
            control,
        } = self;
        let config = SandboxConfig {
            hold: true,
            ..config.clone()
        };
        let outcome = bounded(async {
            let mut control = Control::send(control, &config).await?;
            instance.follow(&mut control, &config, Until::Held).await?;
            Ok(control)
        })
        .await;
        match outcome {
            Ok(control) => Ok(Held {
                instance: finish(instance, Ok(())).await?,
                control,
                config,
            }),
            Err(e) => {
                let _ = instance.stop(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    /// Kills the waiting helper and removes its cgroups.
    pub async fn discard(mut self) {
        let _ = self.instance.stop(Duration::ZERO).await;
    }
}

/// A running instance: its helper process, namespaces and cgroups.
/// Dropping it kills everything; [`Instance::stop`] does so gracefully.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pid: u32,
    child: Child,
    netns: Option<Arc<NetNs>>,
    /// The user-space NAT of a sandbox with outbound network (builds);
    /// killed when the instance is stopped or dropped.
    slirp: Option<tokio::process::Child>,
    cgroups: Option<Cgroups>,
    /// The command's output; take them to read the logs.
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub timings: StartTimings,
}

/// A sandbox built and held before its command's exec (see
/// [`Prepared::hold`]). Dropping it kills the helper; [`Held::discard`]
/// also removes the cgroups.
#[derive(Debug)]
pub struct Held {
    instance: Instance,
    control: Control,
    config: SandboxConfig,
}

impl Held {
    /// The id its cgroups are named by.
    pub fn id(&self) -> &str {
        &self.instance.id
    }

    /// Executes the command; returns once it has been executed. Timings
    /// count from this call (what was built before is not in them).
    pub async fn start(self) -> Result<Instance, SandboxError> {
        let Self {
            mut instance,
            mut control,
            config,
        } = self;
        instance.timings.requested = Instant::now();
        instance.timings.namespaces = Duration::ZERO;
        let go = async {
            control.write.write_all(b"g").await?;
            control.write.shutdown().await?;
            instance.follow(&mut control, &config, Until::Exec).await
        };
        let outcome = bounded(go).await;
        finish(instance, outcome).await
    }

    /// Whether it can still start: its helper runs, and so do pid 1 and
    /// the held command (a held sandbox can be killed while it waits: the
    /// host's OOM killer, an operator; the helper is not in the cgroup2
    /// group, so it outlives a `cgroup.kill` of it by a moment).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.instance.child.try_wait(), Ok(None))
            && self.instance.cgroups().is_none_or(Cgroups::populated)
    }

    /// Kills the held sandbox and removes its cgroups.
    pub async fn discard(mut self) {
        let _ = self.instance.stop(Duration::ZERO).await;
    }
}

/// The platform's end of a helper's control socket.
#[derive(Debug)]
struct Control {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    error: Option<String>,
    exec_seen: bool,
    /// The helper ended before its `ns` could be followed.
    helper_gone: bool,
}

impl Control {
    /// Sends `config` (its length, with the warm root's descriptor if it
    /// has one, then its JSON); unless the sandbox is to be held, nothing
    /// more will be sent.
    async fn send(
        ours: std::os::unix::net::UnixStream,
        config: &SandboxConfig,
    ) -> Result<Self, SandboxError> {
        debug_assert!(
            config
                .warm_root
                .as_ref()
                .is_none_or(|w| w.layers() == config.layers),
            "a warm root of other layers than the configuration's"
        );
        let json = serde_json::to_vec(config).map_err(io::Error::other)?;
        let len = u32::try_from(json.len())
            .map_err(io::Error::other)?
            .to_le_bytes();
        // Four bytes into a new socket's empty buffer: this never blocks.
        let fds: Vec<RawFd> = config
            .warm_root
            .iter()
            .map(|w| w.fd().as_raw_fd())
            .collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs = if fds.is_empty() { &[][..] } else { &rights[..] };
        let sent = sendmsg::<()>(
            ours.as_raw_fd(),
            &[io::IoSlice::new(&len)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        ours.set_nonblocking(true)?;
        let (read, mut write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        write.write_all(&len[sent..]).await?;
        write.write_all(&json).await?;
        if !config.hold {
            write.shutdown().await?;
        }
        Ok(Self {
            lines: BufReader::new(read).lines(),
            write,
            error: None,
            exec_seen: false,
            helper_gone: false,
        })
    }
}

/// How far to follow the helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// It holds before the exec.
    Held,
    /// The command has been executed (every copy of the socket closed).
    Exec,
}

/// A helper that neither finishes nor fails (a hung mount, a kernel stuck
/// in D state) must not hang the deploy forever.
async fn bounded<T>(
    follow: impl std::future::Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, follow)
        .await
        .unwrap_or_else(|_| {
            Err(SandboxError::Setup(format!(
                "the sandbox was not ready after {}s; the host may be overloaded",
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        })
}

/// The instance, or, when following it failed, the error with the
/// instance stopped.
async fn finish(
    mut instance: Instance,
    outcome: Result<(), SandboxError>,
) -> Result<Instance, SandboxError> {
    match outcome {
        Ok(()) => {
            tracing::debug!(
                instance = instance.id,
                namespaces = ?instance.timings.namespaces,
                started = ?instance.timings.started,
                "sandbox ready"
            );
            Ok(instance)
        }
        Err(e) => {
            let _ = instance.stop(Duration::ZERO).await;
            Err(e)
        }
    }
}

impl Instance {
    /// Reads the helper's messages until `until`.
    async fn follow(
        &mut self,
        control: &mut Control,
        config: &SandboxConfig,
        until: Until,
    ) -> Result<(), SandboxError> {
        while let Some(line) = control.lines.next_line().await? {
            let elapsed = self.timings.requested.elapsed();
            match line.split_once(' ').unwrap_or((line.as_str(), "")) {
                ("ns", _) => {
                    self.netns = match NetNs::of_pid(self.pid) {
                        Ok(ns) => Some(Arc::new(ns)),
                        // A command that ends at once can take the helper
                        // with it before this line is read: the instance
                        // is over, and its exit tells why.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            control.helper_gone = true;
                            None
                        }
                        Err(e) => return Err(e.into()),
                    };
                    self.timings.namespaces = elapsed;
                    if let Network::Outbound { slirp4netns, .. } = &config.network {
                        // The sandbox waits for its interface before it
                        // runs the command; if this fails, it says so.
                        match outbound::start_slirp(slirp4netns, self.pid) {
                            Ok(child) => self.slirp = Some(child),
                            Err(e) => {
                                control.error = Some(format!(
                                    "starting {} for the build's network: {e}",
                                    slirp4netns.display()
                                ))
                            }
                        }
                    }
                }
                ("held", _) if until == Until::Held && control.error.is_none() => {
                    return if self.netns.is_some() {
                        Ok(())
                    } else {
                        Err(SandboxError::Setup(
                            "the sandbox held before its namespaces were seen".into(),
                        ))
                    };
                }
                ("exec", _) => control.exec_seen = true,
                ("err", msg) => control.error = Some(msg.to_string()),
                _ => control.error = Some(format!("unexpected message from the helper: {line:?}")),
            }
        }
        // EOF: every copy of the control socket is closed, which after
        // `exec` means the command is running.
        self.timings.started = self.timings.requested.elapsed();
        match control.error.take() {
            Some(e) => Err(SandboxError::Setup(e)),
            None if until == Until::Exec
                && control.exec_seen
                && (self.netns.is_some() || control.helper_gone) =>
            {
                Ok(())
            }
            None => {
                // The helper died without a word: report what it printed.
                let status = self.child.wait().await?;
                let mut text = String::new();
                if let Some(mut err) = self.stderr.take() {
                    let _ = err.read_to_string(&mut text).await;
                }
                Err(SandboxError::Setup(format!(
                    "the sandbox helper ended ({status}) before starting the command: {}",
                    text.trim()
                )))
            }
        }
    }

    /// The helper's process id on the host.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The instance's network namespace, to reach its port; `None` once stopped.
    pub fn netns(&self) -> Option<Arc<NetNs>> {
        self.netns.clone()
    }

    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Waits for the start command to end. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<Exit> {
        let status = self.child.wait().await?;
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        Ok(Exit { code })
    }

    /// Asks every process to stop (SIGTERM), kills what is left after
    /// `grace`, and removes the cgroups. Nothing of the instance remains.
    pub async fn stop(&mut self, grace: Duration) -> Result<Exit, SandboxError> {
        if let Some(cg) = &self.cgroups {
            // A frozen process cannot act on SIGTERM.
            let _ = cg.freeze(false);
            if !grace.is_zero() {
                for pid in cg.pids() {
                    // Not the helper: its death would kill the instance at once.
                    if pid as u32 != self.pid {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    }
                }
            }
        }
        let exit = match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit?,
            Err(_) => {
                if let Some(cg) = &self.cgroups {
                    let _ = cg.kill();
                }
                let _ = self.child.start_kill();
                self.wait().await?
            }
        };
        if let Some(cg) = self.cgroups.take() {
            // Processes of the instance that outlived pid 1 (none should)
            // are killed; removal waits for the kernel.
            tokio::task::spawn_blocking(move || cg.remove(Duration::from_secs(5)))
                .await
                .map_err(io::Error::other)??;
        }
        self.netns = None;
        if let Some(mut slirp) = self.slirp.take() {
            let _ = slirp.kill().await;
        }
        Ok(exit)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // The safety net when `stop` was not called: kill_on_drop ends the
        // helper, the kernel the rest; the cgroups go once they are empty.
        if let Some(cg) = self.cgroups.take() {
            let _ = cg.kill();
            let _ = self.child.start_kill();
            let _ = cg.remove(Duration::from_secs(1));
        }
    }
}
