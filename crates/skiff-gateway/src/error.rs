//! Answers the gateway makes itself.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Why the gateway answered instead of the service. The name is sent in
/// the `x-skiff-error` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request named no service or an unknown one (client side).
    UnknownService,
    /// The request has no usable Host header (client side).
    BadHost,
    /// The service has no healthy instance (platform side; retry later).
    Unavailable,
    /// The instance could not be reached or broke the exchange (upstream).
    UpstreamFailed,
    /// An upgrade (WebSocket) to a serverless service (client side).
    StreamingNeedsPersistent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownService => "unknown-service",
            Self::BadHost => "bad-host",
            Self::Unavailable => "service-unavailable",
            Self::UpstreamFailed => "upstream-failed",
            Self::StreamingNeedsPersistent => "streaming-needs-persistent",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::UnknownService => StatusCode::NOT_FOUND,
            Self::BadHost => StatusCode::BAD_REQUEST,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Self::StreamingNeedsPersistent => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A gateway-made answer: plain text, one line of reason, marked by header.
pub(crate) fn error_response(kind: ErrorKind, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = kind.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-skiff-error", HeaderValue::from_static(kind.as_str()));
    if kind == ErrorKind::Unavailable {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    resp
}
