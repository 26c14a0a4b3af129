//! Starting one instance of a service: sandbox, log capture, health check,
//! and the reasons a start fails, told the way docs/contract.md tells them.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use skiff_core::{diagnose, Phase, Phases, StartReport, Stream};
use skiff_model::ServiceSpec;
use skiff_sandbox::{
    CgroupLimits, Exit, Held, Identity, Instance, NetNs, Network, Prepared, Sandbox, SandboxConfig,
    SandboxError, WritableLayer,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::events::Event;
use crate::health;
use crate::images::base::APP_PATH;
use skiff_store::{LogSender, LogSource};

/// How often the health check polls while an instance starts: every
/// millisecond at first (a refused connection inside a network namespace
/// costs microseconds, and most services listen within tens of ms), then
/// every 5 ms for slow starters. With a listen watch (`watch_listen`), the
/// probes wait for it, and poll only every 2 ms in case it is starved (it
/// runs at idle priority: a busy machine gives it no CPU).
const HEALTH_INTERVAL_FAST: Duration = Duration::from_millis(1);
const HEALTH_INTERVAL: Duration = Duration::from_millis(5);
const HEALTH_INTERVAL_WATCHED: Duration = Duration::from_millis(2);
const FAST_POLLING_FOR: Duration = Duration::from_millis(250);
/// How often the listen watch asks the kernel whether the port is
/// listened on: often at first, then less for slow starters.
const LISTEN_WATCH_FAST: Duration = Duration::from_micros(200);
const LISTEN_WATCH: Duration = Duration::from_millis(2);
/// Lines of output kept per instance for error messages.
const TAIL_LINES: usize = 20;
/// Longest log line kept; longer lines are cut (memory stays bounded).
const MAX_LINE: usize = 16 * 1024;

/// Why a service did not start. Each message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The start command ended before the port answered.
    #[error("{}", early_exit_message(*exit, *port, tail, *oom_limit))]
    EarlyExit {
        exit: Exit,
        port: u16,
        tail: Vec<String>,
        /// The memory limit, when the kernel killed the instance for
        /// going over it.
        oom_limit: Option<u64>,
    },
    /// The port never answered within the start timeout.
    #[error(
        "Port Some({port}) is not being listened to by the service\n{}{}",
        health::describe_listeners(listeners, *port),
        diagnosis(tail)
    )]
    PortNotListening {
        port: u16,
        listeners: Vec<SocketAddr>,
        waited: Duration,
        tail: Vec<String>,
    },
    /// The port took connections but never gave an HTTP answer.
    #[error("{}", no_http_answer_message(*port, tail))]
    NoHttpAnswer { port: u16, tail: Vec<String> },
}

impl StartError {
    /// The service's last lines of output the error quotes: what the
    /// troubleshooter reads (the platform's own words around them are not
    /// for its rules).
    pub fn output(&self) -> &[String] {
        match self {
            Self::EarlyExit { tail, .. }
            | Self::PortNotListening { tail, .. }
            | Self::NoHttpAnswer { tail, .. } => tail,
            Self::Sandbox(_) => &[],
        }
    }
}

/// A command's last lines of output, quoted (nothing when it printed
/// nothing).
pub(crate) fn push_tail(s: &mut String, tail: &[String]) {
    if !tail.is_empty() {
        s.push_str("\nIts last output:");
        for line in tail {
            s.push_str("\n  | ");
            s.push_str(line);
        }
    }
}

fn no_http_answer_message(port: u16, tail: &[String]) -> String {
    let mut s = format!(
        "The service accepted connections on port {port} but closed them without an HTTP \
         answer to the health check (GET /kaithhealth; any HTTP answer counts, a 404 too), \
         so it never became ready."
    );
    push_tail(&mut s, tail);
    s.push_str(&diagnosis(tail));
    s.push_str(
        "\nMake the server answer HTTP on $PORT for any path: a handler that fails on paths \
         it does not know, or a protocol other than HTTP/1 on the port, gets no answer out.",
    );
    s
}

