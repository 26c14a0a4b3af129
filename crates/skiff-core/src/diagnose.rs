//! Troubleshooting built in: recognise the common errors of docs/contract.md §3
//! (and a few more) in what a service writes, and say what happened, why,
//! and what to do. Pure: lines in, findings out; the callers decide where
//! findings are shown.

use std::collections::BTreeMap;
use std::time::SystemTime;

use skiff_model::format_size;

use crate::errors::ErrorKind;
use crate::events::EventKind;

/// Which rule a finding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FindingKind {
    /// A write outside /tmp.
    ReadOnlyFileSystem,
    /// Shared memory (/dev/shm) used, e.g. by Python multiprocessing.
    SharedMemory,
    /// A write to something the build made as root, or another permission
    /// error of the run user.
    RunUserPermission,
    /// A port below 1024, which needs root.
    PrivilegedPort,
    /// A Python module the image lacks.
    MissingPythonModule,
    /// A Node module the image lacks.
    MissingNodeModule,
    /// A command the image lacks.
    CommandNotFound,
    /// Root-only tooling (sudo, apt-get) run by the start command.
    RootOnlyCommand,
    /// The port never answered; the service listens elsewhere (or nowhere).
    PortNotListening,
    /// An instance was killed for going over its memory limit.
    OutOfMemory,
    /// Responses refused for being over `limits.max_response`.
    ResponseTooLarge,
    /// Requests cut off by `limits.request_timeout`.
    RequestTimeout,
    /// Request bodies refused for being over `limits.max_request`.
    RequestTooLarge,
    /// WebSocket or other upgrades sent to a serverless service.
    StreamingNeedsPersistent,
    /// Instances ended while handling requests.
    InstanceCrashed,
    /// Background work (schedulers, heartbeats, work after the response)
    /// ran late: a serverless instance has no CPU between requests.
    BackgroundWorkStalled,
    /// A write failed for want of space: `/tmp` or a persistent service's
    /// writable layer is full.
    DiskFull,
    /// A kernel call the sandbox's system-call filter denies (a new user
    /// namespace, io_uring, keyrings, ...).
    SyscallDenied,
    /// A tool that needs a newer Node.js than the image's.
    RuntimeTooOld,
    /// The service went on working after answering, with no request in
    /// flight: that work waits for the next request.
    WorkAfterAnswer,
    /// A library, class or shared object the image lacks (Ruby gems, Java
    /// classes, PHP classes and Composer's autoloader, `.so` files).
    MissingDependency,
    /// A program built for another processor than the machine's.
    WrongArchitecture,
    /// A connection kept open between requests (to a database, another
    /// service) was closed by the other side while the instance had no CPU.
    StaleConnection,
}

impl FindingKind {
    /// Every kind, in the order of the enum.
    pub const ALL: [FindingKind; 23] = [
        Self::ReadOnlyFileSystem,
        Self::SharedMemory,
        Self::RunUserPermission,
        Self::PrivilegedPort,
        Self::MissingPythonModule,
        Self::MissingNodeModule,
        Self::CommandNotFound,
        Self::RootOnlyCommand,
        Self::PortNotListening,
        Self::OutOfMemory,
        Self::ResponseTooLarge,
        Self::RequestTimeout,
        Self::RequestTooLarge,
        Self::StreamingNeedsPersistent,
        Self::InstanceCrashed,
        Self::BackgroundWorkStalled,
        Self::DiskFull,
        Self::SyscallDenied,
        Self::RuntimeTooOld,
        Self::WorkAfterAnswer,
        Self::MissingDependency,
        Self::WrongArchitecture,
        Self::StaleConnection,
    ];

    /// The kind's stable name in the API's JSON (`Finding.kind`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnlyFileSystem => "ReadOnlyFileSystem",
            Self::SharedMemory => "SharedMemory",
            Self::RunUserPermission => "RunUserPermission",
            Self::PrivilegedPort => "PrivilegedPort",
            Self::MissingPythonModule => "MissingPythonModule",
            Self::MissingNodeModule => "MissingNodeModule",
            Self::CommandNotFound => "CommandNotFound",
            Self::RootOnlyCommand => "RootOnlyCommand",
            Self::PortNotListening => "PortNotListening",
            Self::OutOfMemory => "OutOfMemory",
            Self::ResponseTooLarge => "ResponseTooLarge",
            Self::RequestTimeout => "RequestTimeout",
            Self::RequestTooLarge => "RequestTooLarge",
            Self::StreamingNeedsPersistent => "StreamingNeedsPersistent",
            Self::InstanceCrashed => "InstanceCrashed",
            Self::BackgroundWorkStalled => "BackgroundWorkStalled",
            Self::DiskFull => "DiskFull",
            Self::SyscallDenied => "SyscallDenied",
            Self::RuntimeTooOld => "RuntimeTooOld",
            Self::WorkAfterAnswer => "WorkAfterAnswer",
            Self::MissingDependency => "MissingDependency",
            Self::WrongArchitecture => "WrongArchitecture",
            Self::StaleConnection => "StaleConnection",
        }
    }
}

/// What the service may write, for the rules that name a limit: from the
/// service's current version, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disks {
    pub persistent: bool,
    /// `limits.tmp_size`.
    pub tmp_size: u64,
    /// `limits.disk` (persistent mode).
    pub disk: u64,
}

/// One diagnosis: what happened (with the evidence), why, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// What happened, naming what the log names (a path, a module, a port).
    pub what: String,
    /// The platform rule behind it.
    pub why: &'static str,
    /// What to change.
    pub fix: String,
    /// The log line it was recognised in (the last one).
    pub evidence: String,
    pub count: u32,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

const WHY_READ_ONLY: &str = "only /tmp is writable in a serverless instance (the platform favours \
     fast cold starts; the next request may reach another instance, and nothing an instance \
     writes is kept)";
const WHY_SHM: &str = "/dev/shm is read-only: shared memory is not supported";
const WHY_RUN_USER: &str =
    "the build runs as root, the service as a non-root user of its own (app): \
     in a serverless instance, files the build made belong to root and cannot be changed, \
     nor read when the build made them for root only (a persistent service owns its \
     image's files)";
const WHY_PORT: &str = "the service runs as a non-root user, and ports below 1024 need root";
const WHY_MISSING: &str = "the start command runs in the image the build command made; what the \
     build did not install is not there";
const WHY_ROOT_ONLY: &str = "the start command runs as a non-root user with no privileges; only \
     the build command runs as root";

const WHY_PORT_CHECK: &str = "the platform checks /kaithhealth on 0.0.0.0:$PORT inside the \
     instance until it answers; a service listening on another port or only on another \
     address is never reached";
const WHY_MEMORY: &str = "each instance's processes may use limits.memory (default 512MiB), \
     and its /tmp, which lives in memory, up to limits.tmp_size on top; the kernel kills a \
     process when the two together go over";
const WHY_RESPONSE_SIZE: &str = "a serverless service's response is at most limits.max_response \
     (default 6MiB = 6,291,456 bytes); the gateway refuses larger ones with 502";
const WHY_TIMEOUT: &str = "a serverless request ends at limits.request_timeout (default 15 min); \
     the gateway answers 504 and closes the connection to the instance";
const WHY_REQUEST_SIZE: &str = "a serverless service accepts request bodies up to \
     limits.max_request (default 6MiB)";
const WHY_STREAMING: &str = "serverless services serve short request/response exchanges; \
     long-lived connections (WebSocket, server push) need a persistent instance";
const WHY_SUSPENDED: &str = "a serverless instance gets CPU only while a request is in flight: \
     it is frozen limits.idle_suspend after the last request ends (default: at once), so \
     schedulers, heartbeats and work started after the response stop until the next request";
const WHY_AFTER_ANSWER: &str = "a serverless instance's CPU is suspended as soon as its \
     answer is sent (limits.idle_suspend, default: at once), so work done after answering — \
     writing a file or a database, logging, calling another service — waits until the next \
     request thaws the instance, which may be hours later, and its output and errors then \
     appear under that request";
const WHY_ARCHITECTURE: &str = "instances run on this machine's processor (x86-64, \
     linux/amd64); a program or native module built elsewhere for another one (arm64 on an \
     Apple or Graviton machine) cannot be executed";
const WHY_STALE: &str = "a serverless instance has no CPU between requests, so it answers \
     no keep-alive and no ping on the connections it keeps open; servers, proxies and NAT \
     drop idle connections, and the next request finds its pooled connection dead";
const WHY_DISK: &str = "what an instance writes goes to its /tmp, which holds at most \
     limits.tmp_size (default 512MiB), or, in a persistent service, also to its writable \
     layer, a disk of its own of limits.disk (default 1GiB); past them, writes fail with \
     \"No space left on device\" and the service goes on running";
const WHY_SYSCALL: &str = "instances and builds run under a system-call filter that denies \
     kernel features services do not need and attacks on the kernel use (new user namespaces, \
     io_uring, eBPF, userfaultfd, keyrings, perf events, mounts, other namespaces); a denied \
     call fails with \"Operation not permitted\"";
const WHY_RUNTIME: &str = "a service runs on the Node.js of its runtime: the one runtime = \
     \"node@<major>\" names, else 22 for a service with a package.json, else the base \
     image's own";
const WHY_CRASH: &str = "requests in flight on an instance that ends get 502; the platform \
     starts another for the next request";

/// Findings for one service, each kept once with a count.
#[derive(Debug, Default)]
pub struct Diagnoser {
    findings: BTreeMap<(FindingKind, String), Finding>,
    disks: Option<Disks>,
    /// The lines before, lowercase, for errors that need their context: a
    /// Python traceback names the failing call above the error, one line
    /// up (3.11) or several (3.13 spreads a call over lines). The lines of
    /// the current traceback, at most [`CONTEXT_LINES`], else the last one.
    previous: std::collections::VecDeque<String>,
}

/// How many lines before an error its context holds.
const CONTEXT_LINES: usize = 8;

impl Diagnoser {
    /// A diagnoser that knows the service's mode and disk limits, so that
    /// a full disk is explained with the limit that applied.
    pub fn with_disks(disks: Disks) -> Self {
        Self {
            disks: Some(disks),
            ..Self::default()
        }
    }

