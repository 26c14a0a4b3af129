//! The gateway in one process: a real `Gateway` on 127.0.0.1:0, a fake
//! `Router`, and a tiny HTTP/1.1 service written here. No root, no
//! sandboxes: routing, limits and every kind of gateway answer, on both
//! of its sides (a plain request is served by `front.rs`; one with
//! `Expect`, a chunked body, an upgrade or HTTP/1.0 by hyper's side).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_gateway::{
    Connect, ConnectFuture, ConnectionLimits, ErrorKind, ExchangeLimits, Gateway, GatewayConfig,
    Lease, Meters, Route, Router, Upstream, Wake,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- service

/// A request as the service received it.
struct Seen {
    method: String,
    path: String,
    /// The head as it came, field names in the case the gateway wrote.
    head: String,
    body: Vec<u8>,
}

/// The test service: what it answers depends on the path.
async fn service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_service(stream));
        }
    });
    addr
}

/// Reads one request (Content-Length or chunked body); `None` at the end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if let Ok(httparse::Status::Complete(n)) = req.parse(buf) {
            let field = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
            };
            let length: usize = field("content-length").map_or(0, |l| l.parse().unwrap());
            let chunked = field("transfer-encoding").is_some();
            let method = req.method.unwrap().to_string();
            let path = req.path.unwrap().to_string();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            buf.drain(..n);
            let body = if chunked {
                // Enough of chunked decoding for the gateway's framing.
                let mut body = Vec::new();
                loop {
                    let line = loop {
                        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                            break buf.drain(..i + 2).collect::<Vec<u8>>();
                        }
                        read_more(s, buf).await?;
                    };
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&line[..line.len() - 2]).unwrap().trim(),
                        16,
                    )
                    .unwrap();
                    while buf.len() < size + 2 {
                        read_more(s, buf).await?;
                    }
                    body.extend(buf.drain(..size));
                    buf.drain(..2);
                    if size == 0 {
                        break body;
                    }
                }
            } else {
                while buf.len() < length {
                    read_more(s, buf).await?;
                }
                buf.drain(..length).collect()
            };
            return Some(Seen {
                method,
                path,
                head,
                body,
            });
        }
        read_more(s, buf).await?;
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn answer(status: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

async fn serve_service(mut s: TcpStream) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut s, &mut buf).await {
        let reply = match req.path.as_str() {
            "/" if req.method == "POST" => {
                answer("200 OK", req.body.len().to_string().as_bytes(), "")
            }
            "/" => answer("200 OK", b"ok", ""),
            "/teapot" => answer(
                "418 I'm a teapot",
                b"teapot",
                "x-custom: kept\r\nconnection: keep-alive, x-hop\r\nx-hop: dropped\r\n",
            ),
            "/headers" => answer("200 OK", req.head.as_bytes(), ""),
            "/big" => answer("200 OK", &[b'x'; 2000], ""),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                answer("200 OK", b"late", "")
            }
            "/crash" => return,
            "/garbage" => b"this is not http\r\n\r\n".to_vec(),
            "/ws" => {
                // Switches protocols, then echoes what comes.
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
                    .await;
                let mut chunk = [0u8; 1024];
                if !buf.is_empty() {
                    let _ = s.write_all(&buf).await;
                }
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
                return;
            }
            _ => answer("404 Not Found", b"no such page", ""),
        };
        let reply = if req.method == "HEAD" {
            // The same head, no body.
            let end = reply
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(reply.len(), |i| i + 4);
            reply[..end].to_vec()
        } else {
            reply
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

// ----------------------------------------------------------------- router

/// How a fake service routes.
#[derive(Clone)]
enum State {
    /// Serving, with these rules.
    Ready(ExchangeLimits),
    /// Starting: its instance comes after a moment (`Route::Wait`).
    Starting(ExchangeLimits),
    /// Serving, but its instance must be thawed or started first: its
    /// rules are known (the gateway's own side serves it), the instance
    /// comes after `Duration`.
    Waking(ExchangeLimits, Duration),
    /// Serving, but refusing more requests for now (a full queue).
    Full(ExchangeLimits),
    Unavailable(&'static str),
}

/// A lease's guard: counts the requests that hold an instance.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct ToService(SocketAddr);

impl Connect for ToService {
    fn connect(&self) -> ConnectFuture {
        let addr = self.0;
        Box::pin(async move { TcpStream::connect(addr).await })
    }
}

/// The platform, as far as the gateway sees it.
struct FakeRouter {
    addr: SocketAddr,
    services: HashMap<&'static str, State>,
    /// What the gateway reported with `Router::refused`.
    refused: Mutex<Vec<(String, ErrorKind, String)>>,
    /// Leases not yet given back.
    held: Arc<AtomicUsize>,
}

impl FakeRouter {
    fn upstream_for(&self, name: &str, limits: ExchangeLimits) -> Upstream {
        Upstream {
            key: Arc::from(name),
            connect: Arc::new(ToService(self.addr)),
            limits,
        }
    }

    /// An instance after `after`, held from now on (as the platform's
    /// waiter holds its place).
    fn wait(&self, service: &str, limits: ExchangeLimits, after: Duration) -> Route {
        let lease =
            Lease::new(self.upstream_for(service, limits), Held::new(&self.held)).woke(Wake::Cold);
        Route::Wait(Box::pin(async move {
            tokio::time::sleep(after).await;
            Route::Instance(lease)
        }))
    }

    /// How many leases are held now.
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// What the gateway reported so far.
    fn reports(&self) -> Vec<(String, ErrorKind, String)> {
        self.refused.lock().unwrap().clone()
    }
}

impl Router for FakeRouter {
    fn route(&self, service: &str) -> Route {
        match self.services.get(service) {
            None => Route::Unknown {
                deployed: self.services.keys().map(|k| k.to_string()).collect(),
            },
            Some(State::Ready(limits)) => Route::Instance(Lease::new(
                self.upstream_for(service, *limits),
                Held::new(&self.held),
            )),
            Some(State::Starting(limits)) => self.wait(service, *limits, Duration::from_millis(50)),
            Some(State::Waking(limits, after)) => self.wait(service, *limits, *after),
            Some(State::Full(_)) => Route::Unavailable {
                reason: "its queue is full".into(),
            },
            Some(State::Unavailable(reason)) => Route::Unavailable {
                reason: reason.to_string(),
            },
        }
    }

    fn upstream(&self, key: &str) -> Option<Upstream> {
        match self.services.get(key)? {
            State::Ready(limits) | State::Starting(limits) | State::Waking(limits, _) => {
                Some(self.upstream_for(key, *limits))
            }
            State::Full(_) | State::Unavailable(_) => None,
        }
    }

    fn allows_streaming(&self, service: &str) -> Option<bool> {
        match self.services.get(service)? {
            State::Ready(limits) | State::Waking(limits, _) | State::Full(limits) => {
                Some(limits.max_response.is_none())
            }
            _ => None,
        }
    }

    fn exists(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    fn refused(&self, service: &str, kind: ErrorKind, message: &str) {
        self.refused
            .lock()
            .unwrap()
            .push((service.to_string(), kind, message.to_string()));
    }

    fn limits(&self, service: &str) -> Option<ExchangeLimits> {
        match self.services.get(service)? {
            State::Ready(limits) | State::Waking(limits, _) | State::Full(limits) => Some(*limits),
            _ => None,
        }
    }
}

fn serverless(timeout_ms: u64) -> ExchangeLimits {
    ExchangeLimits {
        request_timeout: Some(Duration::from_millis(timeout_ms)),
        max_response: Some(1000),
        max_request: Some(100),
    }
}

/// A gateway on 127.0.0.1:0 in front of the test service, with services
/// `fn` (serverless, 1 s timeout, 100-byte requests, 1000-byte answers),
/// `slowpoke` (the same with 300 ms), `later` (starting), `db`
/// (persistent) and `broken` (unavailable).
struct Setup {
    addr: SocketAddr,
    router: Arc<FakeRouter>,
    meters: Arc<Meters>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gateway(tune: impl FnOnce(&mut GatewayConfig)) -> Setup {
    let services = HashMap::from([
        ("fn", State::Ready(serverless(1000))),
        ("slowpoke", State::Ready(serverless(300))),
        ("later", State::Starting(serverless(1000))),
        ("db", State::Ready(ExchangeLimits::default())),
        ("broken", State::Unavailable("its build failed")),
        (
            "sleepy",
            State::Waking(serverless(5000), Duration::from_secs(3)),
        ),
        ("full", State::Full(serverless(1000))),
    ]);
    let router = Arc::new(FakeRouter {
        addr: service().await,
        services,
        refused: Mutex::default(),
        held: Arc::default(),
    });
    let mut config = GatewayConfig::new("test");
    config.header_read_timeout = Duration::from_secs(1);
    tune(&mut config);
    let listener = Gateway::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let meters = Meters::new();
    let gw = Gateway::counting(router.clone(), config, &meters);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        gw.serve(listener, stopped, std::future::ready(())).await;
    });
    Setup {
        addr,
        router,
        meters,
        _stop: stop,
    }
}

// ----------------------------------------------------------------- client

#[derive(Debug)]
struct Answer {
    status: u16,
    /// Field names lowercased.
    fields: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The gateway's own answer of `kind`: status, header, and a body
    /// of one line.
    fn is_gateway(&self, kind: ErrorKind) -> bool {
        self.status == status_of(kind)
            && self.field("x-skiff-error") == Some(kind.as_str())
            && self.body.ends_with('\n')
            && self.body.lines().count() == 1
    }
}

/// The status each kind of gateway answer has (the README's table),
/// written out here rather than taken from the gateway's own mapping.
fn status_of(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::UnknownService => 404,
        ErrorKind::BadHost | ErrorKind::BadRequest => 400,
        ErrorKind::RequestTooLarge => 413,
        ErrorKind::Unavailable | ErrorKind::TooManyConnections => 503,
        ErrorKind::UpstreamFailed | ErrorKind::ResponseTooLarge => 502,
        ErrorKind::RequestTimeout | ErrorKind::BodyTimeout => 504,
        ErrorKind::StreamingNeedsPersistent => 501,
        ErrorKind::ConnectNotSupported => 405,
    }
}

/// Reads one answer from `s` (by its Content-Length, or to the close).
async fn read_answer(s: &mut TcpStream, head_only: bool) -> Answer {
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut fields);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&buf) {
                let fields: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect();
                let status = resp.code.unwrap();
                let length = fields
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map(|(_, v)| v.parse::<usize>().unwrap());
                let length = if head_only { Some(0) } else { length };
                loop {
                    if length.is_some_and(|l| buf.len() >= n + l) {
                        break;
                    }
                    let mut chunk = [0u8; 8192];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let end = length.map_or(buf.len(), |l| (n + l).min(buf.len()));
                let body = String::from_utf8_lossy(&buf[n..end]).to_string();
                return Answer {
                    status,
                    fields,
                    body,
                };
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!(
                    "closed before an answer: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

/// Sends `request` on a new connection and reads one answer.
async fn ask(addr: SocketAddr, request: &str) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut s, request.starts_with("HEAD ")).await
}

fn get(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// The same request through the gateway's own side and through hyper's
/// (`Expect: 100-continue` sends it there), for checks both must pass.
fn both_sides(host: &str, path: &str) -> [(&'static str, String); 2] {
    [
        ("front", get(host, path)),
        (
            "hyper",
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\n\r\n"),
        ),
    ]
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn requests_are_routed_by_host_on_both_sides() {
    let setup = gateway(|_| {}).await;
    // The service sees the client's field names as written on the
    // gateway's own side, and hyper's lowercase ones on hyper's: which
    // side served the request shows.
    for (side, request) in both_sides("fn.test:8000", "/headers") {
        let request = request.replace("\r\n\r\n", "\r\nX-Probe: 1\r\n\r\n");
        let a = ask(setup.addr, &request).await;
        assert_eq!(a.status, 200, "{side}: {a:?}");
        let probe = if side == "front" {
            "X-Probe: 1"
        } else {
            "x-probe: 1"
        };
        assert!(a.body.contains(probe), "{side}: {}", a.body);
        assert!(
            a.body.contains("x-forwarded-host: fn.test:8000"),
            "{side}: {}",
            a.body
        );
        assert!(
            a.body.contains("x-forwarded-proto: http"),
            "{side}: {}",
            a.body
        );
    }
    // Status and fields pass; fields of the hop do not.
    for (side, request) in both_sides("FN.test", "/teapot") {
        let a = ask(setup.addr, &request).await;
        assert_eq!((a.status, a.body.as_str()), (418, "teapot"), "{side}");
        assert_eq!(a.field("x-custom"), Some("kept"), "{side}");
        assert_eq!(a.field("x-hop"), None, "{side}");
        assert_eq!(a.field("x-skiff-error"), None, "{side}");
        assert!(a.field("date").is_some(), "{side}");
    }
    // A service that is starting is waited for; HTTP/1.0 goes to hyper.
    let a = ask(setup.addr, &get("later.test", "/")).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    let a = ask(setup.addr, "GET / HTTP/1.0\r\nHost: fn.test\r\n\r\n").await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    // Bodies reach the service whole, by Content-Length or chunked.
    let a = ask(
        setup.addr,
        "POST / HTTP/1.1\r\nHost: fn.test\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (200, "5"));
    let chunked = "POST / HTTP/1.1\r\nHost: fn.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                   3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    let a = ask(setup.addr, chunked).await;
    assert_eq!((a.status, a.body.as_str()), (200, "7"));
    // HEAD answers keep their length and have no body.
    let a = ask(setup.addr, "HEAD / HTTP/1.1\r\nHost: fn.test\r\n\r\n").await;
    assert_eq!((a.status, a.field("content-length")), (200, Some("2")));
    assert!(setup.router.reports().is_empty());
}

/// Every answer is counted once, on either side, under its service and
/// status class; the gateway's own answers also by kind, and those for no
/// service under none.
#[tokio::test]
async fn every_answer_is_counted_once_by_service_and_class() {
    let setup = gateway(|_| {}).await;
    let mut asked = Vec::new();
    for (host, path) in [
        ("FN.test", "/"),
        ("fn.test", "/teapot"),
        ("broken.test", "/"),
        ("nope.test", "/"),
    ] {
        for (side, request) in both_sides(host, path) {
            asked.push((side, host, ask(setup.addr, &request).await.status));
        }
    }
    // Persistent: hyper's side, streamed.
    asked.push((
        "hyper",
        "db",
        ask(setup.addr, &get("db.test", "/")).await.status,
    ));
    let statuses: Vec<u16> = asked.iter().map(|a| a.2).collect();
    assert_eq!(
        statuses,
        [200, 200, 418, 418, 503, 503, 404, 404, 200],
        "{asked:?}"
    );
    let snap = setup.meters.snapshot();
    let of = |name: &str| {
        snap.services
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("{name} not counted: {snap:?}"))
    };
    let kind = |k: ErrorKind| ErrorKind::ALL.iter().position(|x| *x == k).unwrap();
    let fun = of("fn");
    assert_eq!(fun.by_class, [0, 2, 0, 2, 0]);
    assert_eq!(fun.buckets.iter().sum::<u64>(), 4);
    assert!(fun.refused.iter().all(|n| *n == 0), "{fun:?}");
    let broken = of("broken");
    assert_eq!(broken.by_class, [0, 0, 0, 0, 2]);
    assert_eq!(broken.refused[kind(ErrorKind::Unavailable)], 2);
    assert_eq!(of("db").by_class, [0, 1, 0, 0, 0]);
    // No row for a name nobody deployed.
    let names: Vec<&str> = snap.services.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["broken", "db", "fn"]);
    assert_eq!(snap.unrouted.by_class, [0, 0, 0, 2, 0]);
    assert_eq!(snap.unrouted.refused[kind(ErrorKind::UnknownService)], 2);
}

#[tokio::test]
async fn each_request_has_an_id_the_service_sees_and_one_record() {
    let setup = gateway(|_| {}).await;
    let mut ids = Vec::new();
    for (side, request) in both_sides("fn.test", "/headers") {
        for sent in [None, Some("client-7"), Some("has space")] {
            let request = match sent {
                Some(id) => request.replace("\r\n\r\n", &format!("\r\nX-Request-Id: {id}\r\n\r\n")),
                None => request.clone(),
            };
            let a = ask(setup.addr, &request).await;
            assert_eq!(a.status, 200, "{side} {sent:?}: {a:?}");
            let id = a
                .field("x-request-id")
                .expect("the answer names its id")
                .to_string();
            // The service saw exactly that id, once.
            let seen: Vec<&str> = a
                .body
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("x-request-id:"))
                .collect();
            assert_eq!(seen, [format!("x-request-id: {id}")], "{side} {sent:?}");
            match sent {
                Some("client-7") => assert_eq!(id, "client-7", "{side}: the client's is kept"),
                _ => assert!(
                    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{side} {sent:?}: a made id, got {id:?}"
                ),
            }
            ids.push((side, id, a.body.len() as u64));
        }
    }
    let made: std::collections::HashSet<_> = ids.iter().map(|i| &i.1).collect();
    assert_eq!(made.len(), ids.len() - 1, "made ids differ: {ids:?}");
    // A refusal, a request that waited for a start, and one for no service.
    let refused = ask(setup.addr, &get("broken.test", "/")).await;
    assert!(refused.field("x-request-id").is_some(), "{refused:?}");
    assert_eq!(ask(setup.addr, &get("later.test", "/")).await.status, 200);
    assert_eq!(ask(setup.addr, &get("nope.test", "/")).await.status, 404);

    let (records, dropped) = setup.meters.take_records();
    assert_eq!(dropped, 0);
    let mut records: Vec<_> = records.into_iter().collect();
    records.sort_by_key(|r| r.at);
    assert_eq!(
        records.len(),
        ids.len() + 2,
        "none for a name nobody deployed"
    );
    for (r, (side, id, body)) in records.iter().zip(&ids) {
        assert_eq!(
            (&*r.service, &*r.path, r.status),
            ("fn", "/headers", 200),
            "{side}"
        );
        assert_eq!(r.method, http::Method::GET);
        assert_eq!(&*r.request_id, id.as_str(), "{side}");
        assert_eq!(r.bytes_out, Some(*body), "{side}");
        assert_eq!(
            (r.bytes_in, r.wake, r.refused),
            (0, Wake::Warm, None),
            "{side}"
        );
        assert_eq!(r.instance.as_deref(), Some("fn"), "{side}");
    }
    let broken = &records[ids.len()];
    assert_eq!((&*broken.service, broken.status), ("broken", 503));
    assert_eq!(broken.refused, Some(ErrorKind::Unavailable));
    assert_eq!(broken.instance, None);
    let later = &records[ids.len() + 1];
    assert_eq!(
        (&*later.service, later.status, later.wake),
        ("later", 200, Wake::Cold)
    );
    assert_eq!(later.instance.as_deref(), Some("later"));
}

#[tokio::test]
async fn with_the_request_log_off_requests_keep_their_ids_and_leave_no_record() {
    let setup = gateway(|c| c.request_log = false).await;
    for (side, request) in both_sides("fn.test", "/headers") {
        let a = ask(setup.addr, &request).await;
        assert_eq!(a.status, 200, "{side}");
        let id = a.field("x-request-id").expect("an id all the same");
        assert!(a.body.contains(&format!("x-request-id: {id}")), "{side}");
    }
    let (records, dropped) = setup.meters.take_records();
    assert!(records.is_empty() && dropped == 0, "{records:?}");
    // Counted for /metrics all the same.
    assert_eq!(setup.meters.snapshot().services[0].1.count(), 2);
}

#[tokio::test]
async fn requests_on_one_connection_are_answered_in_turn() {
    let setup = gateway(|_| {}).await;
    let mut s = TcpStream::connect(setup.addr).await.unwrap();
    for path in ["/", "/teapot", "/"] {
        s.write_all(get("fn.test", path).as_bytes()).await.unwrap();
        let a = read_answer(&mut s, false).await;
        let expected = if path == "/teapot" { 418 } else { 200 };
        assert_eq!(a.status, expected, "{path}: {a:?}");
    }
    // Pipelined, the answers come in order.
    let two = format!("{}{}", get("fn.test", "/teapot"), get("fn.test", "/"));
    s.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s, false).await.body, "teapot");
    assert_eq!(read_answer(&mut s, false).await.body, "ok");
}