fn early_exit_message(exit: Exit, port: u16, tail: &[String], oom_limit: Option<u64>) -> String {
    let mut s =
        format!("The start command exited ({exit}) before the service listened on port {port}.");
    if let Some(limit) = oom_limit {
        s.push_str(&format!("\n{}", oom_message(limit)));
    }
    if tail.is_empty() {
        s.push_str("\nIt printed nothing.");
    }
    push_tail(&mut s, tail);
    let findings = diagnose::diagnose_lines(tail.iter().map(String::as_str));
    s.push_str(&format_findings(&findings));
    // The general advice only where no finding says more, or where one
    // says something is missing from the image.
    let missing = findings.iter().any(|f| {
        matches!(
            f.kind,
            diagnose::FindingKind::MissingPythonModule
                | diagnose::FindingKind::MissingNodeModule
                | diagnose::FindingKind::CommandNotFound
        )
    });
    if exit.code == 0 && findings.is_empty() {
        s.push_str(
            "\nIt ended with success: the start command must run a server that keeps \
             running (exec it in the foreground; nothing started in the background is \
             waited for).",
        );
    } else if findings.is_empty() || missing {
        s.push_str(
            "\nCheck whether the build command left out dependencies the start command \
             needs, and that the start command runs a server that keeps running.",
        );
    }
    s
}

/// Why an instance was killed, when the kernel killed it for memory.
pub fn oom_message(limit: u64) -> String {
    format!(
        "It ran out of memory: the kernel killed it for using more than its limit of {} \
         (limits.memory in skiff.toml; the part of limits.tmp_size its /tmp did not hold \
         comes on top).",
        skiff_model::format_size(limit)
    )
}

/// Whether the kernel killed a process of `instance` for memory.
pub fn was_oom_killed(instance: &Instance) -> bool {
    instance.cgroups().is_some_and(|c| c.oom_kills() > 0)
}

/// What the diagnosis engine recognises in a failed start's last output,
/// as lines to append to the message (empty when nothing is recognised).
fn diagnosis(tail: &[String]) -> String {
    format_findings(&diagnose::diagnose_lines(tail.iter().map(String::as_str)))
}

/// Findings as error messages show them, one "Diagnosis:" each.
pub(crate) fn format_findings<'a>(
    findings: impl IntoIterator<Item = &'a diagnose::Finding>,
) -> String {
    let mut s = String::new();
    for finding in findings {
        s.push_str("\nDiagnosis: ");
        s.push_str(&finding.to_string().replace('\n', "\n  "));
    }
    s
}

/// The last lines an instance wrote, for error messages; and where each
/// began in its stream, so that what was written after a moment can be
/// told from what was only read after it (`mark`, `since`).
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<TailLines>>);

#[derive(Default)]
struct TailLines {
    /// Each line with its stream and the offset in it where it began.
    lines: VecDeque<(usize, u64, String)>,
    /// Bytes read so far from stdout and stderr.
    read: [u64; 2],
    /// The pipes they are read from, to see what waits in them.
    pipes: [Option<std::os::fd::OwnedFd>; 2],
}

/// A moment in an instance's output: how much of each stream had been
/// written by then (read, or waiting in the pipe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark([u64; 2]);

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Tail {
    fn lock(&self) -> std::sync::MutexGuard<'_, TailLines> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads of `stream` come from `pipe` (a copy of its descriptor).
    fn set_pipe(&self, stream: Stream, pipe: std::os::fd::OwnedFd) {
        self.lock().pipes[stream_index(stream)] = Some(pipe);
    }

    /// A line of `stream` that took `bytes` of it (its newline included).
    fn push_from(&self, stream: Stream, line: String, bytes: u64) {
        let mut t = self.lock();
        let s = stream_index(stream);
        let start = t.read[s];
        t.read[s] += bytes;
        if t.lines.len() == TAIL_LINES {
            t.lines.pop_front();
        }
        t.lines.push_back((s, start, line));
    }

    #[cfg(test)]
    fn push(&self, line: String) {
        let bytes = line.len() as u64 + 1;
        self.push_from(Stream::Stdout, line, bytes);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lock()
            .lines
            .iter()
            .map(|(_, _, l)| l.clone())
            .collect()
    }

    /// Now, in the output: what was read, and what waits in the pipes
    /// (written already, read a moment later).
    pub fn mark(&self) -> Mark {
        let t = self.lock();
        let mut mark = t.read;
        for (s, pipe) in t.pipes.iter().enumerate() {
            if let Some(pipe) = pipe {
                use std::os::fd::AsFd;
                mark[s] += skiff_sandbox::unread_bytes(pipe.as_fd()).unwrap_or(0) as u64;
            }
        }
        Mark(mark)
    }

    /// The lines written after `mark` (those the tail still keeps).
    pub fn since(&self, mark: Mark) -> Vec<String> {
        self.lock()
            .lines
            .iter()
            .filter(|(s, start, _)| *start >= mark.0[*s])
            .map(|(_, _, l)| l.clone())
            .collect()
    }
}