    /// Looks at one line; returns the finding when it is new (to show it
    /// once), `None` when the line says nothing or repeats a known finding.
    pub fn observe(&mut self, line: &str, at: SystemTime) -> Option<&Finding> {
        let context: Vec<&str> = self.previous.iter().map(String::as_str).collect();
        let classified = classify(line, &context.join("\n"), self.disks);
        let lower = line.to_ascii_lowercase();
        // Python underlines the failing call with carets: no context.
        if !line.trim().chars().all(|c| matches!(c, '^' | '~')) {
            let in_traceback = lower.starts_with("traceback (most recent call last)")
                || (!self.previous.is_empty() && line.starts_with(' '));
            if !in_traceback || lower.starts_with("traceback") {
                self.previous.clear();
            }
            if self.previous.len() == CONTEXT_LINES {
                self.previous.pop_front();
            }
            self.previous.push_back(lower);
        }
        let (kind, subject, what, fix) = classified?;
        self.record(kind, subject, what, fix, line.trim(), at)
    }

    /// Looks at one of the platform's events about the service (`kind` as
    /// recorded: a gateway refusal, an out-of-memory kill, a start that
    /// never listened); returns the finding when it is new.
    pub fn observe_event(
        &mut self,
        kind: &EventKind,
        message: &str,
        at: SystemTime,
    ) -> Option<&Finding> {
        let (kind, subject, what, fix) = classify_event(kind, message)?;
        self.record(
            kind,
            subject,
            what,
            fix,
            message.lines().next().unwrap_or(""),
            at,
        )
    }

    fn record(
        &mut self,
        kind: FindingKind,
        subject: String,
        what: String,
        fix: String,
        evidence: &str,
        at: SystemTime,
    ) -> Option<&Finding> {
        let why = match kind {
            FindingKind::ReadOnlyFileSystem => WHY_READ_ONLY,
            FindingKind::SharedMemory => WHY_SHM,
            FindingKind::RunUserPermission => WHY_RUN_USER,
            FindingKind::PrivilegedPort => WHY_PORT,
            FindingKind::MissingPythonModule
            | FindingKind::MissingNodeModule
            | FindingKind::MissingDependency
            | FindingKind::CommandNotFound => WHY_MISSING,
            FindingKind::WrongArchitecture => WHY_ARCHITECTURE,
            FindingKind::StaleConnection => WHY_STALE,
            FindingKind::RootOnlyCommand => WHY_ROOT_ONLY,
            FindingKind::PortNotListening => WHY_PORT_CHECK,
            FindingKind::OutOfMemory => WHY_MEMORY,
            FindingKind::ResponseTooLarge => WHY_RESPONSE_SIZE,
            FindingKind::RequestTimeout => WHY_TIMEOUT,
            FindingKind::RequestTooLarge => WHY_REQUEST_SIZE,
            FindingKind::StreamingNeedsPersistent => WHY_STREAMING,
            FindingKind::InstanceCrashed => WHY_CRASH,
            FindingKind::BackgroundWorkStalled => WHY_SUSPENDED,
            FindingKind::WorkAfterAnswer => WHY_AFTER_ANSWER,
            FindingKind::DiskFull => WHY_DISK,
            FindingKind::SyscallDenied => WHY_SYSCALL,
            FindingKind::RuntimeTooOld => WHY_RUNTIME,
        };
        let key = (kind, subject);
        let mut new = false;
        let f = self.findings.entry(key.clone()).or_insert_with(|| {
            new = true;
            Finding {
                kind,
                what,
                why,
                fix,
                evidence: String::new(),
                count: 0,
                first_seen: at,
                last_seen: at,
            }
        });
        f.count += 1;
        f.last_seen = at;
        f.evidence = evidence.to_string();
        if new {
            self.findings.get(&key)
        } else {
            None
        }
    }

    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.values()
    }
}

/// The findings in some lines (e.g. a failed start's last output), once each.
pub fn diagnose_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<Finding> {
    let mut d = Diagnoser::default();
    let now = SystemTime::now();
    for line in lines {
        d.observe(line, now);
    }
    d.findings().cloned().collect()
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n  why: {}\n  fix: {}", self.what, self.why, self.fix)?;
        if self.count > 1 {
            write!(f, "\n  seen {} times", self.count)?;
        }
        Ok(())
    }
}

/// Whether `line` is a request log line (`"GET /x HTTP/1.1" 200`, `GET /x
/// 200 3.1 ms`): servers write these after answering, and such a line is
/// no work of the service's own.
pub fn is_access_log(line: &str) -> bool {
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    let plain = without_colours(line);
    // Structured request logs (pino, Fastify, bunyan): a status and a
    // response time in one JSON object.
    if plain.contains("\"statusCode\"") && plain.contains("\"responseTime\"") {
        return true;
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    // Rails' "Completed 200 OK in 5ms", Phoenix's "Sent 200 in 3ms".
    if let [first, status, ..] = words.as_slice() {
        if (*first == "Completed" || *first == "Sent") && is_status(status) {
            return true;
        }
    }
    words.windows(2).enumerate().any(|(i, w)| {
        let method = w[0].trim_start_matches(['"', '\'']);
        METHODS.contains(&method)
            && (w[1].starts_with('/')
                || w[1].starts_with("http://")
                || w[1].starts_with("https://"))
            && words[i + 2..]
                .iter()
                .take(6)
                .any(|t| is_status(t.trim_matches(|c: char| !c.is_ascii_alphanumeric())))
    })
}

/// A three-digit HTTP status.
fn is_status(word: &str) -> bool {
    word.len() == 3 && word.starts_with(['1', '2', '3', '4', '5']) && word.parse::<u16>().is_ok()
}

/// `line` without terminal colour codes (`ESC [ … m`), which loggers such
/// as morgan put around the status.
pub fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // A CSI sequence ends with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The rules for the platform's own events. The event's message already
/// names the limit or the addresses; the finding says what to change.
fn classify_event(kind: &EventKind, message: &str) -> Option<Classified> {
    let first = message.lines().next().unwrap_or("").to_string();
    Some(match kind {
        EventKind::PortNotListening => (
            FindingKind::PortNotListening,
            String::new(),
            format!("The service never answered on its port: {first}"),
            "Listen on 0.0.0.0 (all addresses, not 127.0.0.1) and on the port the platform \
             gives in $PORT (skiff.toml `port`, default 8080); e.g. app.run(host=\"0.0.0.0\", \
             port=int(os.environ[\"PORT\"])) or server.listen(process.env.PORT)."
                .into(),
        ),
        EventKind::NoHttpAnswer => (
            FindingKind::PortNotListening,
            "http".into(),
            "The service took connections on its port but never answered the health check \
             with HTTP."
                .into(),
            "Answer HTTP on $PORT for any path (a 404 is fine): look at the service's output \
             when the check ran for a handler that fails on unknown paths, or a server that \
             speaks another protocol on the port."
                .into(),
        ),
        EventKind::WorkAfterAnswer => (
            FindingKind::WorkAfterAnswer,
            String::new(),
            "The service went on working after it had answered a request, when its CPU is \
             already suspended."
                .into(),
            "Do the work before sending the answer (write, then respond); or run the service \
             with mode = \"persistent\", or give it time after each answer with [limits] \
             idle_suspend (e.g. \"200ms\")."
                .into(),
        ),
        EventKind::OomKill => (
            FindingKind::OutOfMemory,
            String::new(),
            first,
            "Raise the limit in skiff.toml, e.g. [limits] memory = \"1GiB\", or make the \
             service use less (fewer worker processes, smaller caches, stream large data \
             instead of loading it whole)."
                .into(),
        ),
        EventKind::Refused(ErrorKind::ResponseTooLarge) => (
            FindingKind::ResponseTooLarge,
            String::new(),
            "Responses were refused for being bigger than the maximum allowed size (502).".into(),
            "Store large data in object storage and return its URL (or a redirect to it); \
             paginate large lists. If the service needs larger responses, raise \
             [limits] max_response in skiff.toml."
                .into(),
        ),
        EventKind::Refused(ErrorKind::RequestTimeout) => (
            FindingKind::RequestTimeout,
            String::new(),
            "Requests ran past the request timeout and were cut off (504).".into(),
            "Make the slow requests faster, hand long work to a queue and answer at once, or \
             run the service with mode = \"persistent\" (no request timeout); otherwise raise \
             [limits] request_timeout."
                .into(),
        ),
        EventKind::Refused(ErrorKind::RequestTooLarge) => (
            FindingKind::RequestTooLarge,
            String::new(),
            "Request bodies were refused for being over the limit (413).".into(),
            "Have clients upload large data to object storage and send its URL, or raise \
             [limits] max_request in skiff.toml."
                .into(),
        ),
        EventKind::Refused(ErrorKind::StreamingNeedsPersistent) => (
            FindingKind::StreamingNeedsPersistent,
            String::new(),
            "Clients tried to open WebSocket (Upgrade) connections; a serverless service \
             refuses them (501)."
                .into(),
            "Set mode = \"persistent\" in skiff.toml for services that hold connections open \
             (WebSocket, server-sent events), or poll over plain requests."
                .into(),
        ),
        EventKind::Refused(ErrorKind::UpstreamFailed) => (
            FindingKind::InstanceCrashed,
            String::new(),
            "Requests failed (502) because the instance answering them ended or closed the \
             connection without an answer."
                .into(),
            "Look at the service's output just before (skiff logs NAME): an uncaught \
             exception, a crash, or running out of memory; fix the cause in the service."
                .into(),
        ),
        _ => return None,
    })
}

/// A rule that is only words: a line whose lowercase form starts with
/// `start` (after leading blanks), contains every one of `all` and, when
/// `any` is not empty, one of `any`, gives this finding. Each stack's own
/// words are rows of their own. `what` and `fix` may quote the line:
/// `{line}` is the line, `{detail}` its last part after ": "; `{raise}` is
/// the advice on `limits.memory`. Rules that must read a path, a module, a
/// port or a command out of the line are functions below.
struct Rule {
    /// Whose words these are (the corpus has a case per stack named; "any"
    /// for words no stack owns).
    stack: &'static str,
    start: &'static str,
    all: &'static [&'static str],
    any: &'static [&'static str],
    /// Words that make a line someone else's (a client quoting a server).
    none: &'static [&'static str],
    /// Where `{detail}` starts: after this marker (up to a closing bracket),
    /// or when empty after the last ": ".
    detail: &'static str,
    kind: FindingKind,
    subject: &'static str,
    what: &'static str,
    fix: &'static str,
}

/// The defaults rows leave out.
const ROW: Rule = Rule {
    stack: "any",
    start: "",
    all: &[],
    any: &[],
    none: &[],
    detail: "",
    kind: FindingKind::InstanceCrashed,
    subject: "",
    what: "",
    fix: "",
};