#[tokio::test]
async fn a_clients_forwarded_for_is_replaced_and_a_trusted_proxys_kept() {
    for (trusted, want) in [(false, "127.0.0.1"), (true, "10.1.2.3, 127.0.0.1")] {
        let setup = gateway(|c| {
            if trusted {
                c.trusted_proxies = Arc::from(["127.0.0.1/32".parse().unwrap()]);
            }
        })
        .await;
        for version in ["1.1", "1.0"] {
            let request = format!(
                "GET /headers HTTP/{version}\r\nHost: fn.test\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n"
            );
            let a = ask(setup.addr, &request).await;
            let seen: Vec<&str> = a
                .body
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
                .collect();
            assert_eq!(
                seen,
                [format!("x-forwarded-for: {want}")],
                "trusted {trusted}, HTTP/{version}"
            );
        }
    }
}

#[tokio::test]
async fn unknown_services_and_hosts_get_404() {
    let setup = gateway(|_| {}).await;
    for (side, request) in both_sides("nope.test", "/") {
        let a = ask(setup.addr, &request).await;
        assert!(a.is_gateway(ErrorKind::UnknownService), "{side}: {a:?}");
        assert!(
            a.body
                .starts_with("No service named \"nope\" is deployed here (deployed: "),
            "{side}: {}",
            a.body
        );
    }
    let a = ask(setup.addr, &get("example.com", "/")).await;
    assert!(a.is_gateway(ErrorKind::UnknownService), "{a:?}");
    assert_eq!(
        a.body,
        "No service is reachable at host \"example.com\": skiff routes http://NAME.test/ to \
         the service NAME.\n"
    );
    assert_eq!(a.field("content-type"), Some("text/plain; charset=utf-8"));
}

