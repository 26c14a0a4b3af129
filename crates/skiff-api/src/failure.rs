//! Every error the control API answers, and the one place that says which
//! HTTP status and which `kind` each gets. Handlers return a [`Failure`];
//! the message (its `Display`) says what happened and what to do, and the
//! JSON is always `{"error": message, "kind": kind}`. No `Debug` output and
//! no ad-hoc status reaches the wire.

use http::StatusCode;
use skiff_runtime::store::StoreError;
use skiff_runtime::{DeployError, RemoveError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error(
        "missing or wrong API token: send `Authorization: Bearer <token>`; the token is in the \
         file api-token of the daemon's state directory (the skiff CLI on the same machine \
         reads it by itself when run as root)"
    )]
    Unauthorized,
    #[error("{method} is not allowed on {path}; see /openapi.json")]
    MethodNotAllowed { method: String, path: String },
    #[error("no such API path: {path}; see /openapi.json")]
    NotFound { path: String },
    #[error("no service named {0:?} is deployed here; `skiff ls` lists the services")]
    UnknownService(String),
    #[error(
        "a deploy of {service:?} is already in progress (version {version}); wait for it to \
         finish (skiff status {service}), then deploy again"
    )]
    DeployInProgress { service: String, version: i64 },
    #[error(transparent)]
    Remove(RemoveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    BadSince(String),
    #[error("tail must be a number of lines, e.g. tail=100")]
    BadTail,
    /// The manifest (or a setting that overrides it) is invalid.
    #[error("{0}")]
    Manifest(String),
    #[error("{0}")]
    BadArchive(String),
    #[error("the upload broke off ({0}); deploy again")]
    UploadInterrupted(String),
    #[error(
        "the source upload is larger than {} (the daemon's --max-upload); leave build outputs \
         and dependencies out with .gitignore or .skiffignore, or raise the limit",
        skiff_model::format_size(*max)
    )]
    UploadTooLarge { max: u64 },
    /// The daemon cannot use its own state directory.
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    BadVersion(String),
    /// A rollback that did not happen (the serving version still serves).
    #[error(transparent)]
    Rollback(DeployError),
}

impl Failure {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound { .. } | Self::UnknownService(_) => StatusCode::NOT_FOUND,
            Self::DeployInProgress { .. } => StatusCode::CONFLICT,
            Self::Remove(RemoveError::Unknown(_)) => StatusCode::NOT_FOUND,
            Self::Remove(RemoveError::DeployInProgress { .. }) => StatusCode::CONFLICT,
            Self::Remove(RemoveError::Store(_)) | Self::Store(_) | Self::State(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::BadSince(_)
            | Self::BadTail
            | Self::Manifest(_)
            | Self::BadArchive(_)
            | Self::UploadInterrupted(_) => StatusCode::BAD_REQUEST,
            Self::UploadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadVersion(_) => StatusCode::BAD_REQUEST,
            Self::Rollback(
                DeployError::NoRollback { .. }
                | DeployError::InProgress { .. }
                | DeployError::Removing { .. },
            ) => StatusCode::CONFLICT,
            Self::Rollback(DeployError::ShuttingDown) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rollback(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable name clients match on (`kind` in the JSON).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotFound { .. } => "not_found",
            Self::UnknownService(_) | Self::Remove(RemoveError::Unknown(_)) => "unknown_service",
            Self::DeployInProgress { .. } | Self::Remove(RemoveError::DeployInProgress { .. }) => {
                "deploy_in_progress"
            }
            Self::Remove(RemoveError::Store(_)) | Self::Store(_) => "store",
            Self::BadSince(_) => "bad_since",
            Self::BadTail => "bad_tail",
            Self::Manifest(_) => "manifest",
            Self::BadArchive(_) => "bad_archive",
            Self::UploadInterrupted(_) => "upload_interrupted",
            Self::UploadTooLarge { .. } => "upload_too_large",
            Self::State(_) => "state",
            Self::BadVersion(_) => "bad_version",
            Self::Rollback(DeployError::NoRollback { .. }) => "no_rollback",
            Self::Rollback(DeployError::InProgress { .. }) => "deploy_in_progress",
            Self::Rollback(DeployError::Removing { .. }) => "removing",
            Self::Rollback(DeployError::ShuttingDown) => "shutting_down",
            Self::Rollback(_) => "rollback_failed",
        }
    }
}

impl From<RemoveError> for Failure {
    fn from(e: RemoveError) -> Self {
        Self::Remove(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_status_and_kind() {
        let cases = [
            (Failure::Unauthorized, 401, "unauthorized"),
            (
                Failure::MethodNotAllowed {
                    method: "PUT".into(),
                    path: "/v1/services".into(),
                },
                405,
                "method_not_allowed",
            ),
            (Failure::NotFound { path: "/x".into() }, 404, "not_found"),
            (
                Failure::UnknownService("web".into()),
                404,
                "unknown_service",
            ),
            (
                Failure::Remove(RemoveError::Unknown("web".into())),
                404,
                "unknown_service",
            ),
            (
                Failure::Remove(RemoveError::DeployInProgress {
                    service: "web".into(),
                    version: 3,
                }),
                409,
                "deploy_in_progress",
            ),
            (
                Failure::DeployInProgress {
                    service: "web".into(),
                    version: 3,
                },
                409,
                "deploy_in_progress",
            ),
            (Failure::BadTail, 400, "bad_tail"),
            (Failure::Manifest("port".into()), 400, "manifest"),
            (
                Failure::UploadTooLarge { max: 1 << 20 },
                413,
                "upload_too_large",
            ),
            (Failure::State("disk".into()), 500, "state"),
            (Failure::BadVersion("x".into()), 400, "bad_version"),
            (
                Failure::Rollback(DeployError::NoRollback {
                    service: "web".into(),
                    reason: "no earlier version served".into(),
                }),
                409,
                "no_rollback",
            ),
            (
                Failure::Rollback(DeployError::ShuttingDown),
                503,
                "shutting_down",
            ),
        ];
        for (failure, status, kind) in cases {
            assert_eq!(failure.status().as_u16(), status, "{failure:?}");
            assert_eq!(failure.kind(), kind, "{failure:?}");
            assert!(!failure.to_string().is_empty());
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        assert!(Failure::UploadTooLarge { max: 1 << 20 }
            .to_string()
            .contains("1MiB"));
        assert!(Failure::DeployInProgress {
            service: "web".into(),
            version: 3
        }
        .to_string()
        .contains("skiff status web"));
        assert!(Failure::Unauthorized.to_string().contains("Bearer"));
    }
}
