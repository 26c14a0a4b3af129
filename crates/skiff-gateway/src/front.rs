//! The client side of HTTP/1.1 connections. Requests to serverless
//! services — nearly all traffic — are read, forwarded and answered here:
//! httparse and one buffer per connection, the instance's request head
//! written straight from the client's, the answer written back straight
//! from the instance's; no header maps, no request or response objects, no
//! timer armed per request. Whatever else comes (HTTP/2, HTTP/1.0,
//! upgrades, chunked or too-large bodies, `Expect`, persistent services,
//! unknown hosts, anything malformed) is handed to hyper together with the
//! bytes read so far, and hyper serves the rest of that connection
//! (`Gateway::serve_with_hyper`), answering errors as it always does.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{status, ErrorKind, Failure};
use crate::gateway::Gateway;
use crate::h1;
use crate::hyper_side::HyperBuilder;
use crate::limits::{after, until, FAR};
use crate::pipeline::{self, Downstream, Piece, Serverless, Watched};
use crate::reqlog::{self, Entry};
use crate::route::{ExchangeLimits, Lease, Wake};

/// Most header fields in a request served here; hyper takes requests
/// with more.
const MAX_FIELDS: usize = 64;

/// What the head in the buffer asks for.
enum Inspected {
    /// Not all of it is here yet.
    Partial,
    /// Served here (the instance's request head is in `Front::up`).
    Here(Plan),
    /// For hyper: anything this module does not serve itself.
    Hyper,
}

/// A request served here.
struct Plan {
    head_len: usize,
    body_len: usize,
    service: String,
    method: http::Method,
    /// The target as the request's record keeps it.
    path: Box<str>,
    /// Its `x-request-id` (`reqlog.rs`), which the instance's head has.
    request_id: Box<str>,
    limits: ExchangeLimits,
    max_response: u64,
    /// The client asked for JSON errors.
    json: bool,
    head_only: bool,
    idempotent: bool,
    /// POST, PUT and PATCH carry a Content-Length even when empty.
    has_body: bool,
    /// The client asked to close the connection after this request.
    close: bool,
}

/// One client connection.
struct Front {
    gw: Arc<Gateway>,
    stream: TcpStream,
    remote: SocketAddr,
    /// The client's address as written in X-Forwarded-For.
    remote_ip: String,
    /// The client is a trusted proxy: its X-Forwarded-For is appended to
    /// (otherwise replaced).
    trusted: bool,
    /// Bytes read from the client, not yet used.
    buf: BytesMut,
    /// The request head for the instance (reused).
    up: Vec<u8>,
    /// The response head for the client (reused).
    out: Vec<u8>,
    /// The client shut its sending side after pipelined requests: those
    /// are answered, then the connection closes.
    read_closed: bool,
}

