//! Accepting connections, routing, forwarding over pooled connections, and
//! the serverless rules of the exchange: request timeout, response and
//! request size limits, no upgrades.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::admission::{Cidr, ConnectionLimits, ConnectionTable, Refused};
use crate::error::{error_response, wants_json, Body, ErrorKind};
use crate::h1;
use crate::route::{host_to_service, ExchangeLimits, Lease, Route, Router};
use crate::upstream_io::UpstreamIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the gateway sends upstream: the client's body, maybe size-limited.
type UpBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}; pick another address with --listen")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// hyper's server side, for the connections `front.rs` hands over.
pub(crate) type HyperBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

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
struct Connector {
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
        Self::sharing(router, config, ConnectionTable::new())
    }

    /// A gateway that counts its connections in `connections`, with
    /// others (one per thread).
    pub(crate) fn sharing(
        router: Arc<dyn Router>,
        config: GatewayConfig,
        connections: Arc<ConnectionTable>,
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

    pub(crate) fn router(&self) -> &dyn Router {
        &*self.router
    }

    pub(crate) fn pool(&self) -> &h1::Pool {
        &self.pool
    }

    /// Drops idle upstream connections that timed out or whose instance
    /// is gone.
    pub fn sweep_idle(&self) {
        self.pool.sweep(|key| self.router.upstream(key).is_some());
    }

    /// Serves connections (HTTP/1.1, and HTTP/2 with prior knowledge) until
    /// `stop_accepting` completes; then tells every connection to close
    /// after its request in flight and waits for them, at most until
    /// `stop` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop_accepting: impl Future<Output = ()>,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop_accepting);
        let mut builder = HyperBuilder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            .max_buf_size(self.config.max_header_bytes);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        let (closing, _) = tokio::sync::watch::channel(false);
        // Every connection task adds a permit when it ends.
        let ended = Arc::new(tokio::sync::Semaphore::new(0));
        let mut count = 0u32;
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut warned: Option<Instant> = None;
        let mut refused = 0u64;
        loop {
            let (stream, remote) = tokio::select! {
                _ = &mut stop_accepting => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors (EMFILE, ENFILE), or out of
                        // memory: the pending connection stays queued.
                        // Waiting a little, longer each time, keeps this
                        // loop from spinning; it never ends.
                        if warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                            warn!(
                                "gateway: cannot accept a connection: {e} ({} client                                  connections open); retrying",
                                self.connections.open()
                            );
                            warned = Some(Instant::now());
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                },
            };
            backoff = ACCEPT_BACKOFF_MIN;
            let admitted = match self.connections.admit(remote.ip(), self.config.connections) {
                Ok(a) => a,
                Err(why) => {
                    refuse(&stream, why);
                    refused += 1;
                    if warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                        let caps = self.config.connections;
                        warn!(
                            "gateway: refused {refused} connections (the last from {}: {});                              raise --max-connections / --max-connections-per-address if                              these are real clients",
                            remote.ip(),
                            match why {
                                Refused::PerAddress => format!(
                                    "{} open from that address already",
                                    caps.per_address
                                ),
                                Refused::Total => format!("{} open already", caps.total),
                            }
                        );
                        warned = Some(Instant::now());
                        refused = 0;
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let builder = builder.clone();
            let closing = closing.subscribe();
            let ended = ended.clone();
            count += 1;
            tokio::spawn(async move {
                // Counted as ended however the task ends (a panic too), or
                // shutdown would wait for it in vain.
                let _ended = EndedGuard(ended);
                let _admitted = admitted;
                crate::front::serve(gw, stream, remote, builder, closing).await;
            });
        }
        drop(listener);
        let _ = closing.send(true);
        let all_ended = async {
            if let Ok(p) = ended.acquire_many(count).await {
                p.forget();
            }
        };
        tokio::select! {
            _ = all_ended => {}
            _ = stop => {}
        }
    }

    /// Serves a connection with hyper (HTTP/2, and HTTP/1 requests
    /// `front.rs` does not serve itself) until it ends, or, once `closing`
    /// turns true, until its request in flight is answered.
    pub(crate) async fn serve_with_hyper<I>(
        self: &Arc<Self>,
        io: I,
        remote: SocketAddr,
        builder: &HyperBuilder,
        mut closing: tokio::sync::watch::Receiver<bool>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.clone();
        let service = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(gw.handle(req, remote).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let closed = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = closed => {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!("connection from {remote}: {e}");
        }
    }

    /// Tells the platform the gateway answered a request for `service`
    /// itself, when the cause lies with the service (for diagnosis).
    pub(crate) fn report(&self, service: &str, kind: ErrorKind, message: &str) {
        let service_side = matches!(
            kind,
            ErrorKind::ResponseTooLarge
                | ErrorKind::RequestTimeout
                | ErrorKind::RequestTooLarge
                | ErrorKind::StreamingNeedsPersistent
                | ErrorKind::UpstreamFailed
        );
        if service_side {
            self.router.refused(service, kind, message);
        }
    }

    async fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        let json = wants_json(req.headers());
        // A refcounted copy, read only when the gateway answers itself.
        let host = req.headers().get(header::HOST).cloned();
        match self.forward(req, remote).await {
            Ok(resp) => resp,
            Err((kind, message)) => {
                let service = host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| host_to_service(h, &self.config.domain));
                if let Some(service) = service {
                    self.report(&service.to_ascii_lowercase(), kind, &message);
                }
                error_response(kind, &message, json)
            }
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, (ErrorKind, String)> {
        let domain = &self.config.domain;
        if req.method() == http::Method::CONNECT {
            // Passed on, it would reach the service as `CONNECT /` and
            // the client would be left with an empty close.
            return Err((
                ErrorKind::ConnectNotSupported,
                format!(
                    "CONNECT is not supported: skiff's gateway is not a forward proxy and \
                     opens no tunnels. Send plain requests to http://NAME.{domain}/ to reach \
                     service NAME."
                ),
            ));
        }
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            // RFC 9112 §3.2: one Host, or the gateway and the service
            // might each route by a different one.
            return Err((
                ErrorKind::BadRequest,
                "The request has more than one Host header; send exactly one.".to_string(),
            ));
        }
        // Request smuggling: hyper's HTTP/1 parser refuses Content-Length
        // values that disagree (400) and, for a body framed by both
        // Content-Length and Transfer-Encoding, drops Content-Length and
        // reads the chunked body (RFC 9112 §6.3). What reaches this point
        // has one framing, and the request sent upstream is framed anew, so
        // the gateway and the service cannot disagree about where it ends.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .ok_or_else(|| {
                (
                    ErrorKind::BadHost,
                    format!(
                        "The request has no Host header; skiff routes by host name: \
                         request http://NAME.{domain}/ to reach service NAME."
                    ),
                )
            })?;
        let service = host_to_service(&host, domain)
            .ok_or_else(|| {
                (
                    ErrorKind::UnknownService,
                    format!(
                        "No service is reachable at host {host:?}: skiff routes \
                         http://NAME.{domain}/ to the service NAME."
                    ),
                )
            })?
            .to_ascii_lowercase();
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        if let Some(proto) = &upgrade {
            if self.router.allows_streaming(&service) == Some(false) {
                let proto = proto.to_str().unwrap_or("protocol");
                return Err((
                    ErrorKind::StreamingNeedsPersistent,
                    format!(
                        "Service {service:?} runs in serverless mode, which serves short \
                         request/response exchanges only; a long-lived {proto} connection \
                         (Upgrade) needs mode = \"persistent\" in its skiff.toml."
                    ),
                ));
            }
        }
        // The body can be taken out (to receive it first) and the rest kept.
        let mut req = req.map(Some);
        // Serverless: the body is received before an instance is taken, so
        // a slow upload holds no instance's slot (see `Router::limits`).
        let mut received = None;
        let mut deadline = None;
        if upgrade.is_none() {
            if let Some(limits) = self.router.limits(&service) {
                if limits.max_response.is_some() {
                    deadline = limits.request_timeout.map(crate::front::after);
                    if let Some(body) = req.body_mut().take() {
                        let bytes = self
                            .receive_body(body, req.headers(), &service, limits, deadline)
                            .await?;
                        received = Some(bytes);
                    }
                }
            }
        }
        let lease = self.lease(&service).await?;
        let upstream = lease.upstream.clone();
        // A body announced too large is refused before it is read.
        if let (Some(max), Some(len)) = (upstream.limits.max_request, content_length(req.headers()))
        {
            if len > max {
                return Err(too_large_request(max));
            }
        }
        if deadline.is_none() {
            deadline = upstream.limits.request_timeout.map(crate::front::after);
        }

        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let serverless = upstream.limits.max_response.is_some() && upgrade.is_none();
        if !serverless {
            // hyper's pooled client finds the instance by the authority.
            let uri = Uri::builder()
                .scheme("http")
                .authority(&*upstream.key)
                .path_and_query(path.as_str())
                .build()
                .map_err(|e| {
                    (
                        ErrorKind::BadRequest,
                        format!("Unusable request target: {e}"),
                    )
                })?;
            *req.uri_mut() = uri;
        }
        *req.version_mut() = http::Version::HTTP_11;
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(proto) = &upgrade {
            // The one hop-by-hop exchange that must pass: the upgrade itself.
            headers.insert(header::UPGRADE, proto.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if !headers.contains_key(header::HOST) {
            // HTTP/2 clients send :authority instead; HTTP/1.1 needs Host.
            if let Ok(v) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, v);
            }
        }
        add_forwarded(headers, remote, self.config.trusts(remote.ip()), &host);
        if let (true, Some(max)) = (serverless, upstream.limits.max_response) {
            return self
                .serverless(
                    req, received, &path, &service, &upstream, lease, max, deadline,
                )
                .await;
        }
        let req = req.map(|body| match (body, upstream.limits.max_request) {
            (Some(body), Some(max)) => Limited::new(body, max as usize).boxed(),
            (Some(body), None) => body.map_err(BoxError::from).boxed(),
            // Received already: the service turned persistent meanwhile.
            (None, _) => Full::new(received.clone().unwrap_or_default())
                .map_err(|never| match never {})
                .boxed(),
        });

        let sent = self.client.request(req);
        let resp = match deadline {
            Some(d) => tokio::time::timeout_at(d, sent)
                .await
                .map_err(|_| timed_out(&service, upstream.limits))?,
            None => sent.await,
        };
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => return Err(self.upstream_error(&service, &upstream, e).await),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let client_side = client_side.ok_or_else(|| {
                (
                    ErrorKind::UpstreamFailed,
                    format!("Service {service:?} switched protocols without being asked to."),
                )
            })?;
            let upstream_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                // The connection was in flight all along.
                drop(lease);
            });
            return Ok(resp.map(|b| b.boxed()));
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let Some(max) = upstream.limits.max_response else {
            // Persistent: streamed as it comes; in flight until sent.
            let body = LeasedBody {
                inner: body,
                _lease: lease,
            };
            return Ok(Response::from_parts(parts, body.boxed()));
        };
        if content_length(&parts.headers).is_some_and(|len| len > max) {
            return Err(too_large_response(&service, max));
        }
        // Serverless: the response is received whole, up to the limit, so
        // that a response over it, a broken one or a late one still gets a
        // clean status. Memory per request is bounded by the limit.
        let collect = Limited::new(body, max as usize).collect();
        let collected = match deadline {
            Some(d) => tokio::time::timeout_at(d, collect)
                .await
                .map_err(|_| timed_out(&service, upstream.limits))?,
            None => collect.await,
        };
        drop(lease);
        match collected {
            Ok(c) => {
                let bytes = c.to_bytes();
                parts.headers.remove(header::TRANSFER_ENCODING);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                let body = Full::new(bytes).map_err(|never| match never {}).boxed();
                Ok(Response::from_parts(parts, body))
            }
            Err(e) if e.is::<LengthLimitError>() => Err(too_large_response(&service, max)),
            Err(e) => Err((
                ErrorKind::UpstreamFailed,
                format!(
                    "Service {service:?} broke off its response: {e}. {}",
                    upstream
                        .connect
                        .failure()
                        .await
                        .map(|exit| format!("Its instance {exit}."))
                        .unwrap_or_else(|| format!("See `skiff logs {service}`."))
                ),
            )),
        }
    }

    /// The serverless exchange: the request received whole (up to its
    /// limit), sent over a pooled connection, the response received whole
    /// (up to its limit), all within the request timeout (`h1.rs`).
    #[allow(clippy::too_many_arguments)]
    async fn serverless(
        &self,
        req: Request<Option<Incoming>>,
        received: Option<Bytes>,
        path: &str,
        service: &str,
        upstream: &crate::route::Upstream,
        lease: Lease,
        max: u64,
        deadline: Option<Instant>,
    ) -> Result<Response<Body>, (ErrorKind, String)> {
        let (parts, body) = req.into_parts();
        let limit = upstream.limits.max_request;
        let exchange = async {
            let body = match received {
                Some(bytes) if limit.is_some_and(|l| bytes.len() as u64 > l) => {
                    return Err(Err(too_large_request(limit.unwrap_or(0))))
                }
                Some(bytes) => bytes,
                None => match body {
                    Some(body) => collect_body(body, limit).await.map_err(Err)?,
                    None => Bytes::new(),
                },
            };
            let head = h1::serialize(&h1::Outgoing {
                method: &parts.method,
                path,
                headers: &parts.headers,
                body: body.clone(),
            });
            let out = h1::Prepared {
                bytes: &head,
                body: &body,
                head_only: parts.method == http::Method::HEAD,
                idempotent: h1::idempotent(&parts.method),
            };
            h1::exchange(&self.pool, upstream, out, max)
                .await
                .map_err(Ok)
        };
        let result = match deadline {
            Some(d) => tokio::time::timeout_at(d, exchange)
                .await
                .map_err(|_| timed_out(service, upstream.limits))?,
            None => exchange.await,
        };
        let mut received = match result {
            Ok(r) => r,
            Err(Err(refusal)) => return Err(refusal),
            // Still leased while the exit is learned (`exchange_failed`).
            Err(Ok(e)) => return Err(self.exchange_failed(service, upstream, e, max).await),
        };
        self.pool.put_back(&upstream.key, &mut received);
        drop(lease);
        let mut headers = received.header_map();
        if !received.bodiless {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(received.body.len()),
            );
        }
        let mut resp = Response::new(
            Full::new(received.body)
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = received.status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    /// A serverless request's body, received whole within its limit and
    /// the request timeout, before an instance is taken.
    async fn receive_body(
        &self,
        body: Incoming,
        headers: &HeaderMap,
        service: &str,
        limits: ExchangeLimits,
        deadline: Option<Instant>,
    ) -> Result<Bytes, (ErrorKind, String)> {
        if let (Some(max), Some(len)) = (limits.max_request, content_length(headers)) {
            if len > max {
                return Err(too_large_request(max));
            }
        }
        let started = Instant::now();
        let (rate, grace) = (self.config.min_body_rate, self.config.header_read_timeout);
        let mut body = body;
        let mut received = bytes::BytesMut::new();
        loop {
            // The body's own deadline moves with every piece that comes.
            let by_rate = body_due(started, grace, received.len() as u64, rate);
            let due = match (deadline, by_rate) {
                (Some(d), Some(r)) => Some(d.min(r)),
                (d, r) => d.or(r),
            };
            let frame = match due {
                Some(at) => match tokio::time::timeout_at(at, body.frame()).await {
                    Ok(frame) => frame,
                    Err(_) if Some(at) == by_rate && deadline.is_none_or(|d| at < d) => {
                        return Err(body_too_slow(
                            service,
                            received.len() as u64,
                            started.elapsed(),
                            rate,
                            grace,
                        ));
                    }
                    Err(_) => return Err(body_timed_out(service, limits)),
                },
                None => body.frame().await,
            };
            match frame {
                None => return Ok(received.freeze()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let total = (received.len() + data.len()) as u64;
                        if let Some(max) = limits.max_request.filter(|max| total > *max) {
                            return Err(too_large_request(max));
                        }
                        received.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) => {
                    return Err((
                        ErrorKind::BadRequest,
                        "The request body broke off before it was complete.".to_string(),
                    ))
                }
            }
        }
    }

    /// What to tell the client when the exchange with the instance failed:
    /// an answer over `max`, or an instance that could not be reached or
    /// broke it off. Call while still holding the lease: released, an idle
    /// instance would be frozen before it could report its exit.
    pub(crate) async fn exchange_failed(
        &self,
        service: &str,
        upstream: &crate::route::Upstream,
        e: h1::ExchangeError,
        max: u64,
    ) -> (ErrorKind, String) {
        if let h1::ExchangeError::TooLarge = e {
            return too_large_response(service, max);
        }
        let exit = upstream.connect.failure().await;
        let message = match (e, exit) {
            (h1::ExchangeError::Malformed(what), None) => format!(
                "Service {service:?} broke off its response: {what}. See `skiff logs {service}`."
            ),
            (h1::ExchangeError::Connect(e) | h1::ExchangeError::Broken(e), exit) => {
                broke_off(service, exit, &e.to_string())
            }
            (_, exit) => broke_off(service, exit, "its answer was cut off"),
        };
        (ErrorKind::UpstreamFailed, message)
    }

    /// Asks the platform for an instance, waiting while one starts or thaws.
    pub(crate) async fn lease(&self, service: &str) -> Result<Lease, (ErrorKind, String)> {
        let mut route = self.router.route(service);
        loop {
            route = match route {
                Route::Instance(lease) => return Ok(lease),
                // The client sees latency only.
                Route::Wait(next) => next.await,
                Route::Unknown { deployed } => {
                    let list = if deployed.is_empty() {
                        "none is deployed yet".to_string()
                    } else {
                        format!("deployed: {}", deployed.join(", "))
                    };
                    return Err((
                        ErrorKind::UnknownService,
                        format!("No service named {service:?} is deployed here ({list})."),
                    ));
                }
                Route::Unavailable { reason } => {
                    return Err((
                        ErrorKind::Unavailable,
                        format!("Service {service:?} is unavailable: {reason}"),
                    ));
                }
            };
        }
    }

    async fn upstream_error(
        &self,
        service: &str,
        upstream: &crate::route::Upstream,
        e: hyper_util::client::legacy::Error,
    ) -> (ErrorKind, String) {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<LengthLimitError>() {
                if let Some(max) = upstream.limits.max_request {
                    return too_large_request(max);
                }
            }
            source = err.source();
        }
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        let exit = upstream.connect.failure().await;
        (ErrorKind::UpstreamFailed, broke_off(service, exit, &cause))
    }
}