impl Rule {
    fn matches(&self, lower: &str) -> bool {
        // `start` is whole words: "memoryerror" is not "memoryerrorhandler".
        let starts = lower
            .trim_start()
            .strip_prefix(self.start)
            .is_some_and(|rest| {
                self.start.ends_with(' ') || !rest.starts_with(|c: char| c.is_ascii_alphanumeric())
            });
        (self.start.is_empty() || starts)
            && self.all.iter().all(|w| lower.contains(w))
            && (self.any.is_empty() || self.any.iter().any(|w| lower.contains(w)))
            && !self.none.iter().any(|w| lower.contains(w))
    }

    fn finding(&self, line: &str) -> Classified {
        let line = line.trim();
        let detail = match line.find(self.detail).filter(|_| !self.detail.is_empty()) {
            Some(at) => {
                let rest = &line[at + self.detail.len()..];
                rest[..rest.find([']', ')']).unwrap_or(rest.len())].trim()
            }
            None => line.rsplit(": ").next().unwrap_or(line),
        };
        let fill = |text: &str| {
            text.replace("{line}", line)
                .replace("{detail}", detail)
                .replace("{raise}", RAISE_MEMORY)
        };
        (
            self.kind,
            self.subject.into(),
            fill(self.what),
            fill(self.fix),
        )
    }
}

const RAISE_MEMORY: &str = "raise [limits] memory in skiff.toml (e.g. memory = \"1GiB\") or make \
     it use less (stream data instead of loading it whole, fewer workers)";
const FIX_STALLED: &str = "Do the work inside the request, before answering; trigger scheduled \
     jobs from outside (a cron that calls an endpoint); or run the service with mode = \
     \"persistent\", which is never frozen.";
const FIX_EXPORTER: &str = "Flush before answering: end each request with the provider's \
     force_flush() (Python), forceFlush() (Node) or ForceFlush(ctx) (Go), or export \
     synchronously (SimpleSpanProcessor, WithSyncer); or run the service with mode = \
     \"persistent\".";
const WHAT_EXPORTER: &str = "A telemetry exporter could not send its batch: it sends in the \
     background, and the instance had no CPU between requests.";
const FIX_RUNTIME: &str =
    "Name the Node.js it needs in skiff.toml, e.g. runtime = \"node@24\" (any \
     major from 18 to 25; a service with a package.json runs on 22, the current long-term-support \
     version, unless it names one), and deploy again.";
const WHAT_RUNTIME: &str = "A tool needs another Node.js than the one it ran on: {line}";
const WHAT_OUT_OF_MEMORY: &str = "The service ran out of memory: {line}";
const FIX_OUT_OF_MEMORY: &str = "The instance may use limits.memory: {raise}.";

const FIX_POOLED: &str = "Check connections before use and reconnect on error: SQLAlchemy \
     create_engine(..., pool_pre_ping=True, pool_recycle=60), node-postgres pool.on('error', \
     ...) with idleTimeoutMillis, Rails reconnect: true; or open a connection per request; or \
     run the service with mode = \"persistent\".";
const WHAT_POOLED: &str =
    "A connection the service kept open between requests was found closed by the other side.";
const WHAT_OWN_BODY_LIMIT: &str =
    "The service refused a request body as too large, by its own limit.";
const WHAT_OWN_TIMEOUT: &str = "The service ended a request by its own time limit.";

