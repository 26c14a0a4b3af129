//! hyper's side of the gateway: HTTP/2, and the HTTP/1 requests
//! `front.rs` does not serve itself (HTTP/1.0, upgrades, chunked or
//! over-limit bodies, `Expect`, persistent services, anything malformed
//! or unknown). Requests go through the same phases as `front.rs`'s
//! (`pipeline.rs`); serverless ones through the same exchange, persistent
//! ones are streamed through hyper-util's pooled client, upgrades
//! proxied both ways.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tracing::debug;

use crate::error::{wants_json, Body, ErrorKind, Failure};
use crate::gateway::{BoxError, Gateway};
use crate::h1;
use crate::limits::{after, broke_off, timed_out, too_large_request, too_large_response};
use crate::pipeline::{self, Downstream, Piece, Serverless, Watched};
use crate::reqlog::{self, Entry};
use crate::route::{host_to_service, Lease, Upstream, Wake};

/// hyper's server side, for the connections `front.rs` hands over.
pub(crate) type HyperBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

impl Gateway {
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

    async fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let at = SystemTime::now();
        let json = wants_json(req.headers());
        // The request's id (`reqlog.rs`): the client's, when it sent one
        // usable field, else a new one; the service gets it either way.
        let request_id = {
            let mut sent = req.headers().get_all(X_REQUEST_ID).iter();
            let one = match (sent.next(), sent.next()) {
                (Some(v), None) => Some(v.as_bytes()),
                _ => None,
            };
            reqlog::request_id(one)
        };
        let id_value = HeaderValue::from_str(&request_id).ok();
        let method = reqlog::logged_method(req.method());
        let path = reqlog::logged_path(req.uri().path_and_query().map_or("/", |p| p.as_str()));
        let announced = content_length(req.headers());
        // Its Host, or from HTTP/2 clients its target's authority: where
        // `forward` routes it, and whose service it is counted under and
        // reported for when the gateway answers itself.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let service = host
            .as_deref()
            .and_then(|h| host_to_service(h, &self.config().domain))
            .map(str::to_ascii_lowercase);
        let mut resp = match self
            .forward(req, remote, json, host, id_value.clone())
            .await
        {
            Ok(resp) => resp,
            Err(failure) => {
                if let Some(service) = &service {
                    self.report(service, &failure);
                }
                failure.answer(json)
            }
        };
        // The gateway's own answers carry their kind (never a service's).
        let refused = resp.extensions().get::<ErrorKind>().copied();
        // A refusal names a service only when it is one the router knows:
        // no client can make rows for names nobody deployed.
        let service = match refused {
            Some(_) => service.filter(|s| self.router().exists(s)),
            None => service,
        };
        if let Some(v) = id_value {
            if !resp.headers().contains_key(X_REQUEST_ID) {
                resp.headers_mut().insert(X_REQUEST_ID, v);
            }
        }
        let served = resp.extensions_mut().remove::<Served>();
        let entry = (service.is_some() && self.config().request_log).then(|| Entry {
            at,
            method,
            path: &path,
            bytes_in: served
                .as_ref()
                .and_then(|s| s.bytes_in)
                .or(announced)
                .unwrap_or(0),
            bytes_out: hyper::body::Body::size_hint(resp.body())
                .exact()
                .or_else(|| content_length(resp.headers())),
            instance: served.as_ref().map(|s| s.instance.clone()),
            wake: served.map_or(Wake::Warm, |s| s.wake),
            request_id: &request_id,
        });
        self.meter().answered(
            service.as_deref(),
            resp.status().as_u16(),
            started.elapsed(),
            refused,
            entry,
        );
        resp
    }

    /// The request through the pipeline's phases. A serverless request's
    /// refusals are answered and reported there (`Ok`); the others
    /// come back as `Err`.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        remote: SocketAddr,
        json: bool,
        host: Option<String>,
        request_id: Option<HeaderValue>,
    ) -> Result<Response<Body>, Failure> {
        // Request smuggling: hyper's HTTP/1 parser refuses Content-Length
        // values that disagree (400) and, for a body framed by both
        // Content-Length and Transfer-Encoding, drops Content-Length and
        // reads the chunked body (RFC 9112 §6.3). What reaches this point
        // has one framing, and the request sent upstream is framed anew, so
        // the gateway and the service cannot disagree about where it ends.
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        let admitted = pipeline::admit(
            self,
            &pipeline::Head {
                connect: req.method() == http::Method::CONNECT,
                hosts: req.headers().get_all(header::HOST).iter().count(),
                host: host.as_deref(),
                upgrade: upgrade.as_ref().map(|p| p.to_str().unwrap_or("protocol")),
            },
        )?;
        let service = admitted.service;
        let host = host.unwrap_or_default();

        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.version_mut() = http::Version::HTTP_11;
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        // After the strip: a client's `Connection: x-request-id` cannot
        // keep the id from the service.
        headers.remove(X_REQUEST_ID);
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID, id);
        }
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
        add_forwarded(headers, remote, self.config().trusts(remote.ip()), &host);

        if let Some(rules) = admitted.serverless {
            // The body is received before an instance is taken, so a slow
            // upload holds no instance's slot (see `Router::limits`).
            let (parts, body) = req.into_parts();
            let mut down = Whole::new(&parts, &path, body, json);
            let serverless = Serverless::of(&service, &parts.method);
            return Ok(pipeline::serverless(self, &mut down, &serverless, rules).await);
        }
        let lease = pipeline::lease(self.router(), &service).await?;
        let upstream = lease.upstream.clone();
        // A body announced too large is refused before it is read.
        if let (Some(max), Some(len)) = (upstream.limits.max_request, content_length(req.headers()))
        {
            if len > max {
                return Err(too_large_request(max));
            }
        }
        if let (None, Some(max)) = (&upgrade, upstream.limits.max_response) {
            // Its rules were not known before the lease (it was starting).
            let (parts, body) = req.into_parts();
            let mut down = Whole::new(&parts, &path, body, json);
            let serverless = Serverless::of(&service, &parts.method);
            return Ok(pipeline::serverless_leased(self, &mut down, &serverless, lease, max).await);
        }
        let deadline = upstream.limits.request_timeout.map(after);
        let served = Served::of(&lease, content_length(req.headers()));
        // hyper's pooled client finds the instance by the authority.
        let uri = Uri::builder()
            .scheme("http")
            .authority(&*upstream.key)
            .path_and_query(path.as_str())
            .build()
            .map_err(|e| {
                Failure::new(
                    ErrorKind::BadRequest,
                    format!("Unusable request target: {e}"),
                )
                .because(e)
            })?;
        *req.uri_mut() = uri;
        let req = req.map(|body| match upstream.limits.max_request {
            Some(max) => Limited::new(body, max as usize).boxed(),
            None => body.map_err(BoxError::from).boxed(),
        });

        let sent = self.client().request(req);
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
                Failure::new(
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
            resp.extensions_mut().insert(served);
            return Ok(resp.map(|b| b.boxed()));
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions.insert(served);
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
            Err(e) if e.is::<LengthLimitError>() => {
                Err(too_large_response(&service, max).because(e))
            }
            Err(e) => Err(Failure::new(
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
            )
            .because(e)),
        }
    }

    async fn upstream_error(
        &self,
        service: &str,
        upstream: &Upstream,
        e: hyper_util::client::legacy::Error,
    ) -> Failure {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut over_limit = false;
        while let Some(err) = source {
            over_limit |= err.is::<LengthLimitError>();
            source = err.source();
        }
        if let (true, Some(max)) = (over_limit, upstream.limits.max_request) {
            return too_large_request(max).because(e);
        }
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        let exit = upstream.connect.failure().await;
        Failure::new(ErrorKind::UpstreamFailed, broke_off(service, exit, &cause)).because(e)
    }
}