#[tokio::test]
async fn gateway_answers_are_json_when_asked_for() {
    let setup = gateway(|_| {}).await;
    let a = ask(
        setup.addr,
        "GET / HTTP/1.1\r\nHost: example.com\r\nAccept: application/json\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.field("content-type"), Some("application/json"));
    assert_eq!(
        a.body,
        "{\"error\":\"unknown-service\",\"message\":\"No service is reachable at host \
         \\\"example.com\\\": skiff routes http://NAME.test/ to the service NAME.\",\
         \"retryable\":false,\"source\":\"client\",\"status\":404}\n"
    );
    // On the gateway's own side too (a refusal after the exchange).
    let a = ask(
        setup.addr,
        "GET /big HTTP/1.1\r\nHost: fn.test\r\nAccept: application/json\r\n\r\n",
    )
    .await;
    assert_eq!(
        (a.status, a.field("content-type")),
        (502, Some("application/json"))
    );
    assert!(
        a.body.contains("\"error\":\"response-too-large\""),
        "{}",
        a.body
    );
    assert!(a.body.contains("\"source\":\"upstream\""), "{}", a.body);
}

#[tokio::test]
async fn requests_without_a_usable_host_get_400() {
    let setup = gateway(|_| {}).await;
    let a = ask(setup.addr, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(a.is_gateway(ErrorKind::BadHost), "{a:?}");
    assert!(a.body.contains("no Host header"), "{}", a.body);
    let a = ask(
        setup.addr,
        "GET / HTTP/1.1\r\nHost: fn.test\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert!(a.is_gateway(ErrorKind::BadRequest), "{a:?}");
    assert_eq!(
        a.body,
        "The request has more than one Host header; send exactly one.\n"
    );
    assert_eq!(a.field("connection"), Some("close"));
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_announced_or_chunked() {
    let setup = gateway(|_| {}).await;
    let announced = format!(
        "POST / HTTP/1.1\r\nHost: fn.test\r\nContent-Length: 101\r\n\r\n{}",
        "x".repeat(101)
    );
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: fn.test\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n{}\r\n0\r\n\r\n",
        "x".repeat(101)
    );
    for request in [announced, chunked] {
        let a = ask(setup.addr, &request).await;
        assert!(a.is_gateway(ErrorKind::RequestTooLarge), "{a:?}");
        assert!(
            a.body
                .contains("more than 100B = 100 bytes (limits.max_request)"),
            "{}",
            a.body
        );
    }
    // Exactly at the limit passes.
    let at = format!(
        "POST / HTTP/1.1\r\nHost: fn.test\r\nContent-Length: 100\r\n\r\n{}",
        "x".repeat(100)
    );
    assert_eq!(ask(setup.addr, &at).await.body, "100");
    let refused = setup.router.reports();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused
        .iter()
        .all(|(s, k, _)| s == "fn" && *k == ErrorKind::RequestTooLarge));
}

#[tokio::test]
async fn a_service_that_cannot_serve_gets_503_with_retry_after() {
    let setup = gateway(|_| {}).await;
    for (side, request) in both_sides("broken.test", "/") {
        let a = ask(setup.addr, &request).await;
        assert!(a.is_gateway(ErrorKind::Unavailable), "{side}: {a:?}");
        assert_eq!(a.field("retry-after"), Some("5"));
        assert_eq!(
            a.body, "Service \"broken\" is unavailable: its build failed\n",
            "{side}"
        );
    }
}

#[tokio::test]
async fn a_broken_exchange_gets_502_and_is_reported() {
    let setup = gateway(|_| {}).await;
    for path in ["/crash", "/garbage"] {
        for (side, request) in both_sides("fn.test", path) {
            let a = ask(setup.addr, &request).await;
            assert!(
                a.is_gateway(ErrorKind::UpstreamFailed),
                "{side} {path}: {a:?}"
            );
            assert!(
                a.body.starts_with("Service \"fn\" ") && a.body.contains("skiff logs fn`"),
                "{side} {path}: {}",
                a.body
            );
        }
    }
    // A persistent service's broken exchange (hyper's client).
    let a = ask(setup.addr, &get("db.test", "/crash")).await;
    assert!(a.is_gateway(ErrorKind::UpstreamFailed), "{a:?}");
    let refused = setup.router.reports();
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused
        .iter()
        .all(|(_, k, _)| *k == ErrorKind::UpstreamFailed));
}

#[tokio::test]
async fn answers_over_the_limit_get_502() {
    let setup = gateway(|_| {}).await;
    for (side, request) in both_sides("fn.test", "/big") {
        let a = ask(setup.addr, &request).await;
        assert!(a.is_gateway(ErrorKind::ResponseTooLarge), "{side}: {a:?}");
        assert_eq!(
            a.body,
            "Response is bigger than the maximum allowed size: service \"fn\" answered with \
             more than 1000B = 1000 bytes (limits.max_response). Store large data in object \
             storage and return its URL instead.\n",
            "{side}"
        );
    }
    // A persistent service has no limit.
    let a = ask(setup.addr, &get("db.test", "/big")).await;
    assert_eq!((a.status, a.body.len()), (200, 2000));
}

#[tokio::test]
async fn a_late_answer_gets_504_and_the_connection_stays_usable() {
    let setup = gateway(|_| {}).await;
    for (side, request) in both_sides("slowpoke.test", "/slow") {
        let mut s = TcpStream::connect(setup.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let a = read_answer(&mut s, false).await;
        assert!(a.is_gateway(ErrorKind::RequestTimeout), "{side}: {a:?}");
        assert!(
            a.body.contains("within the request timeout of 300ms"),
            "{side}: {}",
            a.body
        );
        s.write_all(get("slowpoke.test", "/").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_answer(&mut s, false).await.body, "ok", "{side}");
    }
    let refused = setup.router.reports();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused
        .iter()
        .all(|(s, k, _)| s == "slowpoke" && *k == ErrorKind::RequestTimeout));
}

#[tokio::test]
async fn a_body_that_stops_coming_gets_504_on_both_sides() {
    // No minimum rate: the request timeout (300 ms) cuts it off.
    let setup = gateway(|c| c.min_body_rate = 0).await;
    let plain = "POST / HTTP/1.1\r\nHost: slowpoke.test\r\nContent-Length: 10\r\n\r\nab";
    let chunked =
        "POST / HTTP/1.1\r\nHost: slowpoke.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n";
    for request in [plain, chunked] {
        let a = ask(setup.addr, request).await;
        assert!(a.is_gateway(ErrorKind::BodyTimeout), "{request}: {a:?}");
        assert!(
            a.body.contains("request timeout of 300ms")
                && a.body.contains("was not sent to the service"),
            "{}",
            a.body
        );
        if request == plain {
            assert_eq!(a.field("connection"), Some("close"), "{a:?}");
        }
    }
    // The client is to blame: nothing is reported against the service.
    assert!(setup.router.reports().is_empty());
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_gets_504() {
    // 1 s timeout, 200 ms of grace, then 1000 bytes a second.
    let setup = gateway(|c| {
        c.min_body_rate = 1000;
        c.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let plain = "POST / HTTP/1.1\r\nHost: fn.test\r\nContent-Length: 50\r\n\r\nab";
    let chunked =
        "POST / HTTP/1.1\r\nHost: fn.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n";
    for request in [plain, chunked] {
        let started = std::time::Instant::now();
        let a = ask(setup.addr, request).await;
        assert!(a.is_gateway(ErrorKind::BodyTimeout), "{request}: {a:?}");
        assert!(
            a.body.contains("arrived too slowly: 2 bytes") && a.body.contains("--min-body-rate"),
            "{}",
            a.body
        );
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "cut off by the rate"
        );
    }
}

#[tokio::test]
async fn upgrades_are_refused_to_serverless_services_and_proxied_to_persistent_ones() {
    let setup = gateway(|_| {}).await;
    let upgrade = |host: &str| {
        format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
    };
    let a = ask(setup.addr, &upgrade("fn.test")).await;
    assert!(a.is_gateway(ErrorKind::StreamingNeedsPersistent), "{a:?}");
    assert!(a.body.contains("long-lived echo connection"), "{}", a.body);
    assert_eq!(
        setup.router.reports(),
        [(
            "fn".to_string(),
            ErrorKind::StreamingNeedsPersistent,
            a.body.trim_end().to_string()
        )]
    );

    let mut s = TcpStream::connect(setup.addr).await.unwrap();
    s.write_all(upgrade("db.test").as_bytes()).await.unwrap();
    let a = read_answer(&mut s, true).await;
    assert_eq!(a.status, 101, "{a:?}");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn connect_gets_405() {
    let setup = gateway(|_| {}).await;
    for request in [
        "CONNECT fn.test:80 HTTP/1.1\r\nHost: fn.test:80\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ] {
        let a = ask(setup.addr, request).await;
        assert!(a.is_gateway(ErrorKind::ConnectNotSupported), "{a:?}");
        assert_eq!(
            a.field("allow"),
            Some("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH")
        );
        assert_eq!(a.field("connection"), Some("close"));
        assert!(a.body.contains("not a forward proxy"), "{}", a.body);
    }
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_are_closed() {
    let setup = gateway(|c| {
        c.connections = ConnectionLimits {
            total: 10,
            per_address: 1,
        }
    })
    .await;
    let mut first = TcpStream::connect(setup.addr).await.unwrap();
    // Served, so admitted before the second connects.
    first
        .write_all(get("fn.test", "/").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut first, false).await.body, "ok");
    let mut second = TcpStream::connect(setup.addr).await.unwrap();
    let a = read_answer(&mut second, false).await;
    assert!(a.is_gateway(ErrorKind::TooManyConnections), "{a:?}");
    assert_eq!(a.field("retry-after"), Some("5"));
    assert_eq!(
        a.body,
        "Too many connections from your address are open at this gateway; close idle ones \
         or try again in a moment.\n"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the refused connection is closed");
}

#[tokio::test]
async fn a_head_that_never_completes_is_closed() {
    let setup = gateway(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(setup.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: fn.te").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a slow head's connection is still open after 5 s"
    );
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// A request refused while its service is serving (a full queue) is
/// answered once, on the gateway's own side, and the connection goes on
/// with the client's next request.
#[tokio::test]
async fn a_refused_request_is_answered_once_and_the_next_one_served() {
    let setup = gateway(|_| {}).await;
    let mut s = TcpStream::connect(setup.addr).await.unwrap();
    // Pipelined: the refused request and the next one in one write.
    let two = format!("{}{}", get("full.test", "/"), get("fn.test", "/"));
    s.write_all(two.as_bytes()).await.unwrap();
    let first = read_answer(&mut s, false).await;
    assert!(first.is_gateway(ErrorKind::Unavailable), "{first:?}");
    assert_eq!(
        first.body,
        "Service \"full\" is unavailable: its queue is full\n"
    );
    let second = read_answer(&mut s, false).await;
    assert_eq!(
        (second.status, second.body.as_str()),
        (200, "ok"),
        "{second:?}"
    );
    // One after the other on the same connection.
    s.write_all(get("full.test", "/").as_bytes()).await.unwrap();
    assert!(read_answer(&mut s, false)
        .await
        .is_gateway(ErrorKind::Unavailable));
    s.write_all(get("fn.test", "/").as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s, false).await.body, "ok");
    assert_eq!(setup.router.held(), 0);
}

/// Waits up to 2 s for every lease to be given back.
async fn all_given_back(router: &FakeRouter) -> bool {
    for _ in 0..200 {
        if router.held() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A client that leaves while its request waits for an instance, or while
/// the instance works on it, gives its place back at once, on both sides.
#[tokio::test]
async fn a_client_that_leaves_gives_its_instance_back() {
    let setup = gateway(|_| {}).await;
    for (side, request) in both_sides("sleepy.test", "/")
        .into_iter()
        .chain(both_sides("fn.test", "/slow"))
    {
        let mut s = TcpStream::connect(setup.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            setup.router.held(),
            1,
            "{side}: {request:?} holds its place"
        );
        drop(s);
        assert!(
            all_given_back(&setup.router).await,
            "{side}: {request:?} still holds {} after its client left",
            setup.router.held()
        );
    }
    // And one that stays gets its answer, and gives the place back then.
    let a = ask(setup.addr, &get("sleepy.test", "/")).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"), "{a:?}");
    assert!(all_given_back(&setup.router).await);
}
