//! The wiring: base image, instances, health checks, and the platform that
//! ties the sandbox and the gateway together. Both the `skiff` binary and
//! the end-to-end tests drive the platform through this crate.
#![forbid(unsafe_code)]

pub mod base;
mod events;
pub mod health;
mod instance;
mod platform;

pub use events::{Event, StartReport, Stream};
pub use instance::{environment, StartError};
pub use platform::{DeployError, Deployed, Platform, PlatformConfig, PlatformError};
