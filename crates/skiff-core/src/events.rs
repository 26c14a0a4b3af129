//! What the platform reports and records: the phases of a start, the
//! streams of output, and the kinds of recorded events with their stable
//! names (the names are stored; one mapping turns them into kinds and back).

use std::time::Duration;

use crate::errors::ErrorKind;

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

/// How bad a recorded event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Error => "error",
        }
    }
}

/// What a recorded event of a service is about. Stored as [`as_str`]'s
/// stable name and read back with [`parse`]; the troubleshooter's rules
/// match on these, never on the names.
///
/// [`as_str`]: EventKind::as_str
/// [`parse`]: EventKind::parse
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    DeployStarted,
    Deployed,
    DeployFailed,
    /// A recorded version serves again after the platform's restart.
    Restored,
    RestoreFailed,
    /// A replaced version still had requests in flight when it stopped.
    DrainTimeout,
    /// A shared runtime layer (e.g. Node.js) is being made.
    RuntimeMade,
    InstanceStarted,
    InstanceStopped,
    /// An instance ended by itself.
    InstanceExited,
    /// A start whose port was never listened to.
    PortNotListening,
    /// A start whose port took connections but gave no HTTP answer.
    NoHttpAnswer,
    /// The kernel killed the service for its memory limit.
    OomKill,
    /// The service wrote output while it had no request: after answering,
    /// with its CPU suspended until the next request.
    WorkAfterAnswer,
    /// The gateway answered a request itself, under its own name for why.
    Refused(ErrorKind),
    /// A name this version of skiff does not know (recorded by a newer one).
    Other(String),
}

/// The platform's own kinds (all but refusals and unknown names).
const PLATFORM_KINDS: [EventKind; 14] = [
    EventKind::DeployStarted,
    EventKind::Deployed,
    EventKind::DeployFailed,
    EventKind::Restored,
    EventKind::RestoreFailed,
    EventKind::DrainTimeout,
    EventKind::RuntimeMade,
    EventKind::InstanceStarted,
    EventKind::InstanceStopped,
    EventKind::InstanceExited,
    EventKind::PortNotListening,
    EventKind::NoHttpAnswer,
    EventKind::OomKill,
    EventKind::WorkAfterAnswer,
];

impl EventKind {
    /// The stable name the event is stored (and shown) under. Refusals
    /// keep the gateway's own names (`x-skiff-error`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::DeployStarted => "deploy_started",
            Self::Deployed => "deployed",
            Self::DeployFailed => "deploy_failed",
            Self::Restored => "restored",
            Self::RestoreFailed => "restore_failed",
            Self::DrainTimeout => "drain_timeout",
            Self::RuntimeMade => "runtime",
            Self::InstanceStarted => "instance_started",
            Self::InstanceStopped => "instance_stopped",
            Self::InstanceExited => "instance_exited",
            Self::PortNotListening => "port-not-listening",
            Self::NoHttpAnswer => "no-http-answer",
            Self::OomKill => "oom-kill",
            Self::WorkAfterAnswer => "work-after-answer",
            Self::Refused(kind) => kind.as_str(),
            Self::Other(name) => name,
        }
    }

    /// The kind stored under `name`; a name no kind has is kept as
    /// [`EventKind::Other`].
    pub fn parse(name: &str) -> Self {
        if let Some(kind) = PLATFORM_KINDS.iter().find(|k| k.as_str() == name) {
            return kind.clone();
        }
        match ErrorKind::ALL.iter().find(|k| k.as_str() == name) {
            Some(kind) => Self::Refused(*kind),
            None => Self::Other(name.to_string()),
        }
    }

    /// How bad an event of this kind is.
    pub fn level(&self) -> Level {
        match self {
            Self::DeployFailed
            | Self::RestoreFailed
            | Self::InstanceExited
            | Self::PortNotListening
            | Self::NoHttpAnswer
            | Self::OomKill
            | Self::Refused(_) => Level::Error,
            Self::DeployStarted
            | Self::Deployed
            | Self::Restored
            | Self::DrainTimeout
            | Self::RuntimeMade
            | Self::InstanceStarted
            | Self::InstanceStopped
            | Self::WorkAfterAnswer
            | Self::Other(_) => Level::Info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_stored_name() {
        let all: Vec<EventKind> = PLATFORM_KINDS
            .iter()
            .cloned()
            .chain(ErrorKind::ALL.iter().map(|k| EventKind::Refused(*k)))
            .collect();
        for kind in &all {
            assert_eq!(EventKind::parse(kind.as_str()), *kind, "{kind:?}");
        }
        let mut names: Vec<&str> = all.iter().map(EventKind::as_str).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "two kinds share a stored name");
    }

    #[test]
    fn refusals_are_stored_under_the_gateways_names() {
        assert_eq!(
            EventKind::Refused(ErrorKind::RequestTimeout).as_str(),
            ErrorKind::RequestTimeout.as_str()
        );
        assert_eq!(
            EventKind::parse("request-timeout"),
            EventKind::Refused(ErrorKind::RequestTimeout)
        );
    }

    #[test]
    fn unknown_names_are_kept_not_lost() {
        let kind = EventKind::parse("from-a-newer-skiff");
        assert_eq!(kind, EventKind::Other("from-a-newer-skiff".into()));
        assert_eq!(kind.as_str(), "from-a-newer-skiff");
        assert_eq!(kind.level(), Level::Info);
    }

    #[test]
    fn failures_are_errors() {
        assert_eq!(EventKind::DeployFailed.level(), Level::Error);
        assert_eq!(EventKind::OomKill.level(), Level::Error);
        assert_eq!(
            EventKind::Refused(ErrorKind::UpstreamFailed).level(),
            Level::Error
        );
        assert_eq!(EventKind::Deployed.level(), Level::Info);
    }
}
