//! The JSON the control API speaks. `openapi.json` describes the same
//! shapes; a test keeps the two in step.

use serde::{Deserialize, Serialize};

/// Instances of a service by what they do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instances {
    pub running: usize,
    pub suspended: usize,
    pub starting: usize,
}

/// One service, as `skiff ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    /// `ready`, `deploying`, `failed` or `stopped`.
    pub state: String,
    pub url: String,
    /// `serverless` or `persistent` (of the serving version).
    pub mode: Option<String>,
    /// The version that serves.
    pub version: Option<i64>,
    pub instances: Instances,
    /// A version being deployed now.
    pub deploying: Option<i64>,
    /// Why nothing serves.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceSummary>,
}

/// A known error recognised in the service's output or the platform's
/// events: what happened, why, and what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: String,
    pub what: String,
    pub why: String,
    pub fix: String,
    /// The log line or event it was recognised in (the last one).
    pub evidence: String,
    pub count: u32,
    pub first_seen: String,
    pub last_seen: String,
}

/// One deploy of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub id: i64,
    /// `building`, `starting`, `ready`, `failed` or `replaced`.
    pub state: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// How long the build took (absent when the image was reused).
    pub build_ms: Option<u64>,
    /// The first start: the sandbox's part, then the service's own.
    pub sandbox_ms: Option<u64>,
    pub app_ms: Option<u64>,
}

/// Something the platform recorded about a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: String,
    /// `info` or `error`.
    pub level: String,
    pub kind: String,
    pub message: String,
}

/// One service in full, as `skiff status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    #[serde(flatten)]
    pub summary: ServiceSummary,
    pub start: Option<String>,
    pub build: Option<String>,
    pub port: Option<u16>,
    /// Replaced versions still answering requests they accepted.
    pub draining: usize,
    /// Newest first.
    pub versions: Vec<Version>,
    /// The newest errors the platform recorded, oldest first.
    pub recent_errors: Vec<Event>,
    pub findings: Vec<Finding>,
    /// The newest instance start, phase by phase.
    pub last_start: Option<Start>,
}

/// One instance start, phase by phase, in milliseconds from the request to
/// start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub instance: String,
    pub version: Option<i64>,
    pub at: String,
    pub sandbox_ready_ms: f64,
    pub process_started_ms: f64,
    pub port_listening_ms: f64,
    pub first_answer_ms: f64,
}

/// `skiff doctor`: every finding with its evidence, and where the time of
/// the last starts went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doctor {
    pub service: String,
    pub state: String,
    /// Newest first.
    pub findings: Vec<Finding>,
    /// Newest first.
    pub starts: Vec<Start>,
    /// How much was looked at: the service's stored log lines and events.
    pub log_lines: usize,
    pub events: usize,
    /// The version the findings are about: the serving one, else the last
    /// deployed. Earlier versions' output and events are not looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// A line of build or run output, or a note of the platform's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub id: i64,
    pub at: String,
    /// `build`, `run` or `platform`.
    pub source: String,
    pub stream: Option<String>,
    pub instance: Option<String>,
    pub version: Option<i64>,
    pub line: String,
}

/// One request through the gateway, as the request log has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLine {
    pub id: i64,
    /// When its head had been read.
    pub at: String,
    /// Its `x-request-id`: the client's, or one the gateway made; the
    /// service received it too.
    pub request_id: String,
    pub method: String,
    /// Path and query (cut at 512 bytes).
    pub path: String,
    pub status: u16,
    /// From its head to the answer's head.
    pub duration_ms: f64,
    pub bytes_in: u64,
    /// The answer body's length; absent for a streamed answer of
    /// unannounced length.
    pub bytes_out: Option<u64>,
    /// The instance that answered.
    pub instance: Option<String>,
    /// `cold` (an instance was started for it) or `thawed` (a suspended
    /// one was thawed); absent when the instance was running.
    pub wake: Option<String>,
    /// The gateway answered itself: why (its `x-skiff-error`).
    pub error: Option<String>,
}

/// One line of a deploy's progress stream (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeployMessage {
    /// The upload was unpacked and the manifest is valid.
    Accepted {
        service: String,
        files: u64,
        bytes: u64,
    },
    /// What the platform is doing.
    Progress { message: String },
    /// A line of build or start output.
    Log { source: String, line: String },
    /// The new version serves.
    Ready {
        version: i64,
        url: String,
        sandbox_ms: f64,
        app_ms: f64,
    },
    /// The deploy failed; what served before still serves.
    Failed {
        error: String,
        findings: Vec<Finding>,
        /// The version that still serves, if any.
        serving: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
}

/// Every error the API answers: what went wrong and what to do, and a
/// stable kind for scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub kind: String,
}

/// The answer to a rollback: the new version serving the earlier image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolledBack {
    pub version: i64,
    pub url: String,
}