/// The first and the longest wait after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Refusals and accept errors are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Closes a connection over a cap, after telling the client why if its
/// socket takes the answer at once (never waiting: the accept loop must
/// go on). A client that sends its request afterwards may see a reset
/// instead; either way it holds nothing here.
fn refuse(stream: &tokio::net::TcpStream, why: Refused) {
    let _ = stream.try_write(refusal(why));
}

/// The answer to a connection over a cap (`ErrorKind::TooManyConnections`).
fn refusal(why: Refused) -> &'static [u8] {
    match why {
        Refused::PerAddress => {
            b"HTTP/1.1 503 Service Unavailable\r\n\
            content-type: text/plain; charset=utf-8\r\nx-skiff-error: too-many-connections\r\n\
            retry-after: 5\r\nconnection: close\r\ncontent-length: 107\r\n\r\n\
            Too many connections from your address are open at this gateway; close idle ones \
            or try again in a moment.\n"
        }
        Refused::Total => {
            b"HTTP/1.1 503 Service Unavailable\r\n\
            content-type: text/plain; charset=utf-8\r\nx-skiff-error: too-many-connections\r\n\
            retry-after: 5\r\nconnection: close\r\ncontent-length: 72\r\n\r\n\
            The gateway holds as many connections as it can; try again in a moment.\n"
        }
    }
}