/// A serverless request hyper has read the head of: its body comes as
/// hyper's frames, its answer goes back as a `Response`.
struct Whole<'a> {
    parts: &'a http::request::Parts,
    path: &'a str,
    body: Option<Incoming>,
    received: BytesMut,
    json: bool,
    /// The instance it was leased, once it is.
    served: Option<Served>,
    /// The body's length, once received whole.
    body_len: u64,
}

impl<'a> Whole<'a> {
    fn new(parts: &'a http::request::Parts, path: &'a str, body: Incoming, json: bool) -> Self {
        Self {
            parts,
            path,
            body: Some(body),
            received: BytesMut::new(),
            json,
            served: None,
            body_len: 0,
        }
    }
}

impl Whole<'_> {
    /// Names the instance in the answer, for the request's record.
    fn mark(&mut self, resp: &mut Response<Body>) {
        if let Some(mut served) = self.served.take() {
            served.bytes_in = Some(self.body_len);
            resp.extensions_mut().insert(served);
        }
    }
}

/// Which instance answered a request and what it woke from, in the
/// answer's extensions until `handle` records it.
#[derive(Debug, Clone)]
struct Served {
    instance: Arc<str>,
    wake: Wake,
    /// The body's length, when the side that read it knows.
    bytes_in: Option<u64>,
}

