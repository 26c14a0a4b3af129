//! The serverless gateway: request timeout, response and request size
//! limits, clean errors, pass-through, HTTP/2, and robustness against
//! misbehaving clients and services.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

const LIMIT: usize = 6 * 1024 * 1024;

/// A service with endpoints that misbehave on request.
pub const APP: &str = r#"
import json, os, socket, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

def pattern(n):
    block = bytes(i % 251 for i in range(251 * 64))
    return (block * (n // len(block) + 1))[:n]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def q(self):
        u = urlparse(self.path)
        return u.path, {k: v[0] for k, v in parse_qs(u.query).items()}
    def send(self, body, code=200, headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        path, q = self.q()
        if path == "/size":
            self.send(pattern(int(q["n"])))
        elif path == "/chunked":
            data = pattern(int(q["n"]))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 65536):
                part = data[i:i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/sleep":
            time.sleep(int(q["ms"]) / 1000)
            self.send(b"slept")
        elif path == "/status":
            self.send(b"teapot", int(q["code"]), [("X-Custom", "kept"), ("Cache-Control", "no-store")])
        elif path == "/peer":
            self.send(str(self.client_address[1]).encode())
        elif path == "/headers":
            seen = {k.lower(): v for k, v in self.headers.items()}
            self.send(json.dumps(seen).encode())
        elif path == "/close-mid":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif path == "/garbage":
            self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.send(b"ok")
    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += len(self.rfile.read(size))
                self.rfile.readline()
        else:
            total = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send(str(total).encode())
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

fn pattern(n: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..251 * 64).map(|i| (i % 251) as u8).collect();
    block.iter().copied().cycle().take(n).collect()
}

fn start(name: &str, extra: &[&str]) -> (App, Up) {
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 app.py\"\n[limits]\n\
             request_timeout = \"2s\"\nmax_request = \"1MiB\"\n"
        ),
        &[("app.py", APP)],
    );
    let mut up = Up::start(&[app.path()], extra);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    (app, up)
}

/// The app as a service of one instance taking one request at a time,
/// with a short wait in the queue (1 s) and the given request timeout.
fn start_one_at_a_time(name: &str, request_timeout: &str) -> (App, Up) {
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 app.py\"\n[limits]\n\
             max_instances = 1\nconcurrency = 1\nqueue_timeout = \"1s\"\n\
             request_timeout = \"{request_timeout}\"\n"
        ),
        &[("app.py", APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    (app, up)
}

/// Sends raw bytes, returns everything the gateway answers until it closes
/// or goes quiet.
fn raw(port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn head_and_body(raw: &[u8]) -> (String, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    (
        String::from_utf8_lossy(&raw[..split]).into_owned(),
        raw[split + 4..].to_vec(),
    )
}

/// The Content-Length of a response head, when it has a readable one.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// Reads one answer with a Content-Length from a kept-alive connection.
fn read_answer(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(split) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..split]).into_owned();
            let length = content_length(&head).expect("a Content-Length");
            if got.len() >= split + 4 + length {
                return (head, got[split + 4..split + 4 + length].to_vec());
            }
        }
        let n = s.read(&mut chunk).expect("the answer");
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
}

fn get_raw(port: u16, host: &str, path: &str) -> (String, Vec<u8>) {
    head_and_body(&raw(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    ))
}

#[test]
fn responses_up_to_the_limit_pass_byte_for_byte_and_one_more_byte_is_502() {
    let name = unique("size");
    let (_app, up) = start(&name, &[]);
    let port = up.port.unwrap();
    let h = host(&name);
    for path in ["/size", "/chunked"] {
        let (head, body) = get_raw(port, &h, &format!("{path}?n={LIMIT}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert_eq!(body.len(), LIMIT, "{path}");
        assert!(body == pattern(LIMIT), "{path}: the body was changed");

        let (head, body) = get_raw(port, &h, &format!("{path}?n={}", LIMIT + 1));
        assert!(head.starts_with("HTTP/1.1 502"), "{path}: {head}");
        assert!(head.contains("x-skiff-error: response-too-large"), "{head}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("Response is bigger than the maximum allowed size"),
            "{text}"
        );
        assert!(
            text.contains("6291456 bytes") && text.contains("object storage"),
            "{text}"
        );
    }
}

#[test]
fn a_request_past_the_timeout_gets_504_and_the_instance_stays_usable() {
    let name = unique("timeout");
    let (_app, up) = start(&name, &[]);
    let t = Instant::now();
    let r = up.get(&host(&name), "/sleep?ms=5000");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "answered after {:?}",
        t.elapsed()
    );
    assert_eq!(r.header("x-skiff-error"), Some("request-timeout"));
    assert!(r.body.contains("request timeout of 2s"), "{r:?}");
    assert!(r.body.contains("mode = \"persistent\""), "{r:?}");
    let r = up.get(&host(&name), "/");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}

#[test]
fn request_bodies_over_the_limit_get_413_whether_announced_or_chunked() {
    let name = unique("upload");
    let (_app, up) = start(&name, &[]);
    let port = up.port.unwrap();
    let h = host(&name);
    let big = vec![b'a'; 2 << 20];

    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let (head, body) = head_and_body(&raw(port, &req));
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("limits.max_request"));

    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.chunks(64 * 1024) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (head, _) = head_and_body(&raw(port, &req));
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    let small = vec![b'b'; 100_000];
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        small.len()
    )
    .into_bytes();
    req.extend_from_slice(&small);
    let (head, body) = head_and_body(&raw(port, &req));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"100000");
}