/// Adds a permit when dropped: one connection task has ended.
struct EndedGuard(Arc<tokio::sync::Semaphore>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// Why a service did not answer: its instance's exit when known, else
/// the connection's error.
fn broke_off(service: &str, exit: Option<String>, cause: &str) -> String {
    match exit {
        Some(exit) => format!(
            "Service {service:?} did not answer the request: its instance {exit} while \
             handling it. See `skiff logs {service}`."
        ),
        None => format!(
            "Service {service:?} did not answer the request: {cause}. The instance may have \
             crashed or closed the connection; see `skiff logs {service}`."
        ),
    }
}

/// A request body received whole, at most `limit` bytes.
async fn collect_body(body: Incoming, limit: Option<u64>) -> Result<Bytes, (ErrorKind, String)> {
    if hyper::body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    let collected = match limit {
        Some(l) => Limited::new(body, usize::try_from(l).unwrap_or(usize::MAX))
            .collect()
            .await
            .map_err(|e| e.is::<LengthLimitError>()),
        None => body.collect().await.map_err(|_| false),
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(true) => Err(too_large_request(limit.unwrap_or(0))),
        Err(false) => Err((
            ErrorKind::BadRequest,
            "The request body broke off before it was complete.".to_string(),
        )),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn size(bytes: u64) -> String {
    format!("{} = {bytes} bytes", skiff_model::format_size(bytes))
}

fn too_large_response(service: &str, max: u64) -> (ErrorKind, String) {
    (
        ErrorKind::ResponseTooLarge,
        format!(
            "Response is bigger than the maximum allowed size: service {service:?} answered \
             with more than {} (limits.max_response). Store large data in object storage \
             and return its URL instead.",
            size(max)
        ),
    )
}

pub(crate) fn too_large_request(max: u64) -> (ErrorKind, String) {
    (
        ErrorKind::RequestTooLarge,
        format!(
            "The request body is bigger than the service accepts: more than {} \
             (limits.max_request). Upload large data to object storage and send its URL.",
            size(max)
        ),
    )
}

pub(crate) fn timed_out(service: &str, limits: ExchangeLimits) -> (ErrorKind, String) {
    let shown = skiff_model::format_duration(limits.request_timeout.unwrap_or_default());
    (
        ErrorKind::RequestTimeout,
        format!(
            "Service {service:?} did not answer within the request timeout of {shown} \
             (limits.request_timeout); the request was cut off. Longer work belongs on a \
             persistent service (mode = \"persistent\")."
        ),
    )
}

/// The client's body did not arrive in time: the service is not to blame
/// (and never saw the request).
pub(crate) fn body_timed_out(service: &str, limits: ExchangeLimits) -> (ErrorKind, String) {
    let shown = skiff_model::format_duration(limits.request_timeout.unwrap_or_default());
    (
        ErrorKind::BodyTimeout,
        format!(
            "The request body did not arrive within the request timeout of {shown} \
             (limits.request_timeout of service {service:?}); the request was not sent to \
             the service. Send the body at once, or upload large data to object storage \
             and send its URL."
        ),
    )
}

/// When a request body that started arriving at `started` and brought
/// `received` bytes so far must have brought more: `grace`, plus a second
/// for every `rate` bytes (mod_reqtimeout's rule). `None` without a
/// minimum rate.
pub(crate) fn body_due(
    started: Instant,
    grace: Duration,
    received: u64,
    rate: u64,
) -> Option<Instant> {
    if rate == 0 {
        return None;
    }
    let earned = Duration::from_millis(received.saturating_mul(1000) / rate);
    Some(crate::front::later(started, grace.saturating_add(earned)))
}

/// The client's body came slower than the gateway's minimum rate: the
/// client held a connection and memory while sending almost nothing.
pub(crate) fn body_too_slow(
    service: &str,
    received: u64,
    took: Duration,
    rate: u64,
    grace: Duration,
) -> (ErrorKind, String) {
    (
        ErrorKind::BodyTimeout,
        format!(
            "The request body arrived too slowly: {received} bytes in {:.0} s, under the \
             gateway's minimum of {rate} bytes per second after {} (--min-body-rate); the \
             request was not sent to service {service:?}. Send the body at once, or upload \
             large data to object storage and send its URL.",
            took.as_secs_f64(),
            skiff_model::format_duration(grace)
        ),
    )
}

/// A response body that holds the request's lease until it is dropped
/// (sent completely, or abandoned by the client).
struct LeasedBody {
    inner: Incoming,
    _lease: Lease,
}

impl hyper::body::Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    h1::is_hop_by_hop(name.as_str().as_bytes())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, no lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-*` for the service. A client's own
/// `X-Forwarded-For` is replaced by its address, since anyone can write
/// one; only a trusted proxy's (`--trusted-proxy`) is kept and appended
/// to. The request's own fields go in any case.
fn add_forwarded(headers: &mut HeaderMap, remote: SocketAddr, trusted: bool, host: &str) {
    let ip = remote.ip().to_string();
    let mut xff = String::new();
    if trusted {
        // All of its fields, in order: together they are one list.
        for prev in headers.get_all("x-forwarded-for") {
            if let Ok(prev) = prev.to_str() {
                xff.push_str(prev);
                xff.push_str(", ");
            }
        }
    }
    xff.push_str(&ip);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    } else {
        headers.remove("x-forwarded-host");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_end_to_end_ones_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-custom"]);
    }

    #[test]
    fn a_clients_forwarded_for_is_replaced_a_trusted_proxys_appended_to() {
        let remote = "127.0.0.1:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.4.5.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let mut trusted = h.clone();
        add_forwarded(&mut h, remote, false, "a.localhost:8000");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.localhost:8000");
        add_forwarded(&mut trusted, remote, true, "a.localhost:8000");
        assert_eq!(trusted.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(trusted["x-forwarded-for"], "10.1.2.3, 10.4.5.6, 127.0.0.1");
        let mut none = HeaderMap::new();
        add_forwarded(&mut none, remote, true, "a.localhost");
        assert_eq!(none["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn a_body_earns_a_second_per_rate_bytes_after_its_grace() {
        let start = Instant::now();
        let grace = Duration::from_secs(10);
        assert_eq!(body_due(start, grace, 5000, 0), None, "no minimum");
        for (received, rate, after) in [
            (0, 1024, Duration::from_secs(10)),
            (1024, 1024, Duration::from_secs(11)),
            (512, 1024, Duration::from_millis(10_500)),
            (
                u64::MAX,
                1,
                Duration::from_secs(10) + Duration::from_millis(u64::MAX),
            ),
        ] {
            let due = body_due(start, grace, received, rate).unwrap();
            assert_eq!(due - start, after, "{received} bytes at {rate}/s");
        }
        let (kind, message) = body_too_slow("svc", 3, Duration::from_secs(12), 1024, grace);
        assert_eq!(kind, ErrorKind::BodyTimeout);
        assert!(
            message.contains("3 bytes in 12 s") && message.contains("--min-body-rate"),
            "{message}"
        );
    }

    #[test]
    fn refusals_are_whole_http_answers() {
        for why in [Refused::PerAddress, Refused::Total] {
            let answer = refusal(why);
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut fields);
            let head = match resp.parse(answer) {
                Ok(httparse::Status::Complete(n)) => n,
                other => panic!("{why:?}: {other:?}"),
            };
            assert_eq!(resp.code, Some(503));
            let field = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| std::str::from_utf8(h.value).unwrap().to_string())
            };
            assert_eq!(
                field("x-skiff-error").as_deref(),
                Some(ErrorKind::TooManyConnections.as_str())
            );
            let length: usize = field("content-length").unwrap().parse().unwrap();
            assert_eq!(length, answer.len() - head, "{why:?}");
        }
    }

    #[test]
    fn messages_name_the_limit() {
        let (k, m) = too_large_response("svc", 6 << 20);
        assert_eq!(k, ErrorKind::ResponseTooLarge);
        assert!(
            m.starts_with("Response is bigger than the maximum allowed size"),
            "{m}"
        );
        assert!(
            m.contains("6MiB = 6291456 bytes") && m.contains("object storage"),
            "{m}"
        );
        let limits = ExchangeLimits {
            request_timeout: Some(Duration::from_secs(900)),
            ..Default::default()
        };
        let (k, m) = timed_out("svc", limits);
        assert_eq!(k, ErrorKind::RequestTimeout);
        assert!(m.contains("request timeout of 15m"), "{m}");
        let (k, m) = body_timed_out("svc", limits);
        assert_eq!(k, ErrorKind::BodyTimeout);
        assert!(
            m.contains("request timeout of 15m") && m.contains("was not sent to the service"),
            "{m}"
        );
        let (k, m) = too_large_request(6 << 20);
        assert_eq!(k, ErrorKind::RequestTooLarge);
        assert!(m.contains("limits.max_request"), "{m}");
    }
}
