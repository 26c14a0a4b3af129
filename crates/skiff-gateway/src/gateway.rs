//! The gateway's state, shared by its connections on one thread: its
//! settings, the platform's `Router`, the pools of connections to
//! instances (the serverless exchange's own, and hyper-util's client for
//! persistent services) and the table of open client connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::admission::{Cidr, ConnectionLimits, ConnectionTable};
use crate::error::{ErrorKind, Failure};
use crate::h1;
use crate::meter::{Meters, ThreadMeter};
use crate::route::Router;
use crate::upstream_io::UpstreamIo;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the gateway sends upstream: the client's body, maybe size-limited.
pub(crate) type UpBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}; pick another address with --listen")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// How the gateway treats client connections.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Services are reached at `NAME.<domain>`.
    pub domain: String,
    /// A client must send a request's head within this once it started
    /// one, and a new connection its first head (slowloris). Connections
    /// hyper serves (HTTP/1.0, persistent services) are also closed after
    /// this long idle between requests.
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A serverless request's body must arrive at this many bytes per
    /// second or faster, after `header_read_timeout` of grace (0: no
    /// minimum, only the request timeout).
    pub min_body_rate: u64,
    /// Largest request head a client may send (431 beyond).
    pub max_header_bytes: usize,
    /// How many client connections may be open, per address and in total.
    pub connections: ConnectionLimits,
    /// Peers whose `X-Forwarded-For` is kept and appended to; anyone
    /// else's is replaced by the peer's address.
    pub trusted_proxies: Arc<[Cidr]>,
    /// Whether each request gets a record in the request log (`reqlog.rs`;
    /// its `x-request-id` it gets in any case).
    pub request_log: bool,
}

impl GatewayConfig {
    /// The gateway's default settings for `domain`.
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.to_ascii_lowercase(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            max_header_bytes: 64 * 1024,
            connections: ConnectionLimits::default(),
            trusted_proxies: Arc::from([]),
            request_log: true,
        }
    }

    /// Whether `X-Forwarded-For` from `peer` is kept (and appended to).
    pub(crate) fn trusts(&self, peer: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }
}

/// Opens connections to instances for the pooled client: the pool key is the
/// instance key, which the platform resolves to its connect function.
#[derive(Clone)]
pub(crate) struct Connector {
    router: Arc<dyn Router>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let upstream = uri.host().and_then(|key| self.router.upstream(key));
        Box::pin(async move {
            match upstream {
                Some(up) => Ok(UpstreamIo::new(up.connect.connect().await?)),
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the instance is gone",
                )),
            }
        })
    }
}

/// The HTTP gateway. Share it with `Arc`.
pub struct Gateway {
    router: Arc<dyn Router>,
    config: GatewayConfig,
    /// Persistent services: streamed, upgradable.
    client: Client<Connector, UpBody>,
    /// Serverless services: whole requests and responses (`h1.rs`).
    pool: h1::Pool,
    /// The open client connections, shared with the gateway's other
    /// threads.
    connections: Arc<ConnectionTable>,
    /// This thread's counts (`meter.rs`).
    meter: ThreadMeter,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(router: Arc<dyn Router>, config: GatewayConfig) -> Arc<Self> {
        Self::counting(router, config, &Meters::new())
    }

    /// A gateway on one thread that counts its answers in `meters`.
    pub fn counting(router: Arc<dyn Router>, config: GatewayConfig, meters: &Meters) -> Arc<Self> {
        Self::sharing(router, config, ConnectionTable::new(), meters)
    }

    /// A gateway that counts its connections in `connections` and its
    /// answers in `meters`, with others (one per thread).
    pub(crate) fn sharing(
        router: Arc<dyn Router>,
        config: GatewayConfig,
        connections: Arc<ConnectionTable>,
        meters: &Meters,
    ) -> Arc<Self> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .set_host(false)
            .build(Connector {
                router: router.clone(),
            });
        Arc::new(Self {
            router,
            config,
            client,
            pool: h1::Pool::new(),
            connections,
            meter: meters.for_thread(),
        })
    }

    /// Binds the listening socket (separate from `serve`, so the caller can
    /// learn the real address when it asked for port 0).
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })
    }

    pub(crate) fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub(crate) fn meter(&self) -> &ThreadMeter {
        &self.meter
    }

    pub(crate) fn router(&self) -> &dyn Router {
        &*self.router
    }

    pub(crate) fn pool(&self) -> &h1::Pool {
        &self.pool
    }

    /// hyper-util's pooled client, for persistent services.
    pub(crate) fn client(&self) -> &Client<Connector, UpBody> {
        &self.client
    }

    /// The open client connections, shared with the other threads.
    pub(crate) fn connections(&self) -> &Arc<ConnectionTable> {
        &self.connections
    }

    /// Drops idle upstream connections that timed out or whose instance
    /// is gone.
    pub fn sweep_idle(&self) {
        self.pool.sweep(|key| self.router.upstream(key).is_some());
    }

    /// Tells the platform the gateway answered a request for `service`
    /// itself, when the cause lies with the service (for diagnosis).
    pub(crate) fn report(&self, service: &str, failure: &Failure) {
        let service_side = matches!(
            failure.kind(),
            ErrorKind::ResponseTooLarge
                | ErrorKind::RequestTimeout
                | ErrorKind::RequestTooLarge
                | ErrorKind::StreamingNeedsPersistent
                | ErrorKind::UpstreamFailed
        );
        if service_side {
            self.router
                .refused(service, failure.kind(), failure.message());
        }
    }
}