/// Serves one client connection until it closes, fails, or `closing`
/// turns true (then after its request in flight).
pub(crate) async fn serve(
    gw: Arc<Gateway>,
    stream: TcpStream,
    remote: SocketAddr,
    hyper: Arc<HyperBuilder>,
    closing: watch::Receiver<bool>,
) {
    let header_timeout = gw.config().header_read_timeout;
    let idle_timeout = gw.config().idle_timeout;
    let max_head = gw.config().max_header_bytes;
    let trusted = gw.config().trusts(remote.ip());
    let mut front = Front {
        gw,
        stream,
        remote,
        remote_ip: remote.ip().to_string(),
        trusted,
        buf: BytesMut::with_capacity(8 * 1024),
        up: Vec::with_capacity(1024),
        out: Vec::with_capacity(1024),
        read_closed: false,
    };
    // Two timers for the life of the connection: one for the client to
    // send a request's head, one for the request timeout (see `until`).
    let head_timer = tokio::time::sleep_until(after(FAR));
    let request_timer = tokio::time::sleep_until(after(FAR));
    // Made once: waiting on the gateway's closing registers with it once
    // for the connection, not again for every request.
    let mut closing_rx = closing.clone();
    let closed = async move {
        let _ = closing_rx.wait_for(|c| *c).await;
    };
    tokio::pin!(head_timer, request_timer, closed);
    let mut first = true;
    loop {
        // A new connection must bring its first head soon; a kept-alive
        // one may wait for its next request longer, but once that has
        // begun, its head must come as soon as a first one.
        let mut begun = !front.buf.is_empty();
        let mut head_by = after(if first || begun {
            header_timeout
        } else {
            idle_timeout
        });
        first = false;
        let plan = loop {
            match front.inspect() {
                Inspected::Here(plan) => break plan,
                Inspected::Hyper => return front.hand_over(hyper, closing).await,
                Inspected::Partial if front.buf.len() > max_head => {
                    // hyper answers 431.
                    return front.hand_over(hyper, closing).await;
                }
                Inspected::Partial if front.read_closed => return,
                Inspected::Partial => {}
            }
            if !begun && !front.buf.is_empty() {
                begun = true;
                head_by = head_by.min(after(header_timeout));
            }
            reserve(&mut front.buf);
            let idle = front.buf.is_empty();
            tokio::select! {
                biased;
                read = front.stream.read_buf(&mut front.buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                // A head that never completes (slowloris), a connection
                // that sends nothing, or an idle keep-alive one: closed.
                () = until(head_timer.as_mut(), head_by) => return,
                () = &mut closed, if idle => return,
            }
        };
        let close = match front.serve(plan, request_timer.as_mut(), &closing).await {
            Ok(close) => close,
            Err(_) => return,
        };
        match close {
            Close::No => {}
            Close::Now => {
                let _ = front.stream.shutdown().await;
                // Bytes the client sent that will not be read would make
                // the close a reset, which can destroy the answer.
                let mut probe = [0u8; 1];
                if !front.buf.is_empty()
                    || matches!(front.stream.try_read(&mut probe), Ok(n) if n > 0)
                {
                    front.linger().await;
                }
                return;
            }
            Close::AfterUnread => return front.linger().await,
        }
        // A large head's buffers are not kept for the connection.
        for buf in [&mut front.up, &mut front.out] {
            if buf.capacity() > 32 * 1024 {
                *buf = Vec::with_capacity(1024);
            }
        }
        if front.buf.capacity() > 32 * 1024 && front.buf.len() <= 8 * 1024 {
            let mut rest = BytesMut::with_capacity(8 * 1024);
            rest.extend_from_slice(&front.buf);
            front.buf = rest;
        }
    }
}

/// What becomes of the connection after an answer.
enum Close {
    No,
    Now,
    /// Part of the request was not read: close without resetting the
    /// answer away (`Front::linger`).
    AfterUnread,
}

/// Completes when the client closed the connection or it broke, reading
/// what the client sends meanwhile (its next request, pipelined) into
/// `buf`, up to `cap` bytes; past that it only waits. A client that shut
/// its sending side after pipelined requests still waits for their
/// answers (`read_closed`), as with hyper.
async fn client_gone(stream: &TcpStream, buf: &mut BytesMut, cap: usize, read_closed: &mut bool) {
    loop {
        if buf.len() >= cap || *read_closed {
            return std::future::pending().await;
        }
        if stream.readable().await.is_err() {
            return;
        }
        reserve(buf);
        match stream.try_read_buf(buf) {
            Ok(0) if !buf.is_empty() => *read_closed = true,
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
}

impl Front {
    /// Parses the head in the buffer and decides who serves it; for a
    /// request served here, writes the instance's request head.
    fn inspect(&mut self) -> Inspected {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(&self.buf, &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Inspected::Partial,
            // hyper answers 400 (or 431 for too many fields), or takes
            // the HTTP/2 preface.
            Err(_) => return Inspected::Hyper,
        };
        let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
            return Inspected::Hyper;
        };
        if head_len > self.gw.config().max_header_bytes
            || method == "CONNECT"
            || !path.starts_with('/')
        {
            // hyper answers 431 or serves it.
            return Inspected::Hyper;
        }
        // The target as hyper reads it: checked, without a fragment.
        let checked;
        let target = if plain_target(path) {
            path
        } else {
            let Ok(t) = http::uri::PathAndQuery::try_from(path) else {
                return Inspected::Hyper;
            };
            checked = t;
            checked.as_str()
        };
        let mut host = None;
        let mut length: Option<u64> = None;
        let mut close = false;
        let mut json = false;
        let mut forwarded_for = None;
        // The client's `x-request-id`; more than one is as good as none.
        let mut sent_id: Option<Option<&[u8]>> = None;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"host") {
                if host.replace(h.value).is_some() {
                    return Inspected::Hyper;
                }
            } else if name.eq_ignore_ascii_case(b"content-length") {
                // One plain number; anything else is hyper's to judge.
                let n = match parse_length(h.value) {
                    Some(n) if length.is_none() => n,
                    _ => return Inspected::Hyper,
                };
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
            {
                return Inspected::Hyper;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // It names more fields that concern this hop.
                        return Inspected::Hyper;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"accept") {
                json |= h.value.windows(4).any(|w| w == b"json");
            } else if name.eq_ignore_ascii_case(b"x-request-id") {
                sent_id = Some(sent_id.map_or(Some(h.value), |_| None));
            } else if self.trusted
                && name.eq_ignore_ascii_case(b"x-forwarded-for")
                && forwarded_for.replace(h.value).is_some()
            {
                // A trusted proxy's list in several fields: hyper's side
                // joins them.
                return Inspected::Hyper;
            }
        }
        let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
            return Inspected::Hyper;
        };
        // Admission as on hyper's side (`pipeline::admit`); what it
        // refuses, and what is not a serving serverless service, hyper's
        // side answers or serves.
        let head = pipeline::Head {
            connect: false,
            hosts: 1,
            host: Some(host),
            upgrade: None,
        };
        let Ok(pipeline::Admitted {
            service,
            serverless: Some((limits, max_response)),
        }) = pipeline::admit(&self.gw, &head)
        else {
            return Inspected::Hyper;
        };
        let length = length.unwrap_or(0);
        if limits.max_request.is_some_and(|max| length > max) {
            // hyper's side answers 413 without reading the body.
            return Inspected::Hyper;
        }
        let Ok(body_len) = usize::try_from(length) else {
            return Inspected::Hyper;
        };
        let Ok(method_kind) = http::Method::from_bytes(method.as_bytes()) else {
            return Inspected::Hyper;
        };
        let request_id = reqlog::request_id(sent_id.flatten());

        // The instance's request head: the client's fields less those of
        // this hop and the framing, with X-Forwarded-* added.
        let up = &mut self.up;
        up.clear();
        up.extend_from_slice(method.as_bytes());
        up.push(b' ');
        up.extend_from_slice(target.as_bytes());
        up.extend_from_slice(b" HTTP/1.1\r\n");
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if h1::is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"x-forwarded-for")
                || name.eq_ignore_ascii_case(b"x-forwarded-proto")
                || name.eq_ignore_ascii_case(b"x-forwarded-host")
                || name.eq_ignore_ascii_case(b"x-request-id")
            {
                continue;
            }
            up.extend_from_slice(name);
            up.extend_from_slice(b": ");
            up.extend_from_slice(h.value);
            up.extend_from_slice(b"\r\n");
        }
        // A client's own X-Forwarded-For was dropped above; only a
        // trusted proxy's is kept (`forwarded_for` is set only for one).
        up.extend_from_slice(b"x-forwarded-for: ");
        if let Some(previous) = forwarded_for {
            up.extend_from_slice(previous);
            up.extend_from_slice(b", ");
        }
        up.extend_from_slice(self.remote_ip.as_bytes());
        up.extend_from_slice(b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ");
        up.extend_from_slice(host.as_bytes());
        up.extend_from_slice(b"\r\nx-request-id: ");
        up.extend_from_slice(request_id.as_bytes());
        up.extend_from_slice(b"\r\n");

        Inspected::Here(Plan {
            head_len,
            body_len,
            service,
            method: method_kind,
            path: reqlog::logged_path(target),
            request_id,
            limits,
            max_response,
            json,
            head_only: method == "HEAD",
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
            ),
            has_body: matches!(method, "POST" | "PUT" | "PATCH"),
            close,
        })
    }

    /// Receives the body, forwards the request, answers the client
    /// (`pipeline::serverless`). Returns what becomes of the connection;
    /// an error when the client is gone.
    async fn serve(
        &mut self,
        plan: Plan,
        timer: Pin<&mut tokio::time::Sleep>,
        closing: &watch::Receiver<bool>,
    ) -> io::Result<Close> {
        let gw = self.gw.clone();
        let entry = Entry {
            at: SystemTime::now(),
            method: reqlog::logged_method(&plan.method),
            path: &plan.path,
            bytes_in: plan.body_len as u64,
            bytes_out: None,
            instance: None,
            wake: Wake::Warm,
            request_id: &plan.request_id,
        };
        let req = Serverless {
            service: &plan.service,
            head_only: plan.head_only,
            idempotent: plan.idempotent,
        };
        let rules = (plan.limits, plan.max_response);
        let mut down = Fast {
            front: self,
            plan: &plan,
            timer,
            closing,
            unread: true,
            started: Instant::now(),
            entry: gw.config().request_log.then_some(entry),
        };
        pipeline::serverless(&gw, &mut down, &req, rules).await
    }

    /// Writes `self.out` and then `body` (in one write when small).
    async fn send(&mut self, body: &[u8]) -> io::Result<()> {
        if body.len() <= 16 * 1024 {
            self.out.extend_from_slice(body);
            self.stream.write_all(&self.out).await
        } else {
            self.stream.write_all(&self.out).await?;
            self.stream.write_all(body).await
        }
    }

    /// Writes a gateway-made answer (`error.rs`).
    async fn write_answer(
        &mut self,
        failure: &Failure,
        json: bool,
        head_only: bool,
        close: bool,
        request_id: Option<&str>,
    ) -> io::Result<()> {
        let (parts, body) = failure.answer(json).into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let out = &mut self.out;
        status_line(out, parts.status);
        for (name, value) in &parts.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        date_line(out);
        if let Some(id) = request_id {
            request_id_line(out, id);
        }
        end_head(out, Some(body.len()), close);
        if !head_only {
            self.send(&body).await
        } else {
            self.send(&[]).await
        }
    }

    /// Closes after an answer sent while part of the request was still
    /// unread: closing at once would make the kernel reset the connection
    /// and the client could lose the answer. The sending side is shut,
    /// and what the client still sends is read and dropped for a moment.
    async fn linger(mut self) {
        let _ = self.stream.shutdown().await;
        // On the heap: in the future it would enlarge every connection's task.
        let mut sink = vec![0u8; 16 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Lets hyper serve the rest of the connection, starting with the
    /// bytes already read. When the gateway is closing already, the
    /// connection is closed instead (hyper would close it before reading
    /// the request).
    async fn hand_over(mut self, hyper: Arc<HyperBuilder>, closing: watch::Receiver<bool>) {
        if *closing.borrow() {
            // hyper would close before reading it: a request here is
            // told, and the connection closes.
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let request = matches!(
                httparse::Request::new(&mut fields).parse(&self.buf),
                Ok(_) | Err(httparse::Error::TooManyHeaders)
            );
            if request {
                let failure = Failure::new(
                    ErrorKind::Unavailable,
                    "The gateway is shutting down; send the request again.",
                );
                let _ = self.write_answer(&failure, false, false, true, None).await;
            }
            return self.linger().await;
        }
        let Front {
            gw,
            stream,
            remote,
            buf,
            ..
        } = self;
        let io = Rewind {
            pre: buf.freeze(),
            stream,
        };
        gw.serve_with_hyper(io, remote, &hyper, closing).await;
    }
}

/// A request served here, as the pipeline's phases see its client.
struct Fast<'f, 't> {
    front: &'f mut Front,
    plan: &'f Plan,
    /// The connection's request timer (see `until`).
    timer: Pin<&'t mut tokio::time::Sleep>,
    closing: &'f watch::Receiver<bool>,
    /// Part of the body is not read yet: an answer now closes the
    /// connection without resetting it away (`Front::linger`).
    unread: bool,
    /// When its head had been read.
    started: Instant,
    /// What its record says of it (taken when it is answered).
    entry: Option<Entry<'f>>,
}

impl Fast<'_, '_> {
    /// What becomes of the connection after an answer.
    fn close(&self) -> Close {
        if self.plan.close || *self.closing.borrow() {
            Close::Now
        } else {
            Close::No
        }
    }
}

impl Downstream for Fast<'_, '_> {
    type Done = io::Result<Close>;

    fn announced(&self) -> Option<u64> {
        Some(self.plan.body_len as u64)
    }

    fn received(&self) -> u64 {
        let got = self.front.buf.len().saturating_sub(self.plan.head_len);
        got.min(self.plan.body_len) as u64
    }

    /// The buffer grows as bytes come, not by what the client announced.
    async fn read_body(&mut self, due: Option<Instant>) -> Piece {
        let total = self.plan.head_len + self.plan.body_len;
        let buf = &mut self.front.buf;
        if buf.len() >= total {
            self.unread = false;
            return Piece::End;
        }
        let want = (total - buf.len()).min(64 * 1024);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        // Without a deadline the timer's branch is off; any instant does.
        let at = due.unwrap_or_else(|| self.timer.deadline());
        tokio::select! {
            biased;
            read = self.front.stream.read_buf(buf) => match read {
                Ok(0) | Err(_) => Piece::Gone,
                Ok(_) => Piece::More,
            },
            () = until(self.timer.as_mut(), at), if due.is_some() => Piece::Late,
        }
    }

    fn request(&mut self) -> (Vec<u8>, Bytes) {
        let (plan, front) = (self.plan, &mut *self.front);
        front.buf.advance(plan.head_len);
        let body = if plan.body_len == 0 {
            Bytes::new()
        } else if plan.body_len <= h1::COPY_BODY {
            let body = Bytes::copy_from_slice(&front.buf[..plan.body_len]);
            front.buf.advance(plan.body_len);
            body
        } else {
            let body = front.buf.split_to(plan.body_len).freeze();
            if plan.head_len + plan.body_len > 64 * 1024 {
                // What follows moves to a buffer of its own, so the large
                // one goes with the body.
                let mut rest = BytesMut::with_capacity((8 * 1024).max(front.buf.len()));
                rest.extend_from_slice(&front.buf);
                front.buf = rest;
            }
            body
        };
        h1::end_request(&mut front.up, &body, plan.has_body);
        (std::mem::take(&mut front.up), body)
    }

    fn reuse(&mut self, head: Vec<u8>) {
        self.front.up = head;
    }

    fn leased(&mut self, lease: &Lease) {
        if let Some(entry) = &mut self.entry {
            entry.instance = Some(lease.upstream.key.clone());
            entry.wake = lease.wake;
        }
    }

    /// Past the body, bytes from the client are its next request (read
    /// into the buffer while waiting, up to a head's worth), and its end
    /// means nobody waits for the answer: the work is dropped (and with
    /// it the instance's slot).
    async fn watch<F: Future>(&mut self, work: F, by: Option<Instant>) -> Watched<F::Output> {
        let front = &mut *self.front;
        let cap = front.gw.config().max_header_bytes + 1;
        let at = by.unwrap_or_else(|| self.timer.deadline());
        tokio::select! {
            biased;
            out = work => Watched::Done(out),
            () = until(self.timer.as_mut(), at), if by.is_some() => Watched::Late,
            () = client_gone(&front.stream, &mut front.buf, cap, &mut front.read_closed) => {
                Watched::Gone
            }
        }
    }

    async fn respond(&mut self, received: &mut h1::Received) -> io::Result<Close> {
        let close = self.close();
        let out = &mut self.front.out;
        status_line(out, received.status);
        out.extend_from_slice(&received.lines);
        if !received.has_date {
            date_line(out);
        }
        if !received.has_request_id {
            request_id_line(out, &self.plan.request_id);
        }
        let length = (!received.bodiless).then_some(received.body.len());
        end_head(out, length, matches!(close, Close::Now));
        // Counted when the answer is ready, as on hyper's side: a slow
        // client's reading is not the service's time.
        let status = received.status.as_u16();
        let took = self.started.elapsed();
        let entry = self.entry.take().map(|mut e| {
            e.bytes_out = Some(received.body.len() as u64);
            e
        });
        let meter = self.front.gw.meter();
        meter.answered(Some(&self.plan.service), status, took, None, entry);
        self.front.send(&received.body).await?;
        Ok(close)
    }

    async fn refuse(&mut self, failure: Failure) -> io::Result<Close> {
        // This side serves admitted requests only: the service exists.
        let kind = failure.kind();
        let took = self.started.elapsed();
        let meter = self.front.gw.meter();
        meter.answered(
            Some(&self.plan.service),
            status(kind).as_u16(),
            took,
            Some(kind),
            self.entry.take(),
        );
        let (json, head_only) = (self.plan.json, self.plan.head_only);
        let id = Some(&*self.plan.request_id);
        if self.unread {
            self.front
                .write_answer(&failure, json, head_only, true, id)
                .await?;
            return Ok(Close::AfterUnread);
        }
        let close = self.close();
        let now = matches!(close, Close::Now);
        self.front
            .write_answer(&failure, json, head_only, now, id)
            .await?;
        Ok(close)
    }

    fn gone(&mut self) -> io::Result<Close> {
        Err(io::ErrorKind::ConnectionAborted.into())
    }
}

/// A `date` field for a response (RFC 9110 §6.6.1: an answer forwarded
/// without one gets one), formatted once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// An `x-request-id` field for a response.
fn request_id_line(out: &mut Vec<u8>, id: &str) {
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Starts a response head in `out` (cleared first).
fn status_line(out: &mut Vec<u8>, status: http::StatusCode) {
    out.clear();
    if status == http::StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Ends a response head: its body's length, when it has one, and whether
/// the connection closes after it.
fn end_head(out: &mut Vec<u8>, length: Option<usize>, close: bool) {
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(h1::itoa(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Bytes every URI allows in both a path and a query (RFC 3986: unreserved,
/// sub-delims, `:`, `@`, `/`, `?`, and `%` of percent-encodings).
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// A request target (starting with `/`) that `http::uri::PathAndQuery`
/// takes as it is: only `PLAIN` bytes, no fragment, not long. Nearly all
/// are; they skip its copy and second scan.
fn plain_target(path: &str) -> bool {
    path.len() <= 8 * 1024 && path.bytes().all(|b| PLAIN[usize::from(b)])
}

/// A Content-Length value that is one plain decimal number.
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// The client's connection with the bytes already read put back in
/// front, for hyper.
pub(crate) struct Rewind {
    pre: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if self.pre.is_empty() {
                // Gives the buffer back (an emptied view would keep it).
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_targets_are_what_hyper_would_take_unchanged() {
        // Every byte, in the path and in the query: one taken as plain is
        // one `PathAndQuery` accepts and keeps as it is.
        let mut plain = 0;
        for b in 0..=255u8 {
            for target in [vec![b'/', b], vec![b'/', b'?', b]] {
                let Ok(text) = std::str::from_utf8(&target) else {
                    continue;
                };
                if plain_target(text) {
                    plain += 1;
                    let checked = http::uri::PathAndQuery::try_from(text)
                        .unwrap_or_else(|e| panic!("{text:?} taken as plain: {e}"));
                    assert_eq!(checked.as_str(), text);
                }
            }
        }
        assert_eq!(plain, 2 * (62 + 20), "alphanumerics and 20 others");
        for target in ["/a#frag", "/a b", "/a\"b", "/ä", "/a<b>", "/a{b}", "/a|b"] {
            assert!(!plain_target(target), "{target:?}");
        }
        assert!(plain_target("/api/v1/items?id=42&sort=-name%20x"));
        assert!(!plain_target(&format!("/{}", "a".repeat(9000))));
    }

    #[test]
    fn the_date_is_an_http_date_of_now() {
        let mut out = Vec::new();
        date_line(&mut out);
        let text = String::from_utf8(out).unwrap();
        let value = text
            .strip_prefix("date: ")
            .and_then(|t| t.strip_suffix("\r\n"))
            .unwrap_or_else(|| panic!("{text:?}"));
        let when = httpdate::parse_http_date(value).unwrap();
        let age = std::time::SystemTime::now()
            .duration_since(when)
            .unwrap_or_default();
        assert!(age < Duration::from_secs(5), "{value}");
    }

    #[test]
    fn lengths_are_plain_numbers_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b" 6291456 "), Some(6_291_456));
        assert_eq!(parse_length(b"18446744073709551615"), None, "20 digits");
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [&b""[..], b"+5", b"-1", b"5, 5", b"0x10", b"1 2"] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
