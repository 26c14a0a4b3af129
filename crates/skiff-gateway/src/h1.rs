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
/// An idle connection unused this long is closed (by the gateway
/// thread's sweep, once a second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect to the instance: {e}"),
            Self::Broken(e) => write!(f, "the connection to the instance broke: {e}"),
            Self::Malformed(what) => write!(f, "the instance's answer is not HTTP/1: {what}"),
            Self::TooLarge => f.write_str("the instance's answer is over the limit"),
        }
    }
}

impl std::error::Error for ExchangeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) | Self::Broken(e) => Some(e),
            Self::Malformed(_) | Self::TooLarge => None,
        }
    }
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
    /// The header fields that pass on to the client, in wire form
    /// (`name: value\r\n` each): hop-by-hop fields and the framing are
    /// left out, except that the answer to a HEAD request keeps its
    /// Content-Length (as hyper does).
    pub lines: Vec<u8>,
    /// The service sent a Date field.
    pub has_date: bool,
    /// The service sent an `x-request-id` of its own.
    pub has_request_id: bool,
    pub body: Bytes,
    /// The response has no body by its nature (HEAD, 204, 304): its
    /// Content-Length, if any, describes another message and passes as is.
    pub bodiless: bool,
    /// The connection it came on, when it can be used again: back to the
    /// pool with `Pool::put_back` (`front.rs` does it once the answer is
    /// written to the client, hyper's side at once).
    conn: Option<Conn>,
}

impl Received {
    /// The header fields as a map, for hyper's side of the gateway.
    pub(crate) fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        // Written by `parse_head` from fields httparse checked: one field
        // per line, the name up to the first colon.
        for line in self.lines.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        map
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
}

/// Idle keep-alive connections by instance key.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
}

impl Pool {
    pub(crate) fn new() -> Self {
        Self {
            idle: Mutex::default(),
        }
    }

    /// Gives the connection a response came on back to the pool, when it
    /// can be used again.
    pub(crate) fn put_back(&self, key: &str, received: &mut Received) {
        if let Some(conn) = received.conn.take() {
            self.put(key, conn);
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

    fn put(&self, key: &str, mut conn: Conn) {
        conn.buf.clear();
        // A large response's buffer is not kept for an idle connection.
        if conn.buf.capacity() > 64 * 1024 {
            conn.buf = BytesMut::with_capacity(8 * 1024);
        }
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        match idle.get_mut(key) {
            Some(conns) if conns.len() < MAX_IDLE => conns.push(conn),
            Some(_) => {}
            None => {
                idle.insert(key.to_string(), vec![conn]);
            }
        }
    }

    /// Drops idle connections that timed out or whose instance is gone
    /// (each gateway thread calls it once a second, not on a request's
    /// path).
    pub(crate) fn sweep(&self, alive: impl Fn(&str) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|key, conns| {
            conns.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
            !conns.is_empty() && alive(key)
        });
    }
}

/// One request from a header map (the hyper side), to be serialised.
pub(crate) struct Outgoing<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

/// A request ready to send: its head in wire form (with the body after it
/// when small, see `end_request`), and its body.
pub(crate) struct Prepared<'a> {
    pub bytes: &'a [u8],
    pub body: &'a Bytes,
    /// A HEAD request: the answer has no body whatever its length says.
    pub head_only: bool,
    /// Safe to send again when a reused connection turns out closed.
    pub idempotent: bool,
}

pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Headers that concern one connection only (RFC 9110 §7.6.1), and the
/// framing the gateway does anew; none of them is forwarded as it came.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Ends a request head: frames the body anew (Content-Length) and puts it
/// right after the head when it is small, so head and body go in one write.
pub(crate) fn end_request(out: &mut Vec<u8>, body: &[u8], method_has_body: bool) {
    if !body.is_empty() || method_has_body {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if body.len() <= INLINE_BODY {
        out.extend_from_slice(body);
    }
}

/// A number in decimal, without the formatting machinery.
pub(crate) fn itoa(mut n: usize) -> ItoaBuf {
    let mut buf = ItoaBuf {
        bytes: [0; 20],
        start: 20,
    };
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return buf;
        }
    }
}

