//! The serverless exchange with an instance, done in the request's own
//! task: the request (its body already received whole, as the contract's
//! size limit allows) is written to a pooled keep-alive connection and the
//! response read back whole, up to its limit, with `httparse`. No client
//! connection task, no channel between them, one buffer per connection:
//! this is the path of nearly every request, so it does the least work.
//! Persistent services (streaming, upgrades) go through hyper's client.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::route::Upstream;

/// Largest response head read from an instance.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;
/// Idle connections kept per instance (per gateway thread).
const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections of instances that are gone are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What went wrong talking to the instance.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// No connection could be made.
    Connect(io::Error),
    /// The connection broke (reset, or closed) before a whole response.
    Broken(io::Error),
    /// What came back is not HTTP/1.x.
    Malformed(String),
    /// The response is over the limit.
    TooLarge,
}

impl ExchangeError {
    /// Closed before any byte of a response: on a reused connection this
    /// is the instance having closed it while it sat idle.
    fn is_early_close(&self, got_bytes: bool) -> bool {
        matches!(self, Self::Broken(_)) && !got_bytes
    }
}

/// A response received whole.
pub(crate) struct Received {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The response has no body by its nature (HEAD, 204, 304): its
    /// Content-Length, if any, describes another message and passes as is.
    pub bodiless: bool,
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
}

/// Idle keep-alive connections by instance key.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    last_sweep: Mutex<Instant>,
}

