//! The runtime: images, instances, health checks, and the platform that
//! ties the sandbox and the gateway together. Both the `skiff` binary and
//! the end-to-end tests drive the platform through this crate.
//!
//! - `platform`: the running platform and its handle (start, shutdown,
//!   list, status); `deploy`, `restore` and `remove` add what they do to
//!   the handle.
//! - `table`: the services and the versions that serve; the gateway's
//!   `Router`.
//! - `context`: what services and deploys share (sandbox, records, events,
//!   upstreams, paths); it knows no service.
//! - `service`: one version's instances, scaled by `skiff_core::scaler`;
//!   `instance`: one instance's start and output; `health`: the check.
//! - `images`: base, layers, builds and their caches; `users`: per-service
//!   accounts.
#![forbid(unsafe_code)]

mod context;
mod deploy;
mod errors;
mod events;
pub mod health;
pub mod history;
mod images;
mod instance;
pub mod metrics;
mod platform;
mod remove;
mod requests;
mod restore;
mod service;
mod table;
pub mod users;

pub use errors::{DeployError, RemoveError};
pub use events::Event;
pub use images::build::BuildError;
pub use images::{base, image};
pub use instance::{environment, StartError};
pub use platform::{
    Deployed, Handle, InstanceCounts, LiveStatus, Platform, PlatformConfig, PlatformError,
    ServiceState,
};
pub use skiff_core::{diagnose, scaler, EventKind, Level, Phase, Phases, StartReport, Stream};
/// Removes a tree a tenant may have written, following no link (uploads,
/// layers); safe against trees nested deeper than any stack.
pub use skiff_sandbox::beneath::remove_tree;
/// The platform's records (`skiff_store`).
pub use skiff_store as store;
