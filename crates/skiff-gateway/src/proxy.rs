//! Accepting connections, routing, forwarding over pooled connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::debug;

use crate::error::{error_response, Body, ErrorKind};
use crate::route::{host_to_service, Lease, Route, Router};
use crate::upstream_io::UpstreamIo;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}; pick another address with --listen")]
    Bind { addr: SocketAddr, source: io::Error },
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
    domain: String,
    client: Client<Connector, Incoming>,
}

impl Gateway {
    pub fn new(router: Arc<dyn Router>, domain: &str) -> Arc<Self> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .set_host(false)
            .build(Connector {
                router: router.clone(),
            });
        Arc::new(Self {
            router,
            domain: domain.to_ascii_lowercase(),
            client,
        })
    }

    /// Binds the listening socket (separate from `serve`, so the caller can
    /// learn the real address when it asked for port 0).
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })
    }

    /// Serves connections until `shutdown` completes.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (stream, remote) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, go on.
                        debug!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let gw = gw.clone();
                    async move { Ok::<_, std::convert::Infallible>(gw.handle(req, remote).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await
                {
                    debug!("connection from {remote}: {e}");
                }
            });
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let Some(host) = host else {
            return error_response(
                ErrorKind::BadHost,
                &format!(
                    "The request has no Host header; skiff routes by host name: \
                     request http://NAME.{}/ to reach service NAME.",
                    self.domain
                ),
            );
        };
        let Some(service) = host_to_service(&host, &self.domain) else {
            return error_response(
                ErrorKind::UnknownService,
                &format!(
                    "No service is reachable at host {host:?}: skiff routes http://NAME.{}/ \
                     to the service NAME.",
                    self.domain
                ),
            );
        };
        let service = service.to_ascii_lowercase();
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        if let Some(proto) = &upgrade {
            if !self.router.allows_streaming(&service) {
                let proto = proto.to_str().unwrap_or("protocol");
                return error_response(
                    ErrorKind::StreamingNeedsPersistent,
                    &format!(
                        "Service {service:?} runs in serverless mode, which serves short \
                         request/response exchanges only; a long-lived {proto} connection \
                         (Upgrade) needs mode = \"persistent\" in its skiff.toml."
                    ),
                );
            }
        }
        let mut route = self.router.route(&service);
        let lease = loop {
            route = match route {
                Route::Instance(lease) => break lease,
                // Starting or thawing an instance: the client sees latency only.
                Route::Wait(next) => next.await,
                Route::Unknown { deployed } => {
                    let list = if deployed.is_empty() {
                        "none is deployed yet".to_string()
                    } else {
                        format!("deployed: {}", deployed.join(", "))
                    };
                    return error_response(
                        ErrorKind::UnknownService,
                        &format!("No service named {service:?} is deployed here ({list})."),
                    );
                }
                Route::Unavailable { reason } => {
                    return error_response(
                        ErrorKind::Unavailable,
                        &format!("Service {service:?} is unavailable: {reason}"),
                    );
                }
            };
        };
        let upstream = lease.upstream.clone();

        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = match Uri::builder()
            .scheme("http")
            .authority(upstream.key.as_str())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(e) => {
                return error_response(ErrorKind::BadHost, &format!("Unusable request target: {e}"))
            }
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(proto) = &upgrade {
            // The one hop-by-hop exchange that must pass: the upgrade itself.
            headers.insert(header::UPGRADE, proto.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        add_forwarded(headers, remote, &host);

        match self.client.request(req).await {
            Ok(mut resp) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                let Some(client_side) = client_side else {
                    return error_response(
                        ErrorKind::UpstreamFailed,
                        &format!("Service {service:?} switched protocols without being asked to."),
                    );
                };
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    // The connection was in flight all along.
                    drop(lease);
                });
                resp.map(|b| b.boxed())
            }
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The request stays in flight until its body has been sent.
                Response::from_parts(
                    parts,
                    LeasedBody {
                        inner: body,
                        _lease: lease,
                    }
                    .boxed(),
                )
            }
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                let message = match upstream.connect.failure().await {
                    Some(exit) => format!(
                        "Service {service:?} did not answer the request: its instance {exit} \
                         while handling it. See `skiff logs {service}`."
                    ),
                    None => format!(
                        "Service {service:?} did not answer the request: {cause}. \
                         The instance may have crashed or closed the connection; see `skiff logs {service}`."
                    ),
                };
                error_response(ErrorKind::UpstreamFailed, &message)
            }
        }
    }
}

/// A response body that holds the request's lease until it is dropped
/// (sent completely, or abandoned by the client).
struct LeasedBody {
    inner: Incoming,
    _lease: Lease,
}

impl hyper::body::Body for LeasedBody {
    type Data = bytes::Bytes;
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

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1):
/// they must not be forwarded.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

fn add_forwarded(headers: &mut HeaderMap, remote: SocketAddr, host: &str) {
    let ip = remote.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    }
}