/// An instance that answered its health check.
pub struct Started {
    pub instance: Instance,
    pub netns: Arc<NetNs>,
    pub report: StartReport,
    pub tail: Tail,
    /// The log readers; they end when the instance's output closes.
    pub pumps: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Started")
            .field("id", &self.instance.id)
            .finish()
    }
}

/// What `start` needs from the platform.
pub struct StartContext<'a> {
    pub sandbox: &'a Sandbox,
    /// The service's image, top layer first.
    pub layers: &'a [PathBuf],
    /// Persistent mode: the instance's own writable layer.
    pub writable: Option<WritableLayer>,
    /// The service's own host uid and gid (`crate::users`).
    pub uid: u32,
    /// The account files that name that uid `app`.
    pub accounts: &'a [skiff_sandbox::Bind],
    /// The image's layers already stacked (`skiff_sandbox::WarmRoot`).
    pub warm_root: Option<std::sync::Arc<skiff_sandbox::WarmRoot>>,
    pub mount_point: &'a Path,
    pub log: LogSender,
    pub events: broadcast::Sender<Event>,
}

/// The environment of the start command: the contract's variables and `[env]`.
pub fn environment(spec: &ServiceSpec) -> Vec<(String, String)> {
    let mut extra = Vec::new();
    if spec.mode == skiff_model::Mode::Serverless && !spec.env.contains_key("GUNICORN_CMD_ARGS") {
        // gunicorn's arbiter kills workers whose heartbeat is older than
        // --timeout (30 s), by the wall clock; a frozen instance's workers
        // beat again only when it thaws, and the waking request died with
        // them. --timeout 0 turns that check off (gunicorn's documented
        // value); the gateway's request_timeout still ends long requests.
        // A --timeout in the start command wins over this variable.
        extra.push(("GUNICORN_CMD_ARGS", "--timeout 0"));
    }
    command_environment(spec, &extra, "/tmp")
}

/// An environment for a command of `spec` (start or build): a standard
/// PATH and locale, `extra`, the manifest's `[env]`, then `PORT` and `HOME`
/// last so nothing overrides them (the manifest forbids it anyway).
pub(crate) fn command_environment(
    spec: &ServiceSpec,
    extra: &[(&str, &str)],
    home: &str,
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.push(("PORT".into(), spec.port.to_string()));
    env.push(("HOME".into(), home.into()));
    env
}

/// The cgroup limits of one instance of `spec`.
pub fn cgroup_limits(spec: &ServiceSpec) -> CgroupLimits {
    CgroupLimits {
        // /tmp is a tmpfs, whose files are memory the kernel charges to the
        // instance: the cgroup holds both, so that /tmp fills up with
        // ENOSPC at tmp_size while the processes keep their memory.
        memory_bytes: spec.limits.memory.saturating_add(spec.limits.tmp_size),
        pids: spec.limits.pids,
        cpu: spec.limits.cpu,
    }
}

/// Starts one instance of `spec` in a fresh sandbox and waits until its
/// port answers.
pub async fn start(
    ctx: &StartContext<'_>,
    spec: &ServiceSpec,
    id: &str,
) -> Result<Started, StartError> {
    let t = Instant::now();
    let prepared = ctx.sandbox.prepare(id, cgroup_limits(spec)).await?;
    start_prepared(ctx, spec, prepared, t.elapsed()).await
}

