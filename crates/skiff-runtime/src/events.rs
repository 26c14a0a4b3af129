//! What the platform reports while it works: the CLI renders these, tests
//! read them, and logs are written from them. (The pure parts, the phases
//! of a start and the recorded kinds, are `skiff_core::events`.)

use std::time::{Duration, SystemTime};

use skiff_core::{Phase, StartReport, Stream};
use skiff_sandbox::Exit;

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