pub(crate) struct ItoaBuf {
    bytes: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// The request head, and the body after it when it is small (one write).
pub(crate) fn serialize(req: &Outgoing<'_>) -> Vec<u8> {
    let mut head = Vec::with_capacity(
        256 + req.headers.len() * 48
            + if req.body.len() <= INLINE_BODY {
                req.body.len()
            } else {
                0
            },
    );
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
    let has_body = matches!(*req.method, Method::POST | Method::PUT | Method::PATCH);
    end_request(&mut head, &req.body, has_body);
    head
}

/// Bodies up to this size are copied out of a read buffer (which then
/// stays whole for reuse) rather than split off it.
pub(crate) const COPY_BODY: usize = 4096;

/// Bodies up to this size are sent with the head in one write.
const INLINE_BODY: usize = 16 * 1024;

/// Sends `req` to the instance behind `upstream` and receives the whole
/// response, at most `max` body bytes. A pooled connection the instance
/// closed while idle is replaced once, for idempotent requests.
pub(crate) async fn exchange(
    pool: &Pool,
    upstream: &Upstream,
    req: Prepared<'_>,
    max: u64,
) -> Result<Received, ExchangeError> {
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
        let result = round_trip(
            &mut conn,
            req.bytes,
            req.body,
            req.head_only,
            max,
            &mut got_bytes,
        )
        .await;
        match result {
            Ok((mut received, reusable)) => {
                if reusable {
                    received.conn = Some(conn);
                }
                return Ok(received);
            }
            Err(e) if reused && !retried && req.idempotent && e.is_early_close(got_bytes) => {
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
    let head = loop {
        match parse_head(&conn.buf, head_only)? {
            Some(head) => {
                conn.buf.advance(head.len);
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(ExchangeError::Malformed(
                            "it switched protocols without being asked to".into(),
                        ));
                    }
                    continue;
                }
                break head;
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

    let keep_alive = head.keep_alive;
    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): chunked
    // last means chunked; any other coding last means "until the close".
    let length = if head.encoded {
        None
    } else {
        head.length
            .map_err(|e| ExchangeError::Malformed(e.into()))?
    };
    let (body, reusable) = if head.bodiless {
        (Bytes::new(), keep_alive)
    } else if head.chunked {
        // With a Content-Length too, the message is suspect (RFC 9112
        // §6.3): read as chunked, and the connection is not reused.
        let reuse = keep_alive && !head.has_length;
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
            status: head.status,
            lines: head.lines,
            has_date: head.has_date,
            has_request_id: head.has_request_id,
            body,
            bodiless: head.bodiless,
            conn: None,
        },
        reusable,
    ))
}

/// A response head: what frames its body, and the fields that pass on.
struct Head {
    /// Bytes of the head, up to and with its empty line.
    len: usize,
    status: StatusCode,
    keep_alive: bool,
    /// No body by its nature (HEAD, 204, 304).
    bodiless: bool,
    /// Transfer-Encoding is present; `chunked` when its last coding is.
    encoded: bool,
    chunked: bool,
    /// A Content-Length field is present, and the length it gives: an
    /// error when a value is not a number or the values disagree.
    has_length: bool,
    length: Result<Option<u64>, &'static str>,
    /// See `Received::lines`.
    lines: Vec<u8>,
    has_date: bool,
    has_request_id: bool,
}

fn parse_head(buf: &[u8], head_only: bool) -> Result<Option<Head>, ExchangeError> {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
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
    let no_content = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let bodiless = head_only || no_content;
    // The length a HEAD answer gives describes the body a GET would get,
    // and passes on; 204 and 304 lose theirs (RFC 9110 §8.6).
    let keep_length = head_only && !no_content;
    let http10 = resp.version == Some(0);

    // Connection first: it decides keep-alive, and the fields it names
    // concern this connection only. `close` anywhere wins over
    // `keep-alive` anywhere.
    let mut close = http10;
    let mut closing = false;
    let mut named: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        if !h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                close = true;
                closing = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                if http10 && !closing {
                    close = false;
                }
            } else if !token.is_empty() {
                named.push(token);
            }
        }
    }

    let mut head = Head {
        len,
        status,
        keep_alive: !close,
        bodiless,
        encoded: false,
        chunked: false,
        has_length: false,
        length: Ok(None),
        lines: Vec::with_capacity(len),
        has_date: false,
        has_request_id: false,
    };
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.encoded = true;
            // The last field's last coding decides.
            head.chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            head.has_length = true;
            head.length = head.length.and_then(|found| merge_length(found, h.value));
            if !keep_length {
                continue;
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            head.has_date = true;
        } else if name.eq_ignore_ascii_case(b"x-request-id")
            && !named.iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            head.has_request_id = true;
        } else if is_hop_by_hop(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        head.lines.extend_from_slice(name);
        head.lines.extend_from_slice(b": ");
        head.lines.extend_from_slice(h.value);
        head.lines.extend_from_slice(b"\r\n");
    }
    Ok(Some(head))
}

