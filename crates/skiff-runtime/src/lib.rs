//! The wiring: base image, instances, health checks, and the platform that
//! ties the sandbox and the gateway together. Both the `skiff` binary and
//! the end-to-end tests drive the platform through this crate.
#![forbid(unsafe_code)]

pub mod base;
mod build;
mod build_cache;
pub mod diagnose;
mod events;
pub mod health;
pub mod image;
mod instance;
mod platform;
pub mod scaler;
mod service;
pub mod store;
pub mod users;

pub use build::BuildError;
pub use events::{Event, Phase, Phases, StartReport, Stream};
pub use instance::{environment, StartError};
pub use platform::{
    DeployError, Deployed, Handle, InstanceCounts, LiveStatus, Platform, PlatformConfig,
    PlatformError, RemoveError, ServiceState,
};
/// Removes a tree a tenant may have written, following no link (uploads,
/// layers); safe against trees nested deeper than any stack.
pub use skiff_sandbox::beneath::remove_tree;