impl Pool {
    pub(crate) fn new() -> Self {
        Self {
            idle: Mutex::default(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// An idle connection to `key` that is still open.
    fn take(&self, key: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(key)?;
        while let Some(conn) = conns.pop() {
            let mut probe = [0u8; 1];
            // Open and quiet: reads would block. Closed (0) or talking out
            // of turn: not reusable.
            if matches!(conn.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, key: &str, mut conn: Conn, alive: impl Fn(&str) -> bool) {
        conn.buf.clear();
        // A large response's buffer is not kept for an idle connection.
        if conn.buf.capacity() > 64 * 1024 {
            conn.buf = BytesMut::with_capacity(8 * 1024);
        }
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry(key.to_string()).or_default();
        if conns.len() < MAX_IDLE {
            conns.push(conn);
        }
        let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= SWEEP_EVERY {
            *last = Instant::now();
            sweep(&mut idle, alive);
        }
    }

    /// Drops idle connections that timed out or whose instance is gone
    /// (called now and then, also when no request comes).
    pub(crate) fn sweep(&self, alive: impl Fn(&str) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        sweep(&mut idle, alive);
    }
}

fn sweep(idle: &mut HashMap<String, Vec<Conn>>, alive: impl Fn(&str) -> bool) {
    idle.retain(|key, conns| {
        conns.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
        !conns.is_empty() && alive(key)
    });
}

/// One request, ready to send.
pub(crate) struct Outgoing<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The request head, and the body after it when it is small (one write).
fn serialize(req: &Outgoing<'_>) -> Vec<u8> {
    let inline = req.body.len() <= INLINE_BODY;
    let mut head =
        Vec::with_capacity(256 + req.headers.len() * 48 + if inline { req.body.len() } else { 0 });
    head.extend_from_slice(req.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(req.path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers {
        // Framed anew below; and the body is already here, so an `Expect:
        // 100-continue` has been answered (by the gateway, to the client).
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let has_body =
        !req.body.is_empty() || matches!(*req.method, Method::POST | Method::PUT | Method::PATCH);
    if has_body {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(req.body.len().to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    if inline {
        head.extend_from_slice(&req.body);
    }
    head
}

/// Response bodies up to this size are copied out of the read buffer.
const COPY_BODY: usize = 4096;

/// Bodies up to this size are sent with the head in one write.
const INLINE_BODY: usize = 16 * 1024;

/// Sends `req` to the instance behind `upstream` and receives the whole
/// response, at most `max` body bytes. A pooled connection the instance
/// closed while idle is replaced once, for idempotent requests.
pub(crate) async fn exchange(
    pool: &Pool,
    upstream: &Upstream,
    req: Outgoing<'_>,
    max: u64,
    alive: impl Fn(&str) -> bool,
) -> Result<Received, ExchangeError> {
    let head = serialize(&req);
    let head_only = req.method == Method::HEAD;
    let mut retried = false;
    loop {
        let (mut conn, reused) = match pool.take(&upstream.key) {
            Some(c) => (c, true),
            None => {
                let stream = upstream
                    .connect
                    .connect()
                    .await
                    .map_err(ExchangeError::Connect)?;
                let conn = Conn {
                    stream,
                    buf: BytesMut::with_capacity(8 * 1024),
                    idle_since: Instant::now(),
                };
                (conn, false)
            }
        };
        let mut got_bytes = false;
        let result = round_trip(&mut conn, &head, &req.body, head_only, max, &mut got_bytes).await;
        match result {
            Ok((received, reusable)) => {
                if reusable {
                    pool.put(&upstream.key, conn, alive);
                }
                return Ok(received);
            }
            Err(e)
                if reused && !retried && idempotent(req.method) && e.is_early_close(got_bytes) =>
            {
                retried = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends the ACK the kernel is holding back, at once. Many small servers
/// (Python's `http.server`, for one) write a response's head and body in
/// two writes without `TCP_NODELAY`: the body then waits, by Nagle's
/// algorithm, for the ACK of the head, which our side would delay by up to
/// 40 ms hoping to piggy-back it. Setting `TCP_QUICKACK` sends a pending
/// ACK immediately (the flag is not sticky, so it is set each time).
fn quickack(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
}

async fn read_more(conn: &mut Conn, got_bytes: &mut bool) -> Result<usize, ExchangeError> {
    if conn.buf.capacity() - conn.buf.len() < 4096 {
        conn.buf.reserve(16 * 1024);
    }
    if *got_bytes {
        // Part of the answer is here and the rest must be waited for: ACK
        // now (see `quickack`). A whole answer in one read, the usual case,
        // needs no system call for this.
        quickack(&conn.stream);
    }
    let n = conn
        .stream
        .read_buf(&mut conn.buf)
        .await
        .map_err(ExchangeError::Broken)?;
    if n > 0 {
        *got_bytes = true;
    }
    Ok(n)
}

/// Writes `parts` unless the instance answers first: returns whether it
/// did (then the rest of the request is not sent).
async fn send(stream: &TcpStream, parts: &[&[u8]]) -> io::Result<bool> {
    for part in parts {
        // Nearly always the socket takes it all at once.
        let mut off = match stream.try_write(part) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        while off < part.len() {
            tokio::select! {
                biased;
                ready = stream.readable() => {
                    ready?;
                    if has_input(stream) {
                        return Ok(true);
                    }
                }
                ready = stream.writable() => {
                    ready?;
                    match stream.try_write(&part[off..]) {
                        Ok(n) => off += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(false)
}

/// Whether the instance sent something (or closed its side), without
/// consuming it; clears a stale readiness of the socket otherwise.
fn has_input(stream: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match stream.try_io(tokio::io::Interest::READABLE, || {
        socket2::SockRef::from(stream).peek(&mut probe)
    }) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

fn closed() -> ExchangeError {
    ExchangeError::Broken(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before message completed",
    ))
}

async fn round_trip(
    conn: &mut Conn,
    head: &[u8],
    body: &Bytes,
    head_only: bool,
    max: u64,
    got_bytes: &mut bool,
) -> Result<(Received, bool), ExchangeError> {
    // Small bodies were serialised with the head (one write).
    let answered_early = if body.len() <= INLINE_BODY {
        send(&conn.stream, &[head]).await
    } else {
        send(&conn.stream, &[head, body]).await
    };
    // An instance may answer (say, 401 or 413) and close before it read
    // the whole request: that answer is read and passed on, not lost, and
    // the connection is not reused. A write that failed with nothing to
    // read is an early close (retried on a reused connection).
    let answered_early = match answered_early {
        Ok(early) => early,
        Err(e) => {
            if !has_input(&conn.stream) {
                return Err(ExchangeError::Broken(e));
            }
            true
        }
    };

    // The head; interim (1xx) responses are skipped.
    let (status, _version, headers, keep_alive) = loop {
        let parsed = parse_head(&conn.buf)?;
        match parsed {
            Some((len, status, version, headers, keep_alive)) => {
                conn.buf.advance(len);
                if status.is_informational() {
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(ExchangeError::Malformed(
                            "it switched protocols without being asked to".into(),
                        ));
                    }
                    continue;
                }
                break (status, version, headers, keep_alive);
            }
            None => {
                if conn.buf.len() > MAX_HEAD {
                    return Err(ExchangeError::Malformed(format!(
                        "its response head is over {} KiB",
                        MAX_HEAD / 1024
                    )));
                }
                if read_more(conn, got_bytes).await? == 0 {
                    return Err(if conn.buf.is_empty() {
                        closed()
                    } else {
                        ExchangeError::Malformed("it closed the connection mid-head".into())
                    });
                }
            }
        }
    };

    let no_body =
        head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): chunked
    // last means chunked; any other coding last means "until the close".
    let encoded = headers.contains_key(header::TRANSFER_ENCODING);
    let chunked = encoded
        && headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|l| l.trim().eq_ignore_ascii_case("chunked"))
            });
    let length = if encoded {
        None
    } else {
        content_length(&headers)?
    };
    let (body, reusable) = if no_body {
        (Bytes::new(), keep_alive)
    } else if chunked {
        // With a Content-Length too, the message is suspect (RFC 9112
        // §6.3): read as chunked, and the connection is not reused.
        let reuse = keep_alive && !headers.contains_key(header::CONTENT_LENGTH);
        (read_chunked(conn, max, got_bytes).await?, reuse)
    } else if let Some(len) = length {
        if len > max {
            return Err(ExchangeError::TooLarge);
        }
        let len = len as usize;
        while conn.buf.len() < len {
            if read_more(conn, got_bytes).await? == 0 {
                return Err(closed());
            }
        }
        // A small body is copied out, so the connection's buffer stays
        // whole and is reused by the next exchange instead of a new one
        // being allocated; a large one is handed over without a copy.
        let body = if len <= COPY_BODY {
            let body = Bytes::copy_from_slice(&conn.buf[..len]);
            conn.buf.advance(len);
            body
        } else {
            conn.buf.split_to(len).freeze()
        };
        (body, keep_alive)
    } else {
        // Delimited by the end of the connection.
        loop {
            if conn.buf.len() as u64 > max {
                return Err(ExchangeError::TooLarge);
            }
            if read_more(conn, got_bytes).await? == 0 {
                break;
            }
        }
        (conn.buf.split().freeze(), false)
    };
    // Bytes after the response: the instance is out of step; do not reuse.
    let reusable = reusable && conn.buf.is_empty() && !answered_early;
    Ok((
        Received {
            status,
            headers,
            body,
            bodiless: no_body,
        },
        reusable,
    ))
}

type Head = (usize, StatusCode, http::Version, HeaderMap, bool);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ExchangeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ExchangeError::Malformed(format!(
                "it answered something that is not HTTP/1.1 ({e})"
            )))
        }
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| ExchangeError::Malformed("its status code is invalid".into()))?;
    let version = if resp.version == Some(0) {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut close = version == http::Version::HTTP_10;
    // `close` anywhere wins over `keep-alive` anywhere.
    let mut closing = false;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ExchangeError::Malformed(format!("bad header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| ExchangeError::Malformed(format!("bad value of header {}", h.name)))?;
        if name == header::CONNECTION {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            let has = |t: &str| v.split(',').any(|x| x.trim() == t);
            if has("close") {
                close = true;
                closing = true;
            } else if has("keep-alive") && version == http::Version::HTTP_10 && !closing {
                close = false;
            }
        }
        headers.append(name, value);
    }
    Ok(Some((len, status, version, headers, !close)))
}

/// The response's Content-Length; several that disagree are an error.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| ExchangeError::Malformed("its Content-Length is invalid".into()))?;
            if found.is_some_and(|f| f != n) {
                return Err(ExchangeError::Malformed(
                    "it sent Content-Length values that disagree".into(),
                ));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Decodes a chunked body (RFC 9112 §7.1), at most `max` bytes of data;
/// chunk extensions and trailers are read and dropped.
async fn read_chunked(
    conn: &mut Conn,
    max: u64,
    got_bytes: &mut bool,
) -> Result<Bytes, ExchangeError> {
    let mut out = BytesMut::new();
    loop {
        let line = read_line(conn, got_bytes).await?;
        let size_text = line.split(|b| *b == b';').next().unwrap_or(&[]);
        let size_text = std::str::from_utf8(size_text)
            .map_err(|_| ExchangeError::Malformed("a chunk size is not text".into()))?
            .trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| ExchangeError::Malformed(format!("bad chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(conn, got_bytes).await?.is_empty() {}
            return Ok(out.freeze());
        }
        if size > max.saturating_sub(out.len() as u64) {
            return Err(ExchangeError::TooLarge);
        }
        // Within `max`, so it fits memory; `+ 2` is the chunk's CRLF.
        let size = size as usize;
        let needed = size.checked_add(2).ok_or(ExchangeError::TooLarge)?;
        while conn.buf.len() < needed {
            if read_more(conn, got_bytes).await? == 0 {
                return Err(closed());
            }
        }
        out.extend_from_slice(&conn.buf[..size]);
        if &conn.buf[size..size + 2] != b"\r\n" {
            return Err(ExchangeError::Malformed(
                "a chunk does not end with CRLF".into(),
            ));
        }
        conn.buf.advance(size + 2);
    }
}

/// One CRLF-terminated line (without the CRLF), at most 8 KiB.
async fn read_line(conn: &mut Conn, got_bytes: &mut bool) -> Result<Vec<u8>, ExchangeError> {
    loop {
        if let Some(pos) = conn.buf.windows(2).position(|w| w == b"\r\n") {
            let line = conn.buf.split_to(pos).to_vec();
            conn.buf.advance(2);
            return Ok(line);
        }
        if conn.buf.len() > 8 * 1024 {
            return Err(ExchangeError::Malformed("a chunk line is too long".into()));
        }
        if read_more(conn, got_bytes).await? == 0 {
            return Err(closed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn heads_are_parsed_with_keep_alive_rules() {
        let (len, status, _, headers, keep) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap()
                .unwrap();
        assert_eq!((len, status, keep), (38, StatusCode::OK, true));
        assert_eq!(content_length(&headers).unwrap(), Some(2));
        let (.., keep) = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!keep);
        let (.., keep) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!keep, "HTTP/1.0 closes unless told otherwise");
        let (.., keep) = parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(keep);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-")
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(b"garbage\r\n\r\n"),
            Err(ExchangeError::Malformed(_))
        ));
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let (.., headers, _) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(content_length(&headers).is_err());
        let (.., headers, _) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(content_length(&headers).unwrap(), Some(2));
    }

    #[test]
    fn requests_are_framed_anew() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("svc"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let text = String::from_utf8(serialize(&Outgoing {
            method: &Method::POST,
            path: "/x?y=1",
            headers: &h,
            body: Bytes::from_static(b"abc"),
        }))
        .unwrap();
        assert_eq!(
            text,
            "POST /x?y=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\nabc"
        );
        let mut h = HeaderMap::new();
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let text = String::from_utf8(serialize(&Outgoing {
            method: &Method::PUT,
            path: "/",
            headers: &h,
            body: Bytes::from_static(b"x"),
        }))
        .unwrap();
        assert!(!text.contains("expect"), "{text}");
        let text = String::from_utf8(serialize(&Outgoing {
            method: &Method::GET,
            path: "/",
            headers: &HeaderMap::new(),
            body: Bytes::new(),
        }))
        .unwrap();
        assert_eq!(text, "GET / HTTP/1.1\r\n\r\n");
    }

    /// A real loopback server answering with `answers` in turn, one
    /// connection at a time.
    async fn server(
        answers: Vec<&'static [u8]>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for answer in answers {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(answer).await.unwrap();
            }
        });
        (addr, task)
    }

    async fn connect(addr: std::net::SocketAddr) -> Conn {
        Conn {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            idle_since: Instant::now(),
        }
    }

    async fn receive(addr: std::net::SocketAddr, max: u64) -> Result<Received, ExchangeError> {
        let mut conn = connect(addr).await;
        let mut got = false;
        round_trip(
            &mut conn,
            b"GET / HTTP/1.1\r\n\r\n",
            &Bytes::new(),
            false,
            max,
            &mut got,
        )
        .await
        .map(|(r, _)| r)
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_and_limited() {
        let (addr, _t) = server(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: 1\r\n\r\n",
        ])
        .await;
        let r = receive(addr, 100).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"abcde");
        let (addr, _t) = server(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n",
        ])
        .await;
        assert!(matches!(
            receive(addr, 5).await,
            Err(ExchangeError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn lengths_and_closes_are_honoured() {
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nexactl"]).await;
        assert_eq!(&receive(addr, 6).await.unwrap().body[..], b"exactl");
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"]).await;
        assert!(matches!(
            receive(addr, 6).await,
            Err(ExchangeError::TooLarge)
        ));
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"]).await;
        assert!(matches!(
            receive(addr, 100).await,
            Err(ExchangeError::Broken(_))
        ));
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]).await;
        assert_eq!(
            &receive(addr, 100).await.unwrap().body[..],
            b"until the end"
        );
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]).await;
        assert!(matches!(
            receive(addr, 5).await,
            Err(ExchangeError::TooLarge)
        ));
        let (addr, _t) = server(vec![]).await;
        assert!(matches!(
            receive(addr, 5).await,
            Err(ExchangeError::Broken(_))
        ));
    }

    #[tokio::test]
    async fn head_answers_have_no_body_but_keep_their_length() {
        let (addr, _t) = server(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]).await;
        let mut conn = connect(addr).await;
        let mut got = false;
        let (r, reusable) = round_trip(
            &mut conn,
            b"HEAD / HTTP/1.1\r\n\r\n",
            &Bytes::new(),
            true,
            100,
            &mut got,
        )
        .await
        .unwrap();
        assert!(r.bodiless && r.body.is_empty() && reusable);
        assert_eq!(content_length(&r.headers).unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_huge_chunk_size_is_refused_not_a_panic() {
        let (addr, _t) = server(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n",
        ])
        .await;
        assert!(matches!(
            receive(addr, 100).await,
            Err(ExchangeError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn a_coding_other_than_chunked_reads_to_the_close() {
        let (addr, _t) = server(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef",
        ])
        .await;
        let r = receive(addr, 100).await.unwrap();
        assert_eq!(
            &r.body[..],
            b"abcdef",
            "Content-Length is ignored under Transfer-Encoding"
        );
    }

    #[test]
    fn close_wins_over_keep_alive() {
        let (.., keep) =
            parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(!keep);
        let (.., keep) = parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!keep);
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_passed_on() {
        // The instance answers after the head and closes without reading a
        // body larger than the socket buffers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _t = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let mut conn = connect(addr).await;
        let body = Bytes::from(vec![b'x'; 32 << 20]);
        let mut got = false;
        let (r, reusable) = tokio::time::timeout(
            Duration::from_secs(10),
            round_trip(
                &mut conn,
                b"PUT / HTTP/1.1\r\ncontent-length: 33554432\r\n\r\n",
                &body,
                false,
                100,
                &mut got,
            ),
        )
        .await
        .expect("the early answer is read, not waited past")
        .unwrap();
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(&r.body[..], b"big");
        assert!(!reusable);
    }
}