/// The rules that are only words, in order: the first that matches wins.
const RULES: &[Rule] = &[
    // Background work that ran late because the instance had no CPU.
    Rule {
        stack: "python",
        all: &["was missed by"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "scheduler",
        what: "A scheduled job ran late (\"was missed by\"): the scheduler's thread had no CPU \
               between requests.",
        fix: FIX_STALLED,
        ..ROW
    },
    Rule {
        stack: "python",
        all: &["worker timeout"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "gunicorn",
        what: "Gunicorn killed a worker for a stale heartbeat (WORKER TIMEOUT) after the \
               instance had no CPU between requests.",
        fix: "skiff starts gunicorn with --timeout 0 in serverless mode (through \
              GUNICORN_CMD_ARGS), so that a frozen worker is not taken for a hung one; a \
              --timeout in the start command or a gunicorn config file overrides it: remove it \
              there (or set it to 0), or run the service with mode = \"persistent\".",
        ..ROW
    },
    Rule {
        stack: "java",
        all: &["thread starvation or clock leap detected"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "hikari",
        what: "HikariCP's housekeeper found time had jumped (\"clock leap\"): the instance had \
               no CPU between requests.",
        fix: FIX_STALLED,
        ..ROW
    },
    Rule {
        stack: "ruby",
        all: &["failed to check in within"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "puma",
        what: "Puma terminated a worker that had not checked in: the instance had no CPU \
               between requests.",
        fix: FIX_STALLED,
        ..ROW
    },
    Rule {
        stack: "node",
        all: &["otlpexportererror"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "exporter",
        what: WHAT_EXPORTER,
        fix: FIX_EXPORTER,
        ..ROW
    },
    Rule {
        stack: "python",
        all: &["while exporting"],
        any: &["transient error", "deadline"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "exporter",
        what: WHAT_EXPORTER,
        fix: FIX_EXPORTER,
        ..ROW
    },
    // Go's OTLP exporters, through otel's default error handler. A deadline
    // only: a refused connection or an unknown name is the endpoint's
    // configuration, not a suspension.
    Rule {
        stack: "go",
        all: &["code = deadlineexceeded"],
        any: &["traces export:", "failed to upload metrics:", "logs export:"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "exporter",
        what: WHAT_EXPORTER,
        fix: FIX_EXPORTER,
        ..ROW
    },
    Rule {
        stack: "php, ruby",
        any: &[
            "amqpheartbeatmissedexception",
            "missed server heartbeat",
            "missed heartbeats from server",
        ],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "amqp",
        what: "The connection to the message broker missed its heartbeats: it was kept open \
               between requests, while the instance had no CPU to answer the broker.",
        fix: "Open the broker connection per request and close it before answering, or \
              reconnect on this error (php-amqplib, Bunny and pika all can); or run the \
              service with mode = \"persistent\" for a long-running consumer.",
        ..ROW
    },
    Rule {
        stack: "python",
        all: &["heartbeat"],
        any: &["missed", "timed out", "blocked"],
        kind: FindingKind::BackgroundWorkStalled,
        subject: "heartbeat",
        what: "A heartbeat was missed while the instance had no CPU between requests: {line}",
        fix: FIX_STALLED,
        ..ROW
    },
    // Next.js, Vite and others: "You are using Node.js 18.19.0. For Next.js,
    // Node.js version ... is required." / "Vite requires Node.js version
    // 20.19+"; npm's EBADENGINE lists the engine it wanted.
    Rule {
        stack: "node",
        all: &["you are using node.js"],
        any: &["required", "requires"],
        kind: FindingKind::RuntimeTooOld,
        subject: "node",
        what: WHAT_RUNTIME,
        fix: FIX_RUNTIME,
        ..ROW
    },
    Rule {
        stack: "node",
        all: &["unsupported engine", "wanted: {\"node\""],
        kind: FindingKind::RuntimeTooOld,
        subject: "node",
        what: WHAT_RUNTIME,
        fix: FIX_RUNTIME,
        ..ROW
    },
    Rule {
        stack: "node",
        all: &["notsup", "required: {\"node\""],
        kind: FindingKind::RuntimeTooOld,
        subject: "node",
        what: WHAT_RUNTIME,
        fix: FIX_RUNTIME,
        ..ROW
    },
    // Shared memory (/dev/shm), in its users' words.
    Rule {
        stack: "python",
        all: &["insufficient shared memory"],
        kind: FindingKind::SharedMemory,
        subject: "pytorch",
        what: "PyTorch's DataLoader workers ran out of shared memory (/dev/shm) to pass \
               batches between processes.",
        fix: "Load in the main process: DataLoader(..., num_workers=0) (or threads); a \
              serverless instance has no shared memory.",
        ..ROW
    },
    // Chromium's own line, whichever library started it (Puppeteer,
    // Playwright, Grover, Browsershot, chrome-php) and passed its output on.
    Rule {
        stack: "node, ruby, java, php",
        all: &["/dev/shm"],
        any: &["chrom"],
        kind: FindingKind::SharedMemory,
        subject: "chromium",
        what: "Chromium could not create its shared memory in /dev/shm.",
        fix: "Start it with --disable-dev-shm-usage (it then uses /tmp), and --no-sandbox: \
              e.g. puppeteer.launch({args: ['--disable-dev-shm-usage', '--no-sandbox']}); \
              Grover's launch_args, Browsershot's addChromiumArguments and chrome-php's \
              customFlags take the same flags.",
        ..ROW
    },
    // PostgreSQL's own log: the database runs in the instance. A client
    // quoting the same error (JDBC, psycopg, pq, PDO, pg) is told it by a
    // server elsewhere, whose /dev/shm is none of the instance's.
    Rule {
        stack: "go",
        all: &["could not resize shared memory segment"],
        none: &[
            "psqlexception",
            "sqlstate",
            "pg::",
            "pq: ",
            "psycopg",
            "pdoexception",
            "sqlalchemy",
            "jdbc",
        ],
        kind: FindingKind::SharedMemory,
        subject: "postgresql",
        what: "PostgreSQL could not make a dynamic shared memory segment (/dev/shm).",
        fix: "Run the database outside the service (a managed PostgreSQL), or set \
              dynamic_shared_memory_type = mmap in postgresql.conf, with its data under /tmp.",
        ..ROW
    },
    // Pooled connections found closed after a suspension.
    Rule {
        stack: "node, python, ruby, php",
        all: &[],
        any: &[
            "connection terminated unexpectedly",
            "server closed the connection unexpectedly",
            "server has gone away",
            "lost connection to mysql server",
        ],
        kind: FindingKind::StaleConnection,
        subject: "database",
        what: WHAT_POOLED,
        fix: FIX_POOLED,
        ..ROW
    },
    Rule {
        stack: "java",
        all: &["marked as broken", "hikari"],
        kind: FindingKind::StaleConnection,
        subject: "hikari",
        what: WHAT_POOLED,
        fix: "Give HikariCP a maxLifetime and keepaliveTime shorter than the idle time the \
              database or its proxy allows (spring.datasource.hikari.max-lifetime), so broken \
              connections are replaced; or run the service with mode = \"persistent\".",
        ..ROW
    },
    Rule {
        stack: "node, python",
        all: &[],
        any: &[
            "socket hang up",
            "remote end closed connection without response",
        ],
        kind: FindingKind::StaleConnection,
        subject: "http",
        what: WHAT_POOLED,
        fix: FIX_HTTP_POOL,
        ..ROW
    },
    // Go names the connection: only an outgoing one (a pool's, local->remote
    // to a service's port) counts; a client that went away resets an
    // incoming one, which is no finding.
    Rule {
        stack: "go",
        all: &["tcp ", "->"],
        any: &["read: connection reset by peer", "write: broken pipe"],
        kind: FindingKind::StaleConnection,
        subject: "http",
        what: WHAT_POOLED,
        fix: FIX_HTTP_POOL,
        ..ROW
    },
    // A body over the framework's own limit (within skiff's max_request).
    Rule {
        stack: "node",
        all: &["request entity too large"],
        kind: FindingKind::RequestTooLarge,
        subject: "express",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "Raise the body parser's own limit, e.g. express.json({ limit: '5mb' }) (within \
              [limits] max_request, 6MiB by default), or upload large files to object storage.",
        ..ROW
    },
    Rule {
        stack: "python",
        all: &[],
        any: &["requestdatatoobig", "data_upload_max_memory_size"],
        kind: FindingKind::RequestTooLarge,
        subject: "django",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "Raise Django's DATA_UPLOAD_MAX_MEMORY_SIZE (within [limits] max_request, 6MiB by \
              default), or upload large files to object storage.",
        ..ROW
    },
    Rule {
        stack: "php",
        all: &["post content-length of", "exceeds the limit"],
        kind: FindingKind::RequestTooLarge,
        subject: "php",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "Raise PHP's post_max_size and upload_max_filesize (php -d post_max_size=6M), \
              within [limits] max_request, or upload large files to object storage.",
        ..ROW
    },
    Rule {
        stack: "java",
        all: &["maxuploadsizeexceededexception"],
        kind: FindingKind::RequestTooLarge,
        subject: "spring",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "Raise spring.servlet.multipart.max-file-size and max-request-size, within \
              [limits] max_request, or upload large files to object storage.",
        ..ROW
    },
    Rule {
        stack: "ruby",
        all: &["total query size", "exceeds limit"],
        kind: FindingKind::RequestTooLarge,
        subject: "rack",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "Rack parses form bodies up to 4MiB: raise [env] \
              RACK_QUERY_PARSER_BYTESIZE_LIMIT (in bytes, within [limits] max_request, 6MiB \
              by default), or send large data as a file upload or JSON.",
        ..ROW
    },
    Rule {
        stack: "go",
        all: &["http: request body too large"],
        kind: FindingKind::RequestTooLarge,
        subject: "net/http",
        what: WHAT_OWN_BODY_LIMIT,
        fix: "The service's http.MaxBytesReader cut the body: raise its limit (within \
              [limits] max_request, 6MiB by default), or upload large files to object storage.",
        ..ROW
    },
    // A request ended by the framework's own time limit.
    Rule {
        stack: "python",
        all: &["harakiri on worker"],
        kind: FindingKind::RequestTimeout,
        subject: "uwsgi",
        what: "uWSGI's harakiri killed a worker whose request ran past its own time limit.",
        fix: "Raise uWSGI's --harakiri (seconds) within [limits] request_timeout, or hand long \
              work to a queue and answer at once.",
        ..ROW
    },
    Rule {
        stack: "node",
        all: &["response timeout"],
        any: &["serviceunavailableerror", "connect-timeout"],
        kind: FindingKind::RequestTimeout,
        subject: "connect-timeout",
        what: WHAT_OWN_TIMEOUT,
        fix: "The connect-timeout middleware ended the request: raise its time (app.use(timeout('60s'))) \
              within [limits] request_timeout, or hand long work to a queue and answer at once.",
        ..ROW
    },
    Rule {
        stack: "go",
        all: &["http: handler timeout"],
        kind: FindingKind::RequestTimeout,
        subject: "net/http",
        what: WHAT_OWN_TIMEOUT,
        fix: "http.TimeoutHandler ended the request and its handler wrote too late: raise the \
              handler's time within [limits] request_timeout, or hand long work to a queue and \
              answer at once.",
        ..ROW
    },
    Rule {
        stack: "php",
        all: &["maximum execution time of"],
        kind: FindingKind::RequestTimeout,
        subject: "php",
        what: WHAT_OWN_TIMEOUT,
        fix: "PHP's max_execution_time ended the request: raise it (php -d \
              max_execution_time=120, or set_time_limit) within [limits] request_timeout, or \
              hand long work to a queue and answer at once.",
        ..ROW
    },
    Rule {
        stack: "ruby",
        all: &["rack::timeout"],
        kind: FindingKind::RequestTimeout,
        subject: "rack-timeout",
        what: WHAT_OWN_TIMEOUT,
        fix: "Rack::Timeout ended the request: raise RACK_TIMEOUT_SERVICE_TIMEOUT within \
              [limits] request_timeout, or hand long work to a queue and answer at once.",
        ..ROW
    },
    Rule {
        stack: "java",
        all: &["asyncrequesttimeoutexception"],
        kind: FindingKind::RequestTimeout,
        subject: "spring",
        what: WHAT_OWN_TIMEOUT,
        fix: "Spring's async request timeout ended the request: raise \
              spring.mvc.async.request-timeout within [limits] request_timeout, or hand long \
              work to a queue and answer at once.",
        ..ROW
    },
    // Libraries that want a writable cache or configuration directory and
    // say so without an error number.
    Rule {
        stack: "python",
        all: &["mplconfigdir", "not a writable directory"],
        kind: FindingKind::ReadOnlyFileSystem,
        subject: "matplotlib",
        what: "Matplotlib found no writable configuration directory (MPLCONFIGDIR) and made a \
               temporary one on every start, which slows its import.",
        fix: "Point it at /tmp in skiff.toml: [env] MPLCONFIGDIR = \"/tmp/matplotlib\" (only \
              /tmp is writable; the cache goes with the instance).",
        ..ROW
    },
    Rule {
        stack: "any",
        all: &["fontconfig", "no writable cache directories"],
        kind: FindingKind::ReadOnlyFileSystem,
        subject: "fontconfig",
        what: "fontconfig found no writable cache directory, so fonts are scanned again on \
               every start.",
        fix: "Point it at /tmp in skiff.toml: [env] XDG_CACHE_HOME = \"/tmp/.cache\" (only \
              /tmp is writable; the cache goes with the instance).",
        ..ROW
    },
    Rule {
        stack: "python, go",
        any: &[
            "attempt to write a readonly database",
            "unable to open database file",
        ],
        none: &["no space left", "enospc"],
        kind: FindingKind::ReadOnlyFileSystem,
        subject: "sqlite",
        what: "SQLite could not write its database: the file (or the directory, where it keeps \
               its journal) is not writable.",
        fix: "In a serverless service, put the database under /tmp (e.g. \
              sqlite:////tmp/app.db; it goes with the instance) or use a database server; for \
              data that must last on this machine, use mode = \"persistent\".",
        ..ROW
    },
    Rule {
        stack: "python",
        any: &["externally-managed-environment", "externally managed"],
        kind: FindingKind::MissingPythonModule,
        subject: "pip",
        what: "pip refused to install into the system's Python (PEP 668, \
               \"externally-managed-environment\").",
        fix: "skiff's builds allow it (PIP_BREAK_SYSTEM_PACKAGES=1): install in the build \
              command, build = \"pip install -r requirements.txt\"; at run time nothing can be \
              installed. If a build still sees it, unset PIP_BREAK_SYSTEM_PACKAGES in [env] or \
              use a virtualenv (python3 -m venv .venv && .venv/bin/pip install ...).",
        ..ROW
    },
    // A runtime that says it ran out of memory, before (or instead of) the
    // kernel's kill: each has its own limit beside `limits.memory`.
    Rule {
        stack: "node",
        any: &["javascript heap out of memory", "reached heap limit"],
        kind: FindingKind::OutOfMemory,
        subject: "node",
        what: "Node.js ran out of heap.",
        fix: "Node's heap limit is its own, apart from the instance's: set it below \
              limits.memory with [env] NODE_OPTIONS = \"--max-old-space-size=<MiB>\" (about \
              three quarters of limits.memory), and if that is not enough, {raise}.",
        ..ROW
    },
    Rule {
        stack: "java",
        all: &["java.lang.outofmemoryerror"],
        none: &["unable to create native thread"],
        detail: "OutOfMemoryError: ",
        kind: FindingKind::OutOfMemory,
        subject: "java",
        what: "The JVM ran out of memory: {detail}",
        fix: "The JVM's heap limit is its own: size it from the instance's with \
              -XX:MaxRAMPercentage=75 (or -Xmx below limits.memory, leaving room for the rest of \
              the process), and if the heap must grow, {raise}.",
        ..ROW
    },
    Rule {
        stack: "php",
        all: &["allowed memory size of", "exhausted"],
        kind: FindingKind::OutOfMemory,
        subject: "php",
        what: "PHP reached its memory_limit.",
        fix: "PHP's memory_limit is its own: raise it (php -d memory_limit=256M, or ini_set) \
              while it stays below limits.memory, and if more is needed, {raise}.",
        ..ROW
    },
    Rule {
        stack: "python",
        start: "memoryerror",
        kind: FindingKind::OutOfMemory,
        subject: "memory",
        what: WHAT_OUT_OF_MEMORY,
        fix: FIX_OUT_OF_MEMORY,
        ..ROW
    },
    Rule {
        stack: "go",
        all: &["runtime: out of memory"],
        kind: FindingKind::OutOfMemory,
        subject: "memory",
        what: WHAT_OUT_OF_MEMORY,
        fix: FIX_OUT_OF_MEMORY,
        ..ROW
    },
    Rule {
        stack: "ruby",
        all: &["(nomemoryerror)"],
        kind: FindingKind::OutOfMemory,
        subject: "memory",
        what: WHAT_OUT_OF_MEMORY,
        fix: FIX_OUT_OF_MEMORY,
        ..ROW
    },
    Rule {
        all: &["std::bad_alloc"],
        kind: FindingKind::OutOfMemory,
        subject: "memory",
        what: WHAT_OUT_OF_MEMORY,
        fix: FIX_OUT_OF_MEMORY,
        ..ROW
    },
    // bash reports a child the kernel killed (SIGKILL, as the OOM killer does).
    Rule {
        stack: "python",
        start: "bash: ",
        all: &[" killed ", "line "],
        kind: FindingKind::OutOfMemory,
        subject: "memory",
        what: "A process of the service was killed: {line}",
        fix: "A process killed by the kernel inside an instance was most likely over \
              limits.memory: {raise}.",
        ..ROW
    },
];

const FIX_HTTP_POOL: &str = "Retry once on a connection error, and keep idle connections \
     shorter than the other side does (e.g. an http.Agent with keepAlive and a short \
     freeSocketTimeout, or requests' Session re-created); or run the service with mode = \
     \"persistent\".";

/// The rules that are only words, as (stacks, finding, subject): the
/// corpus test checks that each row is exercised by a case of its stacks.
pub fn word_rules() -> impl Iterator<Item = (&'static str, FindingKind, &'static str)> {
    RULES.iter().map(|r| (r.stack, r.kind, r.subject))
}

/// The first rule of [`RULES`] the line matches.
fn by_words(line: &str, lower: &str) -> Option<Classified> {
    Some(RULES.iter().find(|r| r.matches(lower))?.finding(line))
}

/// Which row of the word rules (in [`word_rules`]' order) gives the
/// finding for `line`, if one does: the corpus test checks that every row
/// is reached by a case of each stack it names.
pub fn word_rule_of(line: &str) -> Option<usize> {
    let lower = line.to_ascii_lowercase();
    if is_error_field(&lower) {
        return None;
    }
    RULES.iter().position(|r| r.matches(&lower))
}

/// Node prints an error object's fields after its message (`code:
/// 'EROFS'`, `path: '/app/x'`): the message line was the finding, these
/// are the same event.
fn is_error_field(lower: &str) -> bool {
    let field = lower.trim_start();
    field.len() < lower.len()
        && [
            "code: ",
            "errno: ",
            "syscall: ",
            "path: ",
            "address: ",
            "port: ",
            "dest: ",
        ]
        .iter()
        .any(|f| field.starts_with(f))
}

/// A command the image lacks.
fn command_not_found(cmd: String) -> Classified {
    (
        FindingKind::CommandNotFound,
        cmd.clone(),
        format!("The command {cmd:?} is not in the image."),
        format!(
            "Install it in the build command (e.g. pip install, npm install, or \
             apt-get install -y ...), or call it by its path (e.g. .venv/bin/{cmd})."
        ),
    )
}

/// The words after `marker` up to the first of `ends` (or the line's end).
fn word_after<'a>(line: &'a str, marker: &str, ends: &[char]) -> Option<&'a str> {
    let rest = line[line.find(marker)? + marker.len()..].trim_start();
    let end = rest.find(ends).unwrap_or(rest.len());
    Some(rest[..end].trim_matches(['"', '\'', '`'])).filter(|w| !w.is_empty())
}

/// Libraries, classes and shared objects the image lacks, in Ruby's,
/// Java's, PHP's and the dynamic linker's words.
fn missing_dependency(line: &str, lower: &str) -> Option<Classified> {
    let (name, what, fix) = if let Some(lib) = word_after(line, "cannot load such file -- ", &[' '])
    {
        (
            lib.to_string(),
            format!("Ruby cannot load {lib:?}: it is not installed in the image."),
            "Add the gem to the Gemfile and install in the build command: build = \"bundle \
             install\" (bundle config set --local path vendor/bundle keeps it in /app)."
                .to_string(),
        )
    } else if lower.contains("bundler::gemnotfound") || lower.contains("in locally installed gems")
    {
        let gem = word_after(line, "Could not find ", &[' '])
            .unwrap_or("a gem")
            .to_string();
        (
            gem.clone(),
            format!("Bundler could not find {gem} among the installed gems."),
            "Install the Gemfile's gems in the build command: build = \"bundle install\" \
             (commit Gemfile.lock), and start with bundle exec."
                .to_string(),
        )
    } else if let Some(class) = word_after(line, "ClassNotFoundException: ", &[' ', ';'])
        .or_else(|| word_after(line, "NoClassDefFoundError: ", &[' ', ';']))
        .or_else(|| word_after(line, "Could not find or load main class ", &[' ']))
    {
        let class = class.replace('/', ".");
        (
            class.clone(),
            format!("Java cannot load the class {class}: it is not on the class path."),
            "Build a jar with its dependencies in the build command (e.g. mvn -q package \
             with the Spring Boot or shade plugin, or gradle bootJar / shadowJar) and start \
             it with java -jar; or list every jar in java -cp."
                .to_string(),
        )
    } else if lower.contains("no main manifest attribute") {
        let jar = line.rsplit(' ').next().unwrap_or("the jar").to_string();
        (
            "main manifest".to_string(),
            format!(
                "{jar} has no main manifest attribute: java -jar does not know its main class."
            ),
            "Build an executable jar (the Spring Boot plugin's repackage, or Main-Class in \
             the manifest), or start it with java -cp app.jar com.example.Main."
                .to_string(),
        )
    } else if lower.contains("vendor/autoload.php")
        && (lower.contains("failed to open stream") || lower.contains("failed opening required"))
    {
        (
            "vendor/autoload.php".to_string(),
            "PHP cannot load Composer's autoloader, vendor/autoload.php: the dependencies \
             are not installed."
                .to_string(),
            "Install them in the build command: build = \"composer install --no-dev \
             --optimize-autoloader\" (with composer.json and composer.lock in the source)."
                .to_string(),
        )
    } else if lower.contains("class ") && lower.contains("not found") && lower.contains("php") {
        let class = word_after(line, "Class ", &[' '])
            .unwrap_or("a class")
            .to_string();
        (
            class.clone(),
            format!("PHP cannot find the class {class}."),
            "Install the package that provides it with Composer in the build command \
             (build = \"composer install --no-dev\"), and require vendor/autoload.php; for \
             a class of your own, check its namespace and file name (PSR-4)."
                .to_string(),
        )
    } else if lower.contains("cannot open shared object file") {
        let lib = line
            .split([' ', ':'])
            .find(|w| w.contains(".so"))
            .unwrap_or("a shared library")
            .to_string();
        (
            lib.clone(),
            format!("The shared library {lib} is not in the image."),
            format!(
                "Install the Debian package that has it in the build command, e.g. build = \
                 \"apt-get update && apt-get install -y <package> && ...\" (apt-file search \
                 {lib} names it; libpq.so.5 is libpq5)."
            ),
        )
    } else {
        return None;
    };
    Some((FindingKind::MissingDependency, name, what, fix))
}

/// The variable that moves the cache a path belongs to.
fn cache_variable(path: &str) -> Option<&'static str> {
    if path.contains("huggingface") || path.contains("/transformers") {
        Some("HF_HOME")
    } else if path.contains("/.cache/pip") {
        Some("PIP_CACHE_DIR")
    } else if path.contains("/.npm") {
        Some("npm_config_cache")
    } else if path.contains("/.config/matplotlib") {
        Some("MPLCONFIGDIR")
    } else if path.contains("/.cache") {
        Some("XDG_CACHE_HOME")
    } else {
        None
    }
}

/// The first quoted or obvious path in an error line.
fn path_in(line: &str) -> Option<String> {
    // Ruby names its source location first: "app.rb:12:in `read': Permission
    // denied @ rb_sysopen - /app/x (Errno::EACCES)".
    if let Some(rest) = line.split_once(" @ rb_sysopen - ").map(|(_, r)| r) {
        let path = rest.split(' ').next().unwrap_or(rest);
        if path.starts_with('/') {
            return Some(path.to_string());
        }
    }
    // Python: "... : '/app/x'"; Node: "... open '/app/x'"; shells: "bash: /app/x: ..."
    if let Some(start) = line.find("'/") {
        let rest = &line[start + 1..];
        return rest.find('\'').map(|end| rest[..end].to_string());
    }
    // PHP: "file_put_contents(/var/www/x): Failed to open stream"
    line.split([' ', ':', ',', '(', ')'])
        .find(|w| w.starts_with('/') && w.len() > 1)
        .map(str::to_string)
}

/// A quoted name after `marker`, e.g. `No module named 'flask'`.
fn quoted_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = rest.trim_start();
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &rest[1..];
    rest.find(quote).map(|end| rest[..end].to_string())
}

type Classified = (FindingKind, String, String, String);

/// The rules, most specific first. `previous` is the context before
/// (lowercase lines; see `Diagnoser::previous`).
fn classify(line: &str, previous: &str, disks: Option<Disks>) -> Option<Classified> {
    let lower = line.to_ascii_lowercase();
    if is_error_field(&lower) {
        return None;
    }
    if let Some(c) = by_words(line, &lower) {
        // A persistent instance is never frozen: there, late heartbeats and
        // exports have another cause, which these words do not tell.
        let never_frozen = disks.is_some_and(|d| d.persistent);
        return Some(c).filter(|c| !(never_frozen && c.0 == FindingKind::BackgroundWorkStalled));
    }
    if let Some(c) = denied_call(&lower) {
        return Some(c);
    }
    if (lower.contains("no space left on device")
        || lower.contains("enospc")
        || lower.contains("disk quota exceeded")
        || lower.contains("edquot")
        || lower.contains("[errno 28]"))
        // Node's "ENOSPC: System limit for number of file watchers".
        && !lower.contains("watchers")
        // A database server's /dev/shm, quoted by its client.
        && !lower.contains("shared memory segment")
    {
        return Some(disk_full(line, disks));
    }
    let failed = lower.contains("error") || lower.contains("denied");
    if lower.contains("/dev/shm")
        || (lower.contains("semlock") && lower.contains("not implemented"))
        || (failed && previous.contains("semlock"))
    {
        return Some((
            FindingKind::SharedMemory,
            "/dev/shm".into(),
            "The service tried to use shared memory (/dev/shm), which Python's multiprocessing \
             (Lock, Queue, Pool) and some native libraries do."
                .into(),
            "Use pipes or sockets for communication between processes (e.g. \
             multiprocessing.Pipe, or a local socket), or threads instead of processes."
                .into(),
        ));
    }
    // Package managers run by the start command: what they install belongs
    // in the build.
    if let Some(tool) = package_install(&lower) {
        return Some(install_at_run_time(tool));
    }
    if let Some(call) = ["chown", "chmod", "chgrp"]
        .into_iter()
        .find(|c| lower.starts_with(&format!("{c}: changing ")))
    {
        return Some((
            FindingKind::RunUserPermission,
            call.into(),
            format!("The start command ran {call}, which the run user may not do here."),
            format!(
                "Set owners and modes in the build command, which runs as root and may change \
                 /app (e.g. build = \"... && {call} ...\"); at run time, files the service makes \
                 under /tmp are its own already."
            ),
        ));
    }
    if lower.contains("read-only file system")
        || lower.contains("erofs")
        // Java's exception names no path.
        || lower.contains("readonlyfilesystemexception")
    {
        let path = path_in(line);
        let name = path
            .as_deref()
            .and_then(|p| p.rsplit('/').next())
            .filter(|n| !n.is_empty())
            .unwrap_or("file")
            .to_string();
        let what = match &path {
            Some(p) => format!("The service tried to write {p}, outside /tmp."),
            None => "The service tried to write a file outside /tmp.".into(),
        };
        let p = path.as_deref().unwrap_or("");
        let fix = if let Some(variable) = cache_variable(p) {
            format!(
                "The library keeps a cache there: point it at /tmp in skiff.toml, e.g. [env] \
                 {variable} = \"/tmp/{name}\" (the cache goes with the instance), or fill it \
                 in the build command, which may write /app."
            )
        } else if p.contains("/staticfiles") || lower.contains("collectstatic") {
            // Django's collectstatic at start: it belongs in the build.
            "Collect static files in the build, which runs as root and may write /app: \
             build = \"... && python3 manage.py collectstatic --noinput\"."
                .to_string()
        } else if p.ends_with(".log") || p.contains("/log/") || p.contains("/logs/") {
            "Log to standard output or standard error instead (e.g. logging.basicConfig() \
             without a filename, or a StreamHandler): skiff keeps what the service prints \
             (skiff logs NAME). A file must be under /tmp, and goes with the instance."
                .to_string()
        } else {
            format!(
                "Write files under /tmp instead (e.g. /tmp/{name}); if they must survive the \
                 instance, keep them in a database or object storage, or use mode = \
                 \"persistent\"."
            )
        };
        return Some((
            FindingKind::ReadOnlyFileSystem,
            path.unwrap_or_default(),
            what,
            fix,
        ));
    }
    let denied = lower.contains("permission denied") || lower.contains("eacces");
    let about_a_socket = ["bind", "listen"]
        .iter()
        .any(|w| lower.contains(w) || previous.contains(&format!("{w}(")));
    // Ruby names its source location first ("binder.rb:334:in ...: Permission
    // denied - bind(2) for ..."): that path is no file the service wanted.
    let binding =
        lower.contains("bind(2)") || lower.contains("bind: ") || lower.contains("bindexception");
    if denied && about_a_socket && (binding || path_in(line).is_none()) {
        // The port is after the call (dates and source lines come before);
        // error numbers ("[Errno 13]", "errno: -13", "bind(2)") are not ports.
        let from = ["bind", "listen"]
            .iter()
            .filter_map(|w| lower.find(w))
            .min()
            .unwrap_or(0);
        let without_errno = lower[from..]
            .replace("bind(2)", "bind")
            .replace("errno ", "errno")
            .replace("errno: ", "errno");
        let port = without_errno
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.starts_with("errno"))
            .filter_map(|w| w.parse::<u32>().ok())
            .find(|p| (1..1024).contains(p));
        let what = match port {
            Some(p) => format!("The service tried to listen on port {p}, below 1024."),
            None => "The service was refused a privileged network operation (binding a port \
                     below 1024?)."
                .into(),
        };
        return Some((
            FindingKind::PrivilegedPort,
            port.map(|p| p.to_string()).unwrap_or_default(),
            what,
            "Listen on the port skiff passes in $PORT (set port = 8080 or another port from \
             1024 up in skiff.toml)."
                .into(),
        ));
    }
    if let Some(module) = quoted_after(line, "No module named") {
        let top = module.split('.').next().unwrap_or(&module).to_string();
        return Some((
            FindingKind::MissingPythonModule,
            top.clone(),
            format!("Python cannot import {top:?}: it is not installed in the image."),
            format!(
                "Install it in the build command: add {top} to requirements.txt and build with \
                 e.g. build = \"python3 -m venv .venv && .venv/bin/pip install -r \
                 requirements.txt\" (then start with .venv/bin/python)."
            ),
        ));
    }
    if let Some(module) = quoted_after(line, "Cannot find module") {
        let local = module.starts_with('.') || module.starts_with('/');
        let fix = if local {
            format!("Check the path {module}: it is not in the source that was deployed.")
        } else {
            format!(
                "Install it in the build command: add {module} to package.json's dependencies \
                 and build with build = \"npm install\" (or \"npm ci\")."
            )
        };
        return Some((
            FindingKind::MissingNodeModule,
            module.clone(),
            format!("Node cannot load the module {module:?}: it is not in the image."),
            fix,
        ));
    }
    if lower.contains("exec format error")
        || lower.contains("invalid elf header")
        || lower.contains("cannot execute binary file")
        || lower.contains("wrong elf class")
        // Java: "(Possible cause: can't load AARCH64 .so on a AMD 64 platform)"
        || lower.contains("possible cause: can't load")
    {
        // The library itself, where the line names one (Ruby names the
        // requiring file first); else the first path.
        let path = line
            .split([' ', ':', '(', ')', '\''])
            .find(|w| {
                w.starts_with('/') && [".so", ".node", ".bundle"].iter().any(|e| w.ends_with(e))
            })
            .map(str::to_string)
            .or_else(|| path_in(line));
        let native_module =
            path.as_deref().is_some_and(|p| p.ends_with(".node")) || lower.contains("node_modules");
        let python_package = path
            .as_deref()
            .is_some_and(|p| p.contains("site-packages") || p.contains("/.venv/"));
        let ruby_gem = path
            .as_deref()
            .is_some_and(|p| p.contains("/gems/") || p.contains("vendor/bundle"));
        let php_extension = lower.contains("php startup") || lower.contains("dynamic library");
        let fix = if ruby_gem {
            "Do not upload vendor/bundle made on another machine: leave it out with .gitignore \
             or .skiffignore and install in the build command (build = \"bundle install\"), \
             which compiles native gems for this machine."
                .to_string()
        } else if php_extension {
            "Install the extension for this machine in the build command, e.g. build = \
             \"apt-get update && apt-get install -y php-imagick\" (or pecl install), instead \
             of a .so copied from another machine."
                .to_string()
        } else if python_package {
            "Do not upload a virtualenv made on another machine: leave .venv out with \
             .gitignore or .skiffignore and make it in the build command (build = \"python3 \
             -m venv .venv && .venv/bin/pip install -r requirements.txt\"), which installs \
             wheels for this machine."
                .to_string()
        } else if native_module {
            "Do not upload node_modules: leave it out with .gitignore or .skiffignore and \
             install in the build command (build = \"npm ci\" or \"npm rebuild\"), which \
             builds native modules for this machine."
                .to_string()
        } else {
            "Build it in the build command (it runs on this machine), or upload one built \
             for linux/amd64 (e.g. GOOS=linux GOARCH=amd64 go build)."
                .to_string()
        };
        return Some((
            FindingKind::WrongArchitecture,
            path.clone().unwrap_or_default(),
            match path {
                Some(p) => format!("{p} is built for another processor than this machine's."),
                None => "A program is built for another processor than this machine's.".into(),
            },
            fix,
        ));
    }
    if let Some(c) = missing_dependency(line, &lower) {
        return Some(c);
    }
    // dash ("sh: 1: gunicorn: not found") and env ("env: 'node': No such
    // file or directory") say it their way.
    if (lower.starts_with("sh: ") || lower.starts_with("/bin/sh: "))
        && lower.ends_with(": not found")
    {
        let cmd = line
            .trim_end()
            .strip_suffix(": not found")
            .and_then(|l| l.rsplit(": ").next())
            .unwrap_or("the command")
            .to_string();
        return Some(command_not_found(cmd));
    }
    if lower.contains("env: '") && lower.contains("no such file or directory") {
        if let Some(cmd) = quoted_after(line, "env:") {
            return Some(command_not_found(cmd));
        }
    }
    if lower.contains("command not found")
        || lower.contains("no such file or directory") && lower.starts_with("bash: ")
    {
        // bash: line 1: gunicorn: command not found / bash: gunicorn: command not found
        let cmd = line
            .split(':')
            .map(str::trim)
            .rev()
            .nth(1)
            .unwrap_or("the command")
            .to_string();
        if cmd == "sudo" {
            return root_only("sudo", line);
        }
        if cmd == "python" {
            return Some((
                FindingKind::CommandNotFound,
                cmd,
                "The command \"python\" is not in the image: Debian's Python is python3.".into(),
                "Write python3 in the start command (or run from a virtualenv made in the \
                 build, whose .venv/bin/python exists)."
                    .into(),
            ));
        }
        return Some(command_not_found(cmd));
    }
    // apt at run time: as non-root, or on the read-only image.
    if lower.contains("are you root?")
        || lower.contains("could not open lock file")
        || lower.contains("not using locking for read only lock file")
        || lower.starts_with("e: unable to locate package")
    {
        return root_only("apt-get", line);
    }
    if lower.starts_with("sudo:") || lower.contains("sudo: ") {
        return root_only("sudo", line);
    }
    if denied {
        if let Some(path) = path_in(line).filter(|p| !p.starts_with("/tmp")) {
            return Some((
                FindingKind::RunUserPermission,
                path.clone(),
                format!("The service was denied access to {path}."),
                format!(
                    "Write under /tmp instead. If {path} was made by the build, it belongs to \
                     root: make it readable in the build (chmod a+rX), and keep anything the \
                     service writes under /tmp."
                ),
            ));
        }
    }
    None
}

/// The kernel features the system-call filter denies, as programs name
/// them when a call fails, and what the finding calls them.
const FILTERED: &[(&str, &str)] = &[
    ("namespace", "a new namespace"),
    ("unshare", "a new namespace"),
    ("clone", "a new namespace"),
    ("bwrap", "a new namespace"),
    ("io_uring", "io_uring"),
    ("userfaultfd", "userfaultfd"),
    ("keyctl", "the kernel keyring"),
    ("add_key", "the kernel keyring"),
    ("request_key", "the kernel keyring"),
    ("keyring", "the kernel keyring"),
    ("bpf", "eBPF"),
    ("perf_event_open", "perf events"),
    ("setns", "another namespace"),
];

/// A call the system-call filter denied, as the program reports it.
fn denied_call(lower: &str) -> Option<Classified> {
    if lower.contains("no usable sandbox") || lower.contains("failed to move to new namespace") {
        return Some((
            FindingKind::SyscallDenied,
            "chromium".into(),
            "Chromium could not start its own sandbox: it needs user namespaces, which \
             skiff's sandbox denies."
                .into(),
            "Start Chromium with --no-sandbox (Puppeteer: args: ['--no-sandbox']; \
             Playwright: chromiumSandbox: false): the instance is the sandbox."
                .into(),
        ));
    }
    if !(lower.contains("operation not permitted") || lower.contains("eperm")) {
        return None;
    }
    let (_, feature) = FILTERED.iter().find(|(word, _)| lower.contains(word))?;
    Some((
        FindingKind::SyscallDenied,
        feature.to_string(),
        format!("The service asked the kernel for {feature}, which skiff's sandbox denies."),
        format!(
            "Use the program's way to do without {feature} (most fall back by themselves; \
             look for an option that turns it off, e.g. a --no-sandbox flag for tools that \
             make their own sandbox). It cannot be allowed per service."
        ),
    ))
}

/// A write that failed for want of space: which disk was full follows from
/// the path the line names (`/tmp` or not) and the service's mode.
fn disk_full(line: &str, disks: Option<Disks>) -> Classified {
    let path = path_in(line);
    let in_tmp = path
        .as_deref()
        .map(|p| p == "/tmp" || p.starts_with("/tmp/"));
    let named = |limit: Option<u64>| limit.map(|n| format!(" ({})", format_size(n)));
    let tmp = named(disks.map(|d| d.tmp_size)).unwrap_or_default();
    let layer = named(disks.map(|d| d.disk)).unwrap_or_default();
    let persistent = disks.map(|d| d.persistent);
    let written = path
        .as_deref()
        .map(|p| format!(" (writing {p})"))
        .unwrap_or_default();
    let (subject, what, fix) = match (in_tmp, persistent) {
        (Some(true), _) | (None, Some(false)) => (
            "/tmp",
            format!("The service's /tmp is full{written}: it holds at most limits.tmp_size{tmp}."),
            "Delete temporary files once they are used, stream large data instead of \
             storing it, or raise [limits] tmp_size in skiff.toml."
                .to_string(),
        ),
        (Some(false), _) | (None, Some(true)) => (
            "disk",
            format!(
                "The service's writable layer is full{written}: a persistent service keeps at \
             most limits.disk{layer} of files outside /tmp."
            ),
            "Delete files the service no longer needs (old logs, caches), keep large data in \
             a database or object storage, or raise [limits] disk in skiff.toml and deploy \
             again (a new version starts with a new, empty writable layer)."
                .to_string(),
        ),
        (None, None) => (
            "",
            format!("A write failed for want of space{written}."),
            "Free space or raise the limit that applies in skiff.toml: [limits] tmp_size for \
             /tmp, [limits] disk for a persistent service's files."
                .to_string(),
        ),
    };
    (FindingKind::DiskFull, subject.into(), what, fix)
}

/// The package manager whose run-time install failed, in its own words.
fn package_install(lower: &str) -> Option<&'static str> {
    if lower.contains("could not install packages due to an oserror") {
        Some("pip")
    } else if lower.starts_with("npm error") || lower.starts_with("npm err!") {
        (lower.contains("erofs") || lower.contains("eacces")).then_some("npm")
    } else if lower.contains("gem::filepermissionerror") {
        Some("gem")
    } else if lower.contains("/vendor does not exist and could not be created") {
        Some("composer")
    } else {
        None
    }
}

/// A package install run by the start command.
fn install_at_run_time(tool: &str) -> Classified {
    (
        FindingKind::RootOnlyCommand,
        tool.into(),
        format!(
            "The start command ran {tool} to install packages: at run time the image is \
             read-only and the user is not root."
        ),
        format!(
            "Install in the build command, which runs as root and may write /app (e.g. build = \
             \"{}\"), and start the service with what it installed.",
            match tool {
                "pip" => "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
                "npm" => "npm ci",
                "gem" => "bundle install",
                _ => "composer install --no-dev",
            }
        ),
    )
}

fn root_only(tool: &str, _line: &str) -> Option<Classified> {
    Some((
        FindingKind::RootOnlyCommand,
        tool.into(),
        format!("The start command runs {tool}, which needs root."),
        "Install system packages in the build command, which runs as root (e.g. build = \
         \"apt-get update && apt-get install -y <package>\"), and start the service without \
         sudo."
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_log_lines_are_told_from_the_services_own_output() {
        for line in [
            r#"127.0.0.1 - - [29/Nov/2026 23:50:00] "GET / HTTP/1.1" 200 -"#,
            r#"INFO:     127.0.0.1:40000 - "POST /items HTTP/1.1" 201 Created"#,
            "GET /posts 200 3.123 ms - 2",
            "POST /db 500 12.002 ms - 35",
            "\u{1b}[0mGET /posts \u{1b}[32m200\u{1b}[0m 4.128 ms - 2\u{1b}[0m",
            r#"{"level":30,"time":1,"reqId":"req-1","res":{"statusCode":200},"responseTime":1.2,"msg":"request completed"}"#,
            "Completed 200 OK in 5ms (Views: 1.0ms | ActiveRecord: 0.2ms)",
            "Sent 200 in 3ms",
            r#""GET http://svc.localhost/ HTTP/1.1" from 127.0.0.1:5000 - 200 2B in 10.2µs"#,
            r#"10.0.0.1 - - [29/Nov/2026:23:50:00 +0000] "HEAD /kaithhealth HTTP/1.1" 404 0"#,
        ] {
            assert!(is_access_log(line), "{line}");
        }
        for line in [
            "Error: EROFS: read-only file system, open '/app/db.json'",
            "GET requests are cached for 200 seconds",
            "saved 3 records",
            "GET /",
            "Completed the nightly import",
            r#"{"level":50,"msg":"EROFS: read-only file system"}"#,
        ] {
            assert!(!is_access_log(line), "{line}");
        }
    }

    #[test]
    fn work_after_answering_is_explained_with_the_fix() {
        let mut d = Diagnoser::default();
        let f = d
            .observe_event(
                &EventKind::WorkAfterAnswer,
                "wrote \"OSError: [Errno 30] Read-only file system: '/app/db.json'\" after answering",
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(f.kind, FindingKind::WorkAfterAnswer);
        assert!(f.what.contains("after it had answered"), "{}", f.what);
        assert!(f.fix.contains("before sending the answer"), "{}", f.fix);
        assert!(f.evidence.contains("/app/db.json"), "{}", f.evidence);
    }

    #[test]
    fn finding_kinds_have_distinct_stable_names() {
        let mut names: Vec<&str> = FindingKind::ALL.iter().map(|k| k.as_str()).collect();
        // The names are the API's; they were the variants' names and stay so.
        assert_eq!(FindingKind::DiskFull.as_str(), "DiskFull");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FindingKind::ALL.len());
        for (i, kind) in FindingKind::ALL.iter().enumerate() {
            // In the enum's order: a kind left out of ALL shows as a gap.
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
    }

    #[test]
    fn one_node_error_object_is_one_finding() {
        let found = diagnose_lines([
            "Error: EROFS: read-only file system, open '/app/.~db.json'",
            "    at Object.openSync (node:fs:573:18) {",
            "  errno: -30,",
            "  code: 'EROFS',",
            "  syscall: 'open',",
            "  path: '/app/.~db.json'",
            "}",
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].what.contains("/app/.~db.json"), "{found:?}");
    }

    #[test]
    fn python_3_13_spreads_the_failing_call_over_lines() {
        let traceback = [
            "Traceback (most recent call last):",
            "  File \"/usr/lib/python3.13/multiprocessing/synchronize.py\", line 57, in __init__",
            "    sl = self._semlock = _multiprocessing.SemLock(",
            "                         ~~~~~~~~~~~~~~~~~~~~~~~~^",
            "        kind, value, maxvalue, self._make_name(),",
            "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
            "        unlink_now)",
            "        ^^^^^^^^^^^",
            "OSError: [Errno 30] Read-only file system",
        ];
        let found = diagnose_lines(traceback);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, FindingKind::SharedMemory);
        // The context ends with the traceback: a later unrelated error is
        // not taken for shared memory.
        let mut d = Diagnoser::default();
        for line in traceback {
            d.observe(line, SystemTime::now());
        }
        assert!(
            d.observe("ValueError: bad input", SystemTime::now())
                .is_none()
                && d.findings().all(|f| f.count == 1),
            "{:?}",
            d.findings().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_too_old_node_names_the_runtime_line() {
        for line in [
            "You are using Node.js 18.19.0. For Next.js, Node.js version \"^18.18.0 || ^19.8.0 \
             || >= 20.0.0\" is required.",
            "You are using Node.js 18.19.0. Vite requires Node.js version 20.19+ or 22.12+. \
             Please upgrade your Node.js version.",
            "npm ERR! notsup Required: {\"node\":\">=24\"}",
            "npm ERR! notsup Unsupported engine for x@1.0.0: wanted: {\"node\":\">=24\"} \
             (current: {\"node\":\"v22.11.0\",\"npm\":\"9.2.0\"})",
        ] {
            let found = diagnose_lines([line]);
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            assert_eq!(found[0].kind, FindingKind::RuntimeTooOld);
            assert!(found[0].fix.contains("runtime = \"node@24\""));
        }
    }

    #[test]
    fn fixes_fit_what_was_written() {
        let fix = |line: &str| {
            let found = diagnose_lines([line]);
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            found[0].fix.clone()
        };
        assert!(fix("bash: line 1: python: command not found").contains("python3"));
        assert!(
            fix("OSError: [Errno 30] Read-only file system: '/app/staticfiles/admin'")
                .contains("collectstatic --noinput")
        );
        assert!(
            fix("PermissionError: [Errno 30] Read-only file system: '/app/logs/app.log'")
                .contains("standard output")
        );
        assert!(
            fix("sqlite3.OperationalError: attempt to write a readonly database").contains("/tmp")
        );
        assert!(
            fix("sqlite3.OperationalError: unable to open database file").contains("persistent")
        );
        // Any other write keeps the general advice.
        assert!(
            fix("OSError: [Errno 30] Read-only file system: '/app/data.json'")
                .contains("/tmp/data.json")
        );
    }

    #[test]
    fn a_denied_kernel_call_is_named() {
        for (line, subject) in [
            (
                "unshare: unshare failed: Operation not permitted",
                "a new namespace",
            ),
            (
                "[0101/000000.000:FATAL:zygote_host_impl_linux.cc(127)] No usable sandbox! \
                 Update your kernel or see https://chromium.googlesource.com/...",
                "chromium",
            ),
            (
                "io_uring_setup() failed: Operation not permitted",
                "io_uring",
            ),
            (
                "keyctl_join_session_keyring: Operation not permitted",
                "the kernel keyring",
            ),
            (
                "bwrap: setting up uid map: Operation not permitted",
                "a new namespace",
            ),
        ] {
            let found = diagnose_lines([line]);
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            assert_eq!(found[0].kind, FindingKind::SyscallDenied, "{line}");
            assert!(found[0].what.contains(subject) || found[0].fix.contains("--no-sandbox"));
        }
        // A plain permission problem is not one.
        let found =
            diagnose_lines(["chown: changing ownership of '/app/x': Operation not permitted"]);
        assert!(
            found.iter().all(|f| f.kind != FindingKind::SyscallDenied),
            "{found:?}"
        );
    }

    #[test]
    fn a_full_disk_names_the_limit_that_applied() {
        let persistent = Disks {
            persistent: true,
            tmp_size: 512 << 20,
            disk: 16 << 20,
        };
        let serverless = Disks {
            persistent: false,
            ..persistent
        };
        let cases = [
            (
                "OSError: [Errno 28] No space left on device: '/app/big'",
                Some(persistent),
                "limits.disk (16MiB)",
            ),
            (
                "Error: ENOSPC: no space left on device, write",
                Some(persistent),
                "limits.disk (16MiB)",
            ),
            (
                "Error: ENOSPC: no space left on device, open '/tmp/upload.bin'",
                Some(persistent),
                "limits.tmp_size (512MiB)",
            ),
            (
                "write /tmp/cache/x: no space left on device",
                Some(serverless),
                "limits.tmp_size (512MiB)",
            ),
            (
                "dd: error writing 'out': No space left on device",
                Some(serverless),
                "tmp_size",
            ),
            (
                "cp: error writing '/var/lib/x': Disk quota exceeded",
                None,
                "limits.disk",
            ),
        ];
        for (line, disks, needle) in cases {
            let mut d = disks.map_or_else(Diagnoser::default, Diagnoser::with_disks);
            let found = d.observe(line, SystemTime::now()).cloned();
            let f = found.unwrap_or_else(|| panic!("nothing found in {line:?}"));
            assert_eq!(f.kind, FindingKind::DiskFull, "{line}");
            assert!(
                f.what.contains(needle) || f.fix.contains(needle),
                "{line}: {f}"
            );
        }
        // Not a disk: Node's inotify limit.
        let found = diagnose_lines([
            "Error: ENOSPC: System limit for number of file watchers reached, watch '/app'",
        ]);
        assert!(
            found.iter().all(|f| f.kind != FindingKind::DiskFull),
            "{found:?}"
        );
    }

    #[test]
    fn late_background_work_points_at_cpu_suspension() {
        for line in [
            "WARNING:apscheduler.executors.default:Run time of job \"tick (trigger: \
             interval[0:00:01])\" was missed by 0:00:02.004",
            "[2026-11-28 06:00:00 +0000] [7] [CRITICAL] WORKER TIMEOUT (pid:9)",
            "celery@web: missed heartbeat from worker1",
        ] {
            let found = diagnose_lines([line]);
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            assert_eq!(found[0].kind, FindingKind::BackgroundWorkStalled);
            assert!(found[0].fix.contains("persistent"));
        }
        assert!(diagnose_lines(["heartbeat ok", "job ran in 0.2s"]).is_empty());
    }

    #[test]
    fn an_error_number_is_not_taken_for_a_port() {
        let found = diagnose_lines([
            "    self.socket.bind(self.server_address)",
            "PermissionError: [Errno 13] Permission denied",
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, FindingKind::PrivilegedPort);
        assert!(!found[0].what.contains("13"), "{}", found[0].what);
        let node = diagnose_lines(["Error: listen EACCES: permission denied 0.0.0.0:80"]);
        assert!(node[0].what.contains("port 80"), "{}", node[0].what);
    }

    #[test]
    fn recognises_the_common_errors() {
        let cases: &[(&str, FindingKind, &str)] = &[
            (
                "OSError: [Errno 30] Read-only file system: '/app/data.txt'",
                FindingKind::ReadOnlyFileSystem,
                "/app/data.txt",
            ),
            (
                "Error: EROFS: read-only file system, open '/app/cache.json'",
                FindingKind::ReadOnlyFileSystem,
                "/app/cache.json",
            ),
            (
                "bash: line 1: /etc/motd: Read-only file system",
                FindingKind::ReadOnlyFileSystem,
                "/etc/motd",
            ),
            (
                "FileNotFoundError: [Errno 2] No such file or directory: '/dev/shm/sem.mp-1'",
                FindingKind::SharedMemory,
                "/dev/shm",
            ),
            (
                "OSError: [Errno 38] Function not implemented (SemLock)",
                FindingKind::SharedMemory,
                "",
            ),
            (
                "OSError: [Errno 30] Read-only file system",
                FindingKind::ReadOnlyFileSystem,
                "a file outside /tmp",
            ),
            (
                "PermissionError: [Errno 13] Permission denied: '/app/.venv/lib/x'",
                FindingKind::RunUserPermission,
                "/app/.venv/lib/x",
            ),
            (
                "Error: listen EACCES: permission denied 0.0.0.0:80",
                FindingKind::PrivilegedPort,
                "port 80",
            ),
            (
                "PermissionError: [Errno 13] Permission denied",
                FindingKind::PrivilegedPort,
                "below 1024",
            ),
            (
                "ModuleNotFoundError: No module named 'flask'",
                FindingKind::MissingPythonModule,
                "\"flask\"",
            ),
            (
                "Error: Cannot find module 'express'",
                FindingKind::MissingNodeModule,
                "\"express\"",
            ),
            (
                "bash: line 1: gunicorn: command not found",
                FindingKind::CommandNotFound,
                "\"gunicorn\"",
            ),
            ("bash: line 1: sudo: command not found", FindingKind::RootOnlyCommand, "sudo"),
            (
                "E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)",
                FindingKind::RootOnlyCommand,
                "apt-get",
            ),
            (
                "W: Not using locking for read only lock file /var/lib/dpkg/lock-frontend",
                FindingKind::RootOnlyCommand,
                "apt-get",
            ),
        ];
        // Python names the failing call on the line above its error; the
        // context line alone says nothing.
        let context = "    self.socket.bind(self.server_address)";
        for (line, kind, needle) in cases {
            let found = diagnose_lines([context, *line]);
            assert_eq!(found.len(), 1, "{line:?}: {found:?}");
            assert_eq!(found[0].kind, *kind, "{line:?}");
            let text = found[0].to_string();
            assert!(text.contains(needle), "{line:?} -> {text}");
            assert!(text.contains("why: ") && text.contains("fix: "), "{text}");
        }
    }

    #[test]
    fn multiprocessing_locks_are_shared_memory_even_without_a_path() {
        let traceback = [
            "    sl = self._semlock = _multiprocessing.SemLock(",
            "                         ^^^^^^^^^^^^^^^^^^^^^^^^^",
            "OSError: [Errno 30] Read-only file system",
        ];
        let found = diagnose_lines(traceback);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, FindingKind::SharedMemory);
        assert!(found[0].fix.contains("pipes or sockets"));
    }

    #[test]
    fn a_bare_permission_error_is_not_guessed_at() {
        assert!(diagnose_lines(["PermissionError: [Errno 13] Permission denied"]).is_empty());
    }

    #[test]
    fn healthy_output_has_no_findings() {
        for line in [
            "listening on 0.0.0.0:8080",
            "[2026-11-28 04:52:49 +0000] [2] [INFO] Booting worker with pid: 3",
            "127.0.0.1 \"GET /kaithhealth HTTP/1.1\" 200 -",
            "Serving HTTP on 0.0.0.0 port 8080 (http://0.0.0.0:8080/) ...",
            "wrote /tmp/cache.json",
        ] {
            assert!(diagnose_lines([line]).is_empty(), "{line:?}");
        }
    }

    #[test]
    fn each_finding_once_with_a_count() {
        let mut d = Diagnoser::default();
        let t = SystemTime::now();
        let line = "OSError: [Errno 30] Read-only file system: '/app/x'";
        assert!(d.observe(line, t).is_some());
        assert!(d.observe(line, t).is_none());
        assert!(d.observe(line, t).is_none());
        let all: Vec<_> = d.findings().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].count, 3);
        assert!(all[0].to_string().contains("seen 3 times"));
        // Another path is another finding.
        assert!(d
            .observe("OSError: [Errno 30] Read-only file system: '/app/y'", t)
            .is_some());
    }

    /// Lines that look like a rule's words but are someone else's: each
    /// gives the finding it should, or none, and not the row's.
    #[test]
    fn look_alike_lines_are_told_apart() {
        let kinds = |line| {
            diagnose_lines([line])
                .into_iter()
                .map(|f| (f.kind, f.what))
                .collect::<Vec<_>>()
        };
        // A client quoting the database server's shared memory: the
        // server's /dev/shm, not the instance's.
        assert_eq!(
            kinds(
                "org.postgresql.util.PSQLException: ERROR: could not resize shared memory \
                 segment \"/PostgreSQL.1\" to 8388608 bytes: No space left on device"
            ),
            vec![]
        );
        // SQLite on a full disk: the disk, not a read-only file.
        let found = kinds("open db: unable to open database file: no space left on device");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, FindingKind::DiskFull);
        // A thread limit is not the heap: no advice on -Xmx.
        assert_eq!(
            kinds(
                "java.lang.OutOfMemoryError: unable to create native thread: possibly out of \
                 memory or process/resource limits reached"
            ),
            vec![]
        );
        // "MemoryError" as a word, not a prefix of another name.
        assert_eq!(kinds("MemoryErrorHandler installed"), vec![]);
        assert_eq!(kinds("MemoryError")[0].0, FindingKind::OutOfMemory);
        // The heap's own words, out of Spring's brackets.
        let found = kinds(
            "Servlet.service() threw exception [Handler dispatch failed: \
             java.lang.OutOfMemoryError: Java heap space] with root cause",
        );
        assert_eq!(found[0].1, "The JVM ran out of memory: Java heap space");
    }

    /// A persistent instance is never frozen: a late heartbeat there is no
    /// suspension's doing.
    #[test]
    fn stalled_work_is_a_serverless_finding_only() {
        let line = "[WARNING] discord.gateway: Shard ID None heartbeat blocked for more than 10 \
                    seconds.";
        let disks = |persistent| Disks {
            persistent,
            tmp_size: 512 << 20,
            disk: 1 << 30,
        };
        let t = SystemTime::now();
        let mut serverless = Diagnoser::with_disks(disks(false));
        serverless.observe(line, t);
        let found: Vec<_> = serverless.findings().map(|f| f.kind).collect();
        assert_eq!(found, vec![FindingKind::BackgroundWorkStalled]);
        let mut persistent = Diagnoser::with_disks(disks(true));
        persistent.observe(line, t);
        assert_eq!(persistent.findings().count(), 0);
    }
}
