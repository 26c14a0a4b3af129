//! What the gateway asks the platform: where does this Host go?

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

/// A boxed connect future, so the platform can hide how it reaches an
/// instance (here: a socket made inside the instance's network namespace).
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Why an instance failed, once known (it may take a moment to learn).
pub type FailureFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// Opens a new connection to one instance.
pub trait Connect: Send + Sync + 'static {
    fn connect(&self) -> ConnectFuture;

    /// When a request to the instance broke: did the instance end, and how?
    /// Used to name the exit in the 502 answer.
    fn failure(&self) -> FailureFuture {
        Box::pin(async { None })
    }
}

/// The right to send one request to one instance. The platform counts the
/// request as in flight until the lease is dropped, which the gateway does
/// when the response has been sent (or the client went away).
pub struct Lease {
    pub upstream: Upstream,
    /// What the request waited for to get this instance.
    pub wake: Wake,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl Lease {
    /// `guard` is dropped when the request is over.
    pub fn new(upstream: Upstream, guard: impl std::any::Any + Send + Sync) -> Self {
        Self {
            upstream,
            wake: Wake::Warm,
            _guard: Box::new(guard),
        }
    }

    /// The request waited for the instance to start or thaw.
    pub fn woke(mut self, wake: Wake) -> Self {
        self.wake = wake;
        self
    }
}

/// What a request's instance had to do before it could take it: what the
/// request log says of each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wake {
    /// It was running.
    #[default]
    Warm,
    /// It was suspended, and thawed for the request.
    Thawed,
    /// It was started for the request (the request was its first).
    Cold,
}

impl Wake {
    /// Its name in records: `None` for a warm instance.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Self::Warm => None,
            Self::Thawed => Some("thawed"),
            Self::Cold => Some("cold"),
        }
    }
}

/// A route that is not known yet: an instance is starting or thawing.
pub type RouteFuture = Pin<Box<dyn Future<Output = Route> + Send>>;

/// The rules of the exchange with one service (docs/contract.md §2). `None`
/// means no limit: persistent services stream and take their time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExchangeLimits {
    /// A request unanswered after this gets 504.
    pub request_timeout: Option<Duration>,
    /// A response body over this many bytes gets 502. With a limit the
    /// response is received whole (up to the limit) before it is sent on.
    pub max_response: Option<u64>,
    /// A request body over this many bytes gets 413.
    pub max_request: Option<u64>,
}

/// One instance the gateway may send a request to.
#[derive(Clone)]
pub struct Upstream {
    /// Unique per instance; connections are pooled by it. Shared, as the
    /// upstream is cloned for every request.
    pub key: Arc<str>,
    pub connect: Arc<dyn Connect>,
    pub limits: ExchangeLimits,
}

/// The platform's answer for one service name.
pub enum Route {
    /// Forward to this healthy instance.
    Instance(Lease),
    /// Wait for the answer (the client sees only latency).
    Wait(RouteFuture),
    /// No service of that name; the list of those that exist.
    Unknown { deployed: Vec<String> },
    /// The service exists but cannot serve; why, in a sentence.
    Unavailable { reason: String },
}

/// Implemented by the platform; called once per request, so it must be cheap.
pub trait Router: Send + Sync + 'static {
    fn route(&self, service: &str) -> Route;
    /// The upstream registered under `key`, for opening new pooled connections.
    fn upstream(&self, key: &str) -> Option<Upstream>;
    /// Whether the service takes long-lived connections (WebSocket and other
    /// upgrades): only persistent services do. `None` when the service is not
    /// ready (unknown, starting, failed): routing will say why.
    fn allows_streaming(&self, service: &str) -> Option<bool>;
    /// Whether `service` is deployed here (serving, starting or failed):
    /// what the gateway counts under its name.
    fn exists(&self, service: &str) -> bool {
        self.allows_streaming(service).is_some()
    }
    /// The gateway answered a request for `service` itself (a limit or a
    /// broken exchange): the platform may record it for diagnosis.
    fn refused(&self, _service: &str, _kind: crate::ErrorKind, _message: &str) {}
    /// The exchange rules of the service's serving version, when it has
    /// one: the gateway receives a serverless request's body before it
    /// takes an instance, so a slow upload holds no instance's slot.
    fn limits(&self, _service: &str) -> Option<ExchangeLimits> {
        None
    }
}

/// The service name in a Host header, when the host is `NAME.<domain>` with
/// or without a port. Case does not matter in host names.
pub fn host_to_service<'h>(host: &'h str, domain: &str) -> Option<&'h str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let (name, rest) = host.split_once('.')?;
    (rest.eq_ignore_ascii_case(domain) && !name.is_empty()).then_some(name)
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.upstream)
            .field("wake", &self.wake)
            .finish()
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("key", &self.key)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Instance(lease) => f.debug_tuple("Instance").field(lease).finish(),
            Self::Wait(_) => f.write_str("Wait"),
            Self::Unknown { deployed } => f
                .debug_struct("Unknown")
                .field("deployed", deployed)
                .finish(),
            Self::Unavailable { reason } => f
                .debug_struct("Unavailable")
                .field("reason", reason)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let cases = [
            ("hello.localhost", Some("hello")),
            ("hello.localhost:8000", Some("hello")),
            ("hello.LOCALHOST:8000", Some("hello")),
            ("hello.localhost.", Some("hello")),
            ("localhost:8000", None),
            ("a.b.localhost", None),
            (".localhost", None),
            ("hello.example.com", None),
            ("", None),
        ];
        for (host, want) in cases {
            assert_eq!(host_to_service(host, "localhost"), want, "{host:?}");
        }
        assert_eq!(host_to_service("x.apps.test:1", "apps.test"), Some("x"));
    }
}