/// The sandbox of one instance of `spec`.
pub fn sandbox_config(ctx: &StartContext<'_>, spec: &ServiceSpec) -> SandboxConfig {
    SandboxConfig {
        hostname: spec.name.to_string(),
        mount_point: ctx.mount_point.to_path_buf(),
        layers: ctx.layers.to_vec(),
        writable: ctx.writable.clone(),
        binds: ctx.accounts.to_vec(),
        cwd: APP_PATH.into(),
        tmp_size: spec.limits.tmp_size,
        identity: Identity::User {
            uid: ctx.uid,
            gid: ctx.uid,
        },
        network: Network::Loopback,
        argv: vec!["bash".into(), "-c".into(), spec.start.clone()],
        env: environment(spec),
        open_files: spec.limits.open_files,
        syscall_filter: true,
        layers_owned_by: ctx.writable.as_ref().map(|_| ctx.uid),
        warm_root: ctx.warm_root.clone(),
        hold: false,
    }
}

/// Starts one instance of `spec` in a sandbox built and held ahead (see
/// `Prepared::hold`): only the exec is left, then the health check.
pub async fn start_held(
    ctx: &StartContext<'_>,
    spec: &ServiceSpec,
    held: Held,
) -> Result<Started, StartError> {
    announce(ctx, spec, held.id());
    let instance = held.start().await?;
    follow_start(ctx, spec, instance, Duration::ZERO).await
}

/// Starts one instance of `spec` in a prepared sandbox (see
/// `Sandbox::prepare`); `prepare_cost` is the part of the sandbox's start
/// that was paid on the critical path before this call.
pub async fn start_prepared(
    ctx: &StartContext<'_>,
    spec: &ServiceSpec,
    prepared: Prepared,
    prepare_cost: Duration,
) -> Result<Started, StartError> {
    announce(ctx, spec, prepared.id());
    let instance = prepared.start(&sandbox_config(ctx, spec)).await?;
    follow_start(ctx, spec, instance, prepare_cost).await
}

fn announce(ctx: &StartContext<'_>, spec: &ServiceSpec, id: &str) {
    let _ = ctx.events.send(Event::Starting {
        service: spec.name.to_string(),
        instance: id.to_string(),
    });
}