/// Adds one Content-Length field's value (a list, maybe) to the length
/// found so far: values must be numbers and agree.
fn merge_length(mut found: Option<u64>, value: &[u8]) -> Result<Option<u64>, &'static str> {
    for part in value.split(|b| *b == b',') {
        let n: u64 = std::str::from_utf8(part)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or("its Content-Length is invalid")?;
        if found.is_some_and(|f| f != n) {
            return Err("it sent Content-Length values that disagree");
        }
        found = Some(n);
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

    fn head(text: &[u8]) -> Head {
        parse_head(text, false).unwrap().unwrap()
    }

    #[test]
    fn heads_are_parsed_with_keep_alive_rules() {
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!((h.len, h.status, h.keep_alive), (38, StatusCode::OK, true));
        assert_eq!(h.length, Ok(Some(2)));
        assert!(!head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            !head(b"HTTP/1.0 200 OK\r\n\r\n").keep_alive,
            "HTTP/1.0 closes unless told otherwise"
        );
        assert!(head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-", false)
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(b"garbage\r\n\r\n", false),
            Err(ExchangeError::Malformed(_))
        ));
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n");
        assert!(h.length.is_err());
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n");
        assert_eq!(h.length, Ok(Some(2)));
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\n")
            .length
            .is_err());
    }

    #[test]
    fn hop_by_hop_fields_and_the_framing_do_not_pass_on() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n\
              Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\
              X-Custom: kept\r\nContent-Length: 4\r\nUpgrade: h2c\r\n\r\n",
        );
        assert_eq!(
            String::from_utf8_lossy(&h.lines),
            "Content-Type: text/plain\r\nX-Custom: kept\r\n"
        );
        assert!(h.encoded && h.chunked && h.has_length && h.keep_alive);
        let received = Received {
            status: h.status,
            lines: h.lines,
            has_date: h.has_date,
            has_request_id: h.has_request_id,
            body: Bytes::new(),
            bodiless: false,
            conn: None,
        };
        let map = received.header_map();
        assert_eq!(map.len(), 2);
        assert_eq!(map["content-type"], "text/plain");
        assert_eq!(map["x-custom"], "kept");
        assert!(!h.has_date);
        // A HEAD answer keeps its length, which describes the body a GET
        // would get; 204 and 304 lose theirs.
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&h.lines), "Content-Length: 5\r\n");
        for answer in [
            &b"HTTP/1.1 304 Not Modified\r\n"[..],
            b"HTTP/1.1 204 No Content\r\n",
        ] {
            let text = [answer, b"Content-Length: 5\r\nDate: x\r\n\r\n"].concat();
            let h = head(&text);
            assert!(h.bodiless && h.has_date);
            assert_eq!(String::from_utf8_lossy(&h.lines), "Date: x\r\n");
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 4096, 6_291_456, usize::MAX] {
            assert_eq!(itoa(n).as_bytes(), n.to_string().as_bytes());
        }
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
        assert_eq!(r.header_map()["content-length"], "5");
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
        assert!(
            !head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
                .keep_alive
        );
        assert!(!head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
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
