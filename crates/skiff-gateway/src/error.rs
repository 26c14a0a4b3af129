//! Answers the gateway makes itself: plain text or JSON by the client's
//! `Accept`, always naming the cause or the limit that applied, always
//! marked with `x-skiff-error` so they are never taken for the service's own.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
pub use skiff_core::errors::{ErrorKind, Source};

/// The field that marks the gateway's own answers, with their kind.
const ERROR_HEADER: &str = "x-skiff-error";

/// The HTTP status of a gateway answer of `kind` (the kinds, their names
/// and who causes them are `skiff_core::errors`).
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::UnknownService => StatusCode::NOT_FOUND,
        ErrorKind::BadHost | ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Unavailable | ErrorKind::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::UpstreamFailed | ErrorKind::ResponseTooLarge => StatusCode::BAD_GATEWAY,
        // the README: a request past the request timeout gets 504.
        ErrorKind::RequestTimeout | ErrorKind::BodyTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::StreamingNeedsPersistent => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
    }
}

/// Something that may have caused a gateway failure (an I/O error, hyper's,
/// the instance's exit).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the gateway answered a request itself: what kind of failure (its
/// status and `x-skiff-error` name), the sentence the client reads, who
/// caused it, whether a retry may succeed, and what underlying error led
/// to it, when there was one (kept for logs and `Error::source`, never
/// shown to the client).
pub struct Failure {
    kind: ErrorKind,
    message: String,
    cause: Option<Cause>,
}

impl Failure {
    /// A failure of `kind`, told to the client as `message`; who caused
    /// it and whether a retry is safe follow from the kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            cause: None,
        }
    }

    /// The same failure, caused by `cause`.
    pub fn because(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The sentence the client reads.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Who caused it (as its kind says).
    pub fn source(&self) -> Source {
        self.kind.source()
    }

    /// Whether sending the same request again may succeed (as its kind
    /// says).
    pub fn retryable(&self) -> bool {
        self.kind.retryable()
    }

    /// The underlying error, when there was one.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }

    /// The answer to the client (`error_response`).
    pub(crate) fn answer(&self, json: bool) -> Response<Body> {
        error_response(self, json)
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failure")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source())
            .field("retryable", &self.retryable())
            .field("cause", &self.cause)
            .finish()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Whether the client asked for JSON rather than text.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("json"))
}

/// A gateway-made answer: one line of reason (or a JSON object), marked by header.
fn error_response(failure: &Failure, json: bool) -> Response<Body> {
    let (kind, message) = (failure.kind, failure.message.as_str());
    let (body, content_type) = if json {
        let source = match failure.source() {
            Source::Client => "client",
            Source::Platform => "platform",
            Source::Upstream => "upstream",
        };
        let value = serde_json::json!({
            "error": kind.as_str(),
            "status": status(kind).as_u16(),
            "message": message,
            "source": source,
            "retryable": failure.retryable(),
        });
        (format!("{value}\n"), "application/json")
    } else {
        (format!("{message}\n"), "text/plain; charset=utf-8")
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status(kind);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(ERROR_HEADER, HeaderValue::from_static(kind.as_str()));
    // For the gateway's own counting: an extension never reaches the wire,
    // and no service's answer can carry one (its header could).
    resp.extensions_mut().insert(kind);
    let h = resp.headers_mut();
    if matches!(kind, ErrorKind::Unavailable | ErrorKind::TooManyConnections) {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    if kind == ErrorKind::ConnectNotSupported {
        // RFC 9110 §15.5.6: a 405 says which methods are allowed.
        h.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),
        );
    }
    if matches!(
        kind,
        ErrorKind::BadRequest | ErrorKind::ConnectNotSupported | ErrorKind::TooManyConnections
    ) {
        // After an ambiguous request the connection's framing is unknown;
        // a CONNECT client may already send what it meant to tunnel.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_or_json_by_accept() {
        let mut h = HeaderMap::new();
        assert!(!wants_json(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(wants_json(&h));

        let r = Failure::new(ErrorKind::ResponseTooLarge, "too big").answer(true);
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["x-skiff-error"], "response-too-large");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = Failure::new(ErrorKind::RequestTimeout, "slow").answer(false);
        assert_eq!(r.status(), 504);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn a_failure_keeps_its_cause_and_answers_as_its_kind() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let failure =
            Failure::new(ErrorKind::UpstreamFailed, "Service \"a\" broke off.").because(io);
        assert_eq!(failure.kind(), ErrorKind::UpstreamFailed);
        assert_eq!(failure.source(), Source::Upstream);
        assert!(failure.retryable());
        assert_eq!(
            failure.to_string(),
            "upstream-failed: Service \"a\" broke off."
        );
        let cause = std::error::Error::source(&failure).map(|c| c.to_string());
        assert_eq!(cause.as_deref(), Some("reset by peer"));
        assert!(failure.cause().is_some());

        let plain = Failure::new(ErrorKind::BadHost, "no host");
        assert!(std::error::Error::source(&plain).is_none());
        let r = plain.answer(false);
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-skiff-error"], "bad-host");
    }

    #[test]
    fn every_kind_has_a_status_source_and_name() {
        for kind in ErrorKind::ALL {
            assert!(status(kind).as_u16() >= 400, "{kind:?}");
            assert!(!kind.as_str().is_empty());
            let _ = kind.source();
        }
        assert!(ErrorKind::Unavailable.retryable());
        assert!(!ErrorKind::ResponseTooLarge.retryable());
    }
}