/// From the exec of the start command until its port answers: its output
/// captured, the health check, and the reasons a start fails.
async fn follow_start(
    ctx: &StartContext<'_>,
    spec: &ServiceSpec,
    mut instance: Instance,
    prepare_cost: Duration,
) -> Result<Started, StartError> {
    let service = spec.name.to_string();
    let id = instance.id.clone();
    let tail = Tail::default();
    let sink = LogSink {
        service: service.clone(),
        phase: Phase::Run,
        tail: tail.clone(),
        log: ctx.log.clone(),
        instance: Some(id.clone()),
        events: ctx.events.clone(),
    };
    let pumps = sink.pump_output(&mut instance);
    let Some(netns) = instance.netns() else {
        // The command ended before the platform opened the namespace.
        let exit = instance.wait().await.map_err(SandboxError::from)?;
        return Err(early_exit(instance, exit, pumps, &tail, spec).await);
    };
    let started_at = instance.timings.requested + instance.timings.started;
    let deadline = started_at + spec.limits.start_timeout;
    let mut listening_at = None;
    // Since when the service has listened, but not where it must.
    let mut elsewhere_since: Option<Instant> = None;
    let mut elsewhere = Vec::new();
    let mut refused_http = false;
    let mut looked_at = started_at;
    let mut listen_watch = watch_listen(&netns, spec.port, deadline);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let probe =
            health::probe_phases(&netns, spec.port, remaining.min(Duration::from_secs(2))).await;
        listening_at = listening_at.or(probe.connected);
        if probe.answered {
            break;
        }
        // A service that listens on another port (or address) and not on
        // its own will not move: fail after a grace, not after the whole
        // start timeout. Its listeners are read twice a second.
        let now = Instant::now();
        if probe.connected.is_none() && now.duration_since(looked_at) >= LISTENERS_EVERY {
            looked_at = now;
            let mut listeners = health::listening(instance.pid());
            listeners.sort();
            listeners.dedup();
            if listeners.is_empty() || listeners != elsewhere {
                // Nothing yet, or still opening listeners: wait on.
                elsewhere_since = (!listeners.is_empty()).then_some(now);
                elsewhere = listeners;
            }
        }
        let elsewhere_too_long =
            elsewhere_since.is_some_and(|t| now.duration_since(t) >= LISTENING_ELSEWHERE_GRACE);
        refused_http = refused_http || probe.refused_http;
        if now >= deadline && refused_http {
            // The port took connections and closed them without an HTTP
            // answer: say so, not "not listened to".
            let _ = instance.stop(Duration::from_secs(1)).await;
            return Err(StartError::NoHttpAnswer {
                port: spec.port,
                tail: tail.lines(),
            });
        }
        if now >= deadline || elsewhere_too_long {
            let listeners = health::listening(instance.pid());
            let _ = instance.stop(Duration::from_secs(1)).await;
            return Err(StartError::PortNotListening {
                port: spec.port,
                listeners,
                waited: now.duration_since(started_at),
                tail: tail.lines(),
            });
        }
        // Listening but not answering yet: probe at the fast pace.
        if probe.connected.is_some() {
            listen_watch = None;
        }
        let interval = match listen_watch {
            Some(_) => HEALTH_INTERVAL_WATCHED,
            None => poll_interval(started_at.elapsed()),
        };
        let heard = async {
            match listen_watch.as_mut() {
                Some(heard) => {
                    let _ = heard.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = instance.wait() => {
                let exit = exit.map_err(SandboxError::from)?;
                return Err(early_exit(instance, exit, pumps, &tail, spec).await);
            }
            _ = heard => listen_watch = None,
            _ = tokio::time::sleep(
                interval.min(deadline.saturating_duration_since(Instant::now())),
            ) => {}
        }
    }
    let answered_at = Instant::now();
    let since_request = |t: Instant| prepare_cost + t.duration_since(instance.timings.requested);
    let report = StartReport {
        sandbox: prepare_cost + instance.timings.started,
        app: answered_at.duration_since(started_at),
        phases: Phases {
            sandbox_ready: prepare_cost + instance.timings.namespaces,
            process_started: prepare_cost + instance.timings.started,
            port_listening: since_request(listening_at.unwrap_or(answered_at)),
            first_answer: since_request(answered_at),
        },
    };
    Ok(Started {
        instance,
        netns,
        report,
        tail,
        pumps,
    })
}

/// The start command ended before the port answered: the message, with
/// its last lines of output.
async fn early_exit(
    mut instance: Instance,
    exit: Exit,
    pumps: Vec<JoinHandle<()>>,
    tail: &Tail,
    spec: &ServiceSpec,
) -> StartError {
    // The output pipes close with the last process: let the readers finish
    // so the message shows the last lines.
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    let oom_limit = was_oom_killed(&instance).then_some(spec.limits.memory);
    let _ = instance.stop(Duration::ZERO).await;
    StartError::EarlyExit {
        exit,
        port: spec.port,
        tail: tail.lines(),
        oom_limit,
    }
}

/// How often a starting service's listeners are read while its port does
/// not answer.
const LISTENERS_EVERY: Duration = Duration::from_millis(500);
/// How long a service may listen elsewhere, and not on its port, with the
/// same listeners all along, before the start fails: a server that opens a
/// metrics or admin port first and its own port later changes its set of
/// listeners when it does.
const LISTENING_ELSEWHERE_GRACE: Duration = Duration::from_secs(8);

/// Watches, on a thread of its own at idle priority (it must not take the
/// CPU from the service starting on a small machine), for `port` to be
/// listened on in the instance's namespace, asking the kernel (sock_diag)
/// rather than connecting; says so once. None when it cannot watch: the
/// probes then poll at their fast pace alone.
fn watch_listen(
    netns: &NetNs,
    port: u16,
    until: Instant,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    // Many starts at once (a restart with hundreds of services) share the
    // CPU anyway: past a few watches, the probes alone poll at their fast
    // pace, and no thread is made per start.
    static WATCHING: AtomicUsize = AtomicUsize::new(0);
    // Asked once: the standard library reads the cgroup's CPU quota for it.
    static MOST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let most =
        *MOST.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2);
    if WATCHING.fetch_add(1, Ordering::SeqCst) >= most {
        WATCHING.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    struct Watching;
    impl Drop for Watching {
        fn drop(&mut self) {
            WATCHING.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let watching = Watching;
    let mut listeners = netns.listeners().ok()?;
    let (heard, rx) = tokio::sync::oneshot::channel();
    let watch = move || {
        let _watching = watching;
        skiff_sandbox::idle_priority();
        let started = Instant::now();
        while !heard.is_closed() && Instant::now() < until {
            match listeners.listening_on(port) {
                Ok(true) => {
                    let _ = heard.send(());
                    return;
                }
                Ok(false) => {}
                Err(_) => return,
            }
            std::thread::sleep(if started.elapsed() < FAST_POLLING_FOR {
                LISTEN_WATCH_FAST
            } else {
                LISTEN_WATCH
            });
        }
    };
    std::thread::Builder::new()
        .name("skiff-listen".into())
        .spawn(watch)
        .ok()?;
    Some(rx)
}

fn poll_interval(since_start: Duration) -> Duration {
    if since_start < FAST_POLLING_FOR {
        HEALTH_INTERVAL_FAST
    } else {
        HEALTH_INTERVAL
    }
}

/// Where an instance's or a build's output goes: the platform's log store,
/// the last lines for error messages, and the platform's events.
#[derive(Clone)]
pub(crate) struct LogSink {
    pub service: String,
    pub phase: Phase,
    pub tail: Tail,
    pub log: LogSender,
    pub instance: Option<String>,
    pub events: broadcast::Sender<Event>,
}

impl LogSink {
    /// Starts reading the sandbox's stdout and stderr.
    pub fn pump_output(&self, instance: &mut Instance) -> Vec<JoinHandle<()>> {
        let mut pumps = Vec::new();
        use std::os::fd::AsFd;
        if let Some(out) = instance.stdout.take() {
            if let Ok(pipe) = out.as_fd().try_clone_to_owned() {
                self.tail.set_pipe(Stream::Stdout, pipe);
            }
            pumps.push(self.pump(out, Stream::Stdout));
        }
        if let Some(err) = instance.stderr.take() {
            if let Ok(pipe) = err.as_fd().try_clone_to_owned() {
                self.tail.set_pipe(Stream::Stderr, pipe);
            }
            pumps.push(self.pump(err, Stream::Stderr));
        }
        pumps
    }

    fn pump(
        &self,
        reader: impl AsyncRead + Unpin + Send + 'static,
        stream: Stream,
    ) -> JoinHandle<()> {
        let sink = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // At most MAX_LINE bytes at a time: a service that never writes a
                // newline gets its output cut into pieces, not buffered forever.
                match (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\n', '\r']).to_string();
                let at = SystemTime::now();
                let source = match sink.phase {
                    Phase::Build => LogSource::Build,
                    Phase::Run => LogSource::Run,
                };
                sink.log.send(
                    source,
                    Some(stream.as_str()),
                    sink.instance.as_deref(),
                    &line,
                    at,
                );
                sink.tail.push_from(stream, line.clone(), buf.len() as u64);
                let _ = sink.events.send(Event::Log {
                    service: sink.service.clone(),
                    phase: sink.phase,
                    stream,
                    line,
                    at,
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_gives_the_lines_written_since_a_mark() {
        let tail = Tail::default();
        tail.push("a".into());
        let mark = tail.mark();
        assert!(tail.since(mark).is_empty());
        tail.push("b".into());
        tail.push("c".into());
        assert_eq!(tail.since(mark), vec!["b", "c"]);
        // Past what the tail keeps: the newest it has.
        for i in 0..TAIL_LINES + 5 {
            tail.push(i.to_string());
        }
        let kept = tail.since(mark);
        assert_eq!(kept.len(), TAIL_LINES);
        assert_eq!(kept.last().unwrap(), &(TAIL_LINES + 4).to_string());
    }

    #[test]
    fn what_waits_in_the_pipe_at_a_mark_was_written_before_it() {
        use std::io::Write;
        let (reader, writer) = std::io::pipe().unwrap();
        let tail = Tail::default();
        tail.set_pipe(Stream::Stderr, reader.into());
        tail.push_from(Stream::Stderr, "read before".into(), 12);
        // Written before the mark, read after it.
        (&writer).write_all(b"late\n").unwrap();
        let mark = tail.mark();
        tail.push_from(Stream::Stderr, "late".into(), 5);
        tail.push_from(Stream::Stderr, "after".into(), 6);
        // The other stream is counted apart.
        tail.push_from(Stream::Stdout, "out after".into(), 10);
        assert_eq!(tail.since(mark), vec!["after", "out after"]);
    }
}
