//! What the platform reports while it works: the CLI renders these, tests
//! read them, and logs are written from them.

use std::time::{Duration, SystemTime};

use skiff_sandbox::Exit;

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Whether output came from a build or from a running instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Build,
    Run,
}

/// Where the time of one instance start went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartReport {
    /// From the request to start until the start command was executed: the
    /// sandbox's own cost (namespaces, mounts, cgroups, dropping privileges).
    pub sandbox: Duration,
    /// From then until the first answer to the health check: the service's
    /// own start time.
    pub app: Duration,
    /// The same start, phase by phase.
    pub phases: Phases,
}

/// When each phase of a start was reached, counted from the request to
/// start: a slow start shows where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases {
    /// Namespaces made, cgroups joined.
    pub sandbox_ready: Duration,
    /// The start command was executed.
    pub process_started: Duration,
    /// The port took its first connection.
    pub port_listening: Duration,
    /// The first HTTP answer to the health check.
    pub first_answer: Duration,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// A line of output while the base image is being prepared.
    BaseImage { line: String },
    /// The base image is there; `built_in` is `None` when it was cached.
    BaseImageReady { built_in: Option<Duration> },
    /// The build command of `service` started.
    BuildStarted { service: String },
    /// The build finished (or was found in the cache: `elapsed` is `None`).
    BuildFinished {
        service: String,
        elapsed: Option<Duration>,
        /// Bytes the build wrote (`None` when the image was reused).
        written: Option<u64>,
        /// Bytes in the build's layer, after caches were dropped.
        layer_size: u64,
    },
    /// An instance of `service` is being started.
    Starting { service: String, instance: String },
    /// A line the service (or its build) wrote.
    Log {
        service: String,
        phase: Phase,
        stream: Stream,
        line: String,
        at: SystemTime,
    },
    /// The service answers and receives traffic at `url`.
    Ready {
        service: String,
        url: String,
        report: StartReport,
    },
    /// The service could not be started; `reason` says why and what to do.
    Failed { service: String, reason: String },
    /// Another instance was started (scale out, or from zero).
    InstanceStarted {
        service: String,
        instance: String,
        report: StartReport,
    },
    /// An idle instance was stopped (scale down, or to zero).
    InstanceStopped { service: String, instance: String },
    /// A running instance ended by itself.
    Exited {
        service: String,
        instance: String,
        exit: Exit,
    },
}