#[test]
fn the_service_status_and_headers_pass_and_forwarding_headers_are_added() {
    let name = unique("pass");
    let (_app, up) = start(&name, &[]);
    let r = up.get(&host(&name), "/status?code=418");
    assert_eq!(r.status, 418);
    assert_eq!(r.header("x-custom"), Some("kept"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("x-skiff-error"),
        None,
        "the service's own answer is not marked"
    );
    let seen = up.get(&host(&name), "/headers").body;
    assert!(
        seen.contains("\"x-forwarded-for\": \"127.0.0.1\""),
        "{seen}"
    );
    assert!(seen.contains("\"x-forwarded-proto\": \"http\""), "{seen}");
    assert!(
        seen.contains(&format!("\"x-forwarded-host\": \"{}\"", host(&name))),
        "{seen}"
    );
    assert!(
        !seen.contains("\"connection\""),
        "hop-by-hop header forwarded: {seen}"
    );
}

#[test]
fn requests_on_one_connection_reuse_one_connection_to_the_instance() {
    let name = unique("pool");
    let (_app, up) = start(&name, &[]);
    let port = up.port.unwrap();
    let h = host(&name);
    // One client connection stays on one gateway thread, whose pool
    // holds the connection to the instance between requests: the
    // instance sees every request come from the same port.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut peers = Vec::new();
    for _ in 0..5 {
        s.write_all(format!("GET /peer HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
            .unwrap();
        let (head, body) = read_answer(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        peers.push(String::from_utf8(body).unwrap());
    }
    assert!(
        peers[1..].iter().all(|p| *p == peers[0]),
        "a new connection to the instance per request: {peers:?}"
    );
}

#[test]
fn gateway_errors_are_json_when_asked_for() {
    let name = unique("json");
    let (_app, up) = start(&name, &[]);
    let (head, body) = head_and_body(&raw(
        up.port.unwrap(),
        b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    ));
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"error\":\"unknown-service\""), "{text}");
    assert!(text.contains("\"source\":\"client\""), "{text}");
    assert!(text.contains("\"retryable\":false"), "{text}");
}

#[test]
fn http2_prior_knowledge_clients_are_served() {
    use http_body_util::BodyExt;
    let name = unique("h2");
    let (_app, up) = start(&name, &[]);
    let port = up.port.unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2c handshake");
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{name}.localhost:{port}/status?code=418"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.headers()["x-custom"], "kept");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"teapot");
    });
    // Counted under its service, which HTTP/2 names in the authority.
    let (status, metrics) = up.api("GET", "/metrics", b"", None);
    assert_eq!(status, 200, "{metrics}");
    let counted = format!("faas_invocations_total{{faas_name=\"{name}\",status_class=\"4xx\"}} 1");
    assert!(metrics.contains(&counted), "{counted} in\n{metrics}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn misbehaving_clients_and_services_get_the_right_status_and_nothing_leaks() {
    let name = unique("robust");
    let (_app, up) = start(&name, &["--header-timeout", "1s", "--idle-timeout", "2s"]);
    let port = up.port.unwrap();
    let h = host(&name);
    let pid = up.child.id();
    // Warm up the pool, then count.
    assert_eq!(up.get(&h, "/").status, 200);
    let fds_before = open_fds(pid);

    for _ in 0..3 {
        // Malformed request line.
        let (head, _) = head_and_body(&raw(port, b"GARBAGE\r\n\r\n"));
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");

        // Oversized headers.
        let big = "a".repeat(100 * 1024);
        let answer = raw(
            port,
            format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 431") || text.is_empty(),
            "{text:.200}"
        );

        // Smuggling, CL.TE: the body is read as chunked (Content-Length is
        // dropped), the connection is closed after the answer, and what
        // was hidden after the body never reaches the service.
        let answer = raw(
            port,
            format!(
                "POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\n\r\nGET /status?code=418 HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let text = String::from_utf8_lossy(&answer);
        let (first, rest) = head_and_body(&answer);
        let rest = rest.as_slice();
        assert!(first.starts_with("HTTP/1.1 200"), "{text}");
        assert!(first.contains("connection: close"), "{text}");
        assert_eq!(
            rest, b"0",
            "the service saw an empty chunked body and nothing else: {text}"
        );
        // Two Host fields: the gateway and the service might route by
        // different ones.
        let (head, _) = head_and_body(&raw(
            port,
            format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: other.localhost\r\n\r\n").as_bytes(),
        ));
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        // A request target with characters a URI cannot have.
        let (head, _) = head_and_body(&raw(
            port,
            format!("GET /a<b> HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes(),
        ));
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        // Content-Length values that disagree are refused.
        let (head, _) = head_and_body(&raw(
            port,
            format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").as_bytes(),
        ));
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");

        // A service that breaks off its response, or answers garbage.
        for path in ["/close-mid", "/garbage"] {
            let r = up.get(&h, path);
            assert_eq!(r.status, 502, "{path}: {r:?}");
            assert_eq!(r.header("x-skiff-error"), Some("upstream-failed"), "{path}");
        }

        // A client that disappears mid-response.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(format!("GET /size?n={LIMIT} HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
            .unwrap();
        let mut some = [0u8; 1000];
        s.read_exact(&mut some).unwrap();
        drop(s);
    }

    // Slowloris: headers that never finish are cut off, others are served.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {h}\r\n").as_bytes())
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    assert_eq!(up.get(&h, "/").status, 200, "others are served meanwhile");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the slow client held on for {:?}",
        t.elapsed()
    );

    // A connection in use outlives the timeouts (header 1 s, idle 2 s,
    // request 2 s), as each request moves them on: slow answers back to
    // back and pauses between requests, 4 s in all. Left idle, it is
    // closed after the idle timeout.
    let mut busy = TcpStream::connect(("127.0.0.1", port)).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for i in 0..8 {
        busy.write_all(format!("GET /sleep?ms=300 HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
            .unwrap();
        let (head, body) = read_answer(&mut busy);
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert_eq!(body, b"slept");
        if i % 2 == 0 {
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    let t = Instant::now();
    let mut rest = Vec::new();
    let closed = busy.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "an idle connection is closed: {closed:?} {rest:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(500) && t.elapsed() < Duration::from_secs(5),
        "closed after {:?} idle; the idle timeout is 2 s",
        t.elapsed()
    );

    assert_eq!(up.get(&h, "/").status, 200, "still serving");
    std::thread::sleep(Duration::from_millis(500));
    let fds_after = open_fds(pid);
    // Each gateway thread (one per core) may keep a pooled connection or
    // two to the instance; nothing per request survives it.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        fds_after <= fds_before + 2 * threads + 2,
        "file descriptors grew from {fds_before} to {fds_after}"
    );
}

#[test]
fn a_slow_upload_holds_no_instance_slot() {
    // One instance taking one request at a time, and a short queue wait:
    // were the upload's request given the instance while its body
    // trickles in, the next request would be turned away.
    let name = unique("slowup");
    let (_app, up) = start_one_at_a_time(&name, "10s");
    let port = up.port.unwrap();
    let h = host(&name);
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1000\r\n\r\npart").as_bytes(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let r = up.get(&h, "/");
        assert_eq!(r.status, 200, "served while the upload trickles: {r:?}");
    }
    drop(slow);
}

/// Splits answers sent one after another on a connection; `bodiless[i]`
/// when the i-th answers a HEAD request.
fn split_answers(mut raw: &[u8], bodiless: &[bool]) -> Vec<(String, Vec<u8>)> {
    let mut answers = Vec::new();
    for (i, no_body) in bodiless.iter().enumerate() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!("answer {i} has no head: {:?}", String::from_utf8_lossy(raw))
            });
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let length = content_length(&head)
            .unwrap_or_else(|| panic!("answer {i} has no readable Content-Length: {head}"));
        let length = if *no_body { 0 } else { length };
        answers.push((head, raw[end + 4..end + 4 + length].to_vec()));
        raw = &raw[end + 4 + length..];
    }
    assert!(
        raw.is_empty(),
        "bytes after the last answer: {:?}",
        String::from_utf8_lossy(raw)
    );
    answers
}

#[test]
fn pipelined_requests_in_pieces_are_answered_in_order_and_hyper_takes_over_unusual_ones() {
    let name = unique("pipe");
    let (_app, up) = start(&name, &[]);
    let h = host(&name);
    let requests = format!(
        "GET /status?code=201 HTTP/1.1\r\nHost: {h}\r\n\r\n\
         HEAD /size?n=5 HTTP/1.1\r\nHost: {h}\r\n\r\n\
         POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\n\r\nabc\
         GET /headers HTTP/1.1\r\nHost: {h}\r\nX-Forwarded-For: 10.1.2.3\r\nKeep-Alive: 5\r\n\r\n\
         POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         4\r\nwxyz\r\n0\r\n\r\n"
    );
    let bytes = requests.as_bytes();
    // Cut mid-line of the second head, mid-body of the third request, and
    // inside the chunked body that hyper reads: each piece arrives alone.
    let cuts = [
        requests.find("HEAD /si").unwrap() + 8,
        requests.find("abc").unwrap() + 1,
        requests.find("wxyz").unwrap() + 2,
    ];
    let mut s = TcpStream::connect(("127.0.0.1", up.port.unwrap())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut from = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        s.write_all(&bytes[from..cut]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        from = cut;
    }
    let mut all = Vec::new();
    s.read_to_end(&mut all)
        .expect("the connection is closed after the request that asked for it");
    let answers = split_answers(&all, &[false, true, false, false, false]);

    let (head, body) = &answers[0];
    assert!(head.starts_with("HTTP/1.1 201 "), "{head}");
    assert!(head.contains("X-Custom: kept"), "{head}");
    assert_eq!(body, b"teapot");
    // http.server has no HEAD handler: 501 with the length of the body it
    // did not send, and it closes its side; the client's connection goes on.
    let (head, body) = &answers[1];
    assert!(head.starts_with("HTTP/1.1 501 "), "{head}");
    assert!(body.is_empty());
    assert_eq!(answers[2].1, b"3", "{}", answers[2].0);
    let seen = String::from_utf8_lossy(&answers[3].1);
    // The client is no trusted proxy: its own X-Forwarded-For is replaced.
    assert!(
        seen.contains("\"x-forwarded-for\": \"127.0.0.1\""),
        "{seen}"
    );
    assert!(
        !seen.contains("keep-alive"),
        "hop-by-hop field forwarded: {seen}"
    );
    let (head, body) = &answers[4];
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, b"4", "the chunked body reached the service whole");

    // Two requests, then the client shuts its sending side: both are
    // still answered, then the connection closes.
    let mut s = TcpStream::connect(("127.0.0.1", up.port.unwrap())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!(
            "GET /sleep?ms=300 HTTP/1.1\r\nHost: {h}\r\n\r\n\
             GET /status?code=202 HTTP/1.1\r\nHost: {h}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let answers = split_answers(&all, &[false, false]);
    assert_eq!(answers[0].1, b"slept", "{}", answers[0].0);
    assert!(
        answers[1].0.starts_with("HTTP/1.1 202 "),
        "{}",
        answers[1].0
    );
}

#[test]
fn a_body_that_stops_coming_gets_504_and_a_client_that_leaves_frees_the_instance() {
    // One instance, one request at a time, a short wait in the queue.
    let name = unique("leave");
    let (_app, up) = start_one_at_a_time(&name, "2s");
    let port = up.port.unwrap();
    let h = host(&name);

    // 100 bytes announced, 10 sent: the request timeout answers, marked
    // as the client's doing (the service is not blamed), and the
    // connection closes (the answer is not lost to a reset).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 100\r\n\r\n0123456789").as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let (head, body) = head_and_body(&answer);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(
        head.contains("x-skiff-error: request-body-timeout"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("2s"),
        "names the timeout"
    );

    // A client that sends a slow request and leaves at once: the instance's
    // one slot is free again, so the next request is served instead of
    // waiting out the queue.
    for _ in 0..2 {
        let mut gone = TcpStream::connect(("127.0.0.1", port)).unwrap();
        gone.write_all(format!("GET /sleep?ms=1500 HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(gone);
        std::thread::sleep(Duration::from_millis(100));
        let r = up.get(&h, "/");
        assert_eq!(r.status, 200, "{r:?}");
    }
}
