//! Why the gateway answers a request itself instead of the service: the
//! kinds, their stable names (the `x-skiff-error` header, JSON errors, the
//! recorded events the troubleshooter reads), who causes each and whether
//! a retry may succeed. The HTTP statuses are the gateway's
//! (`skiff_gateway::status`).

/// Why the gateway answered instead of the service. The name is sent in
/// the `x-skiff-error` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request named no service or an unknown one (client side).
    UnknownService,
    /// The request has no usable Host header (client side).
    BadHost,
    /// The request is malformed or ambiguous (client side).
    BadRequest,
    /// The request body is over the service's limit (client side).
    RequestTooLarge,
    /// The service has no healthy instance (platform side; retry later).
    Unavailable,
    /// The instance could not be reached or broke the exchange (upstream).
    UpstreamFailed,
    /// The service's response is over the limit (upstream).
    ResponseTooLarge,
    /// The service did not answer within the request timeout (upstream).
    RequestTimeout,
    /// The client did not send the request's body within the request
    /// timeout (client side; the service never saw the request).
    BodyTimeout,
    /// An upgrade (WebSocket) to a serverless service (client side).
    StreamingNeedsPersistent,
    /// A `CONNECT` request: the gateway is no forward proxy (client side).
    ConnectNotSupported,
    /// A connection over the gateway's caps, per client address or in
    /// total (platform side; retry later).
    TooManyConnections,
}

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Platform,
    Upstream,
}

impl ErrorKind {
    /// Every kind, in the order of the enum.
    pub const ALL: [ErrorKind; 12] = [
        Self::UnknownService,
        Self::BadHost,
        Self::BadRequest,
        Self::RequestTooLarge,
        Self::Unavailable,
        Self::UpstreamFailed,
        Self::ResponseTooLarge,
        Self::RequestTimeout,
        Self::BodyTimeout,
        Self::StreamingNeedsPersistent,
        Self::ConnectNotSupported,
        Self::TooManyConnections,
    ];

    /// The kind's stable name: in `x-skiff-error`, in JSON errors, and in
    /// the platform's recorded events (the troubleshooter's rules name
    /// these, through this function, not copies of the strings).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownService => "unknown-service",
            Self::BadHost => "bad-host",
            Self::BadRequest => "bad-request",
            Self::RequestTooLarge => "request-too-large",
            Self::Unavailable => "service-unavailable",
            Self::UpstreamFailed => "upstream-failed",
            Self::ResponseTooLarge => "response-too-large",
            Self::RequestTimeout => "request-timeout",
            Self::BodyTimeout => "request-body-timeout",
            Self::StreamingNeedsPersistent => "streaming-needs-persistent",
            Self::ConnectNotSupported => "connect-not-supported",
            Self::TooManyConnections => "too-many-connections",
        }
    }

    pub fn source(self) -> Source {
        match self {
            Self::UnknownService
            | Self::BadHost
            | Self::BadRequest
            | Self::RequestTooLarge
            | Self::BodyTimeout
            | Self::StreamingNeedsPersistent
            | Self::ConnectNotSupported => Source::Client,
            Self::Unavailable | Self::TooManyConnections => Source::Platform,
            Self::UpstreamFailed | Self::ResponseTooLarge | Self::RequestTimeout => {
                Source::Upstream
            }
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::UpstreamFailed | Self::TooManyConnections
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_in_order_with_its_own_name() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            // A kind left out of ALL shows as a gap in the order.
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
        let mut names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn only_what_may_pass_is_retryable() {
        assert!(ErrorKind::Unavailable.retryable());
        assert!(ErrorKind::TooManyConnections.retryable());
        assert!(!ErrorKind::ResponseTooLarge.retryable());
        assert_eq!(ErrorKind::RequestTimeout.source(), Source::Upstream);
        assert_eq!(ErrorKind::BodyTimeout.source(), Source::Client);
    }
}
