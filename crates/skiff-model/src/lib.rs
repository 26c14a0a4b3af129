//! The service manifest (`skiff.toml`) and the domain types every other crate speaks.
//!
//! Nothing here touches the kernel, the network or the disk beyond reading the
//! manifest file: it is pure parsing and validation, so every rule a user can
//! break is tested here without root.
#![forbid(unsafe_code)]

mod manifest;
mod name;
mod units;

pub use manifest::{
    detect_start, load, parse, parse_with, read_source_file, streaming_hint, Limits, ManifestError,
    Mode, Overrides, Problem, ServiceSpec, SourceFacts,
};
pub use name::{ServiceName, ServiceNameError};
pub use units::{format_amount, format_duration, format_size, parse_duration, parse_size};

/// The file name skiff reads at the root of a source directory.
pub const MANIFEST_FILE: &str = "skiff.toml";

/// The port a service listens on when neither the manifest nor the command line says.
pub const DEFAULT_PORT: u16 = 8080;
