//! Why a deploy or a removal failed, each in words that say what to do.

use std::path::PathBuf;

use skiff_store::StoreError;

use crate::images::base::BaseImageError;
use crate::images::build::{self, BuildError};
use crate::instance::StartError;

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    BaseImage(#[from] BaseImageError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot prepare the writable layer {dir} of the persistent service: {source}")]
    Writable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot snapshot the source directory {dir}: {source}")]
    Source {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a deploy of {service:?} is already in progress (version {version}); wait for it to \
         finish (skiff status {service}), then deploy again"
    )]
    InProgress { service: String, version: i64 },
    #[error("{service:?} is being removed; deploy it again once `skiff rm` has finished")]
    Removing { service: String },
    #[error("cannot roll {service:?} back: {reason}")]
    NoRollback { service: String, reason: String },
    #[error(
        "the image of version {version} is missing ({path}); deploy the service again to \
         rebuild it"
    )]
    ImageMissing { version: i64, path: PathBuf },
    #[error("cannot mount the disk of the service's image: {source}; deploy it again")]
    ImageDisk { source: std::io::Error },
    /// The platform's own step, not the service's build: no setting of the
    /// service's is to blame.
    #[error(
        "skiff could not make the {runtime} runtime the service asks for ({command}, from \
         the npm registry); check that the host reaches registry.npmjs.org and deploy \
         again. What happened: {}",
        build::platform_step_failure(source)
    )]
    Runtime {
        runtime: String,
        command: String,
        source: BuildError,
    },
    #[error("the platform is shutting down")]
    ShuttingDown,
}

impl DeployError {
    /// The service's own output the error quotes (its build's or its
    /// start's last lines), for the troubleshooter; none when the failure
    /// is the platform's.
    pub fn output(&self) -> &[String] {
        match self {
            Self::Build(e) => e.output(),
            Self::Start(e) => e.output(),
            // The platform's own step: its output is no finding of the service's.
            Self::Runtime { .. }
            | Self::BaseImage(_)
            | Self::Store(_)
            | Self::Writable { .. }
            | Self::Source { .. }
            | Self::InProgress { .. }
            | Self::Removing { .. }
            | Self::NoRollback { .. }
            | Self::ImageMissing { .. }
            | Self::ImageDisk { .. }
            | Self::ShuttingDown => &[],
        }
    }
}

/// Why a service could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no service named {0:?} is deployed here; `skiff ls` lists the services")]
    Unknown(String),
    #[error(
        "a deploy of {service:?} is in progress (version {version}); wait for it to finish, \
         then remove the service"
    )]
    DeployInProgress { service: String, version: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}