impl Served {
    fn of(lease: &Lease, bytes_in: Option<u64>) -> Self {
        Self {
            instance: lease.upstream.key.clone(),
            wake: lease.wake,
            bytes_in,
        }
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl<'a> Serverless<'a> {
    fn of(service: &'a str, method: &http::Method) -> Self {
        Self {
            service,
            head_only: method == http::Method::HEAD,
            idempotent: h1::idempotent(method),
        }
    }
}

impl Downstream for Whole<'_> {
    type Done = Response<Body>;

    fn announced(&self) -> Option<u64> {
        content_length(&self.parts.headers)
    }

    fn received(&self) -> u64 {
        self.received.len() as u64
    }

    async fn read_body(&mut self, due: Option<Instant>) -> Piece {
        let Some(body) = &mut self.body else {
            return Piece::End;
        };
        if hyper::body::Body::is_end_stream(body) {
            self.body = None;
            return Piece::End;
        }
        let frame = match due {
            Some(at) => match tokio::time::timeout_at(at, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return Piece::Late,
            },
            None => body.frame().await,
        };
        match frame {
            None => {
                self.body = None;
                Piece::End
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.received.extend_from_slice(&data);
                }
                Piece::More
            }
            Some(Err(_)) => Piece::Broken,
        }
    }

    fn request(&mut self) -> (Vec<u8>, Bytes) {
        let body = self.received.split().freeze();
        self.body_len = body.len() as u64;
        let head = h1::serialize(&h1::Outgoing {
            method: &self.parts.method,
            path: self.path,
            headers: &self.parts.headers,
            body: body.clone(),
        });
        (head, body)
    }

    fn leased(&mut self, lease: &Lease) {
        self.served = Some(Served::of(lease, None));
    }

    async fn watch<F: Future>(&mut self, work: F, by: Option<Instant>) -> Watched<F::Output> {
        // hyper drops the request's future when its client leaves.
        match by {
            Some(at) => match tokio::time::timeout_at(at, work).await {
                Ok(out) => Watched::Done(out),
                Err(_) => Watched::Late,
            },
            None => Watched::Done(work.await),
        }
    }

    async fn respond(&mut self, received: &mut h1::Received) -> Response<Body> {
        let mut headers = received.header_map();
        if !received.bodiless {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(received.body.len()),
            );
        }
        let body = std::mem::take(&mut received.body);
        let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *resp.status_mut() = received.status;
        *resp.headers_mut() = headers;
        self.mark(&mut resp);
        resp
    }

    async fn refuse(&mut self, failure: Failure) -> Response<Body> {
        let mut resp = failure.answer(self.json);
        self.mark(&mut resp);
        resp
    }

    fn gone(&mut self) -> Response<Body> {
        // Not reached: hyper drops the request when its client leaves, and
        // a body that breaks off is `Piece::Broken`.
        crate::limits::body_broke_off().answer(self.json)
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
}
