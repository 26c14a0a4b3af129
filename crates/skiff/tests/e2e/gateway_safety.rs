//! Safe to run strangers' code, at the gateway: floods of idle
//! connections, slow bodies, CONNECT and forged X-Forwarded-For leave
//! other clients and the services unharmed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::gateway::APP;
use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

/// The platform's open-file limit in the flood test: low, so that a
/// flood from one test process outnumbers its descriptors (the machine's
/// hard limit is 20 000, near what one process can hold).
const DAEMON_HARD_LIMIT: u64 = 4096;

/// The APP service (echoes headers at /headers, reads bodies at POST /),
/// started with `skiff up` through `wrapper` with `extra` flags.
fn start(name: &str, wrapper: &[&str], extra: &[&str]) -> (App, Up) {
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n"),
        &[("app.py", APP)],
    );
    let mut up = Up::start_wrapped(wrapper, &[app.path()], extra);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    (app, up)
}

/// A connection to `to` from `from` (a loopback address of the test's
/// choosing), or why not.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((from, 0)).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

/// Opens up to `n` connections from `from`, stopping early when a few in
/// a row fail (a listener that stopped accepting fills its queue).
fn flood(from: Ipv4Addr, to: SocketAddr, n: usize, held: &mut Vec<TcpStream>) {
    let mut failures = 0;
    for _ in 0..n {
        match connect_from(from, to) {
            Ok(s) => {
                held.push(s);
                failures = 0;
            }
            Err(_) => {
                failures += 1;
                if failures >= 3 {
                    return;
                }
            }
        }
    }
}

/// Sends `request` from 127.0.0.1 and reads the answer until the
/// connection closes, giving up after `within`.
fn ask(to: SocketAddr, request: &[u8], within: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&to, within).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) if !raw.is_empty() => Ok(String::from_utf8_lossy(&raw).into_owned()),
        Ok(_) => Err("closed without an answer".to_string()),
        Err(e) if !raw.is_empty() => Err(format!("{e} after {:?}", String::from_utf8_lossy(&raw))),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

/// Whether the server closed `s` (EOF or reset) within `within`; bytes it
/// sent first are returned.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> Option<String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => Some(String::from_utf8_lossy(&raw).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&raw).into_owned())
        }
        Err(_) => None,
    }
}

fn api_addr(up: &Up) -> SocketAddr {
    std::fs::read_to_string(up.state_dir().join("api-address"))
        .expect("api-address")
        .trim()
        .parse()
        .expect("an address in api-address")
}

fn api_token(up: &Up) -> String {
    std::fs::read_to_string(up.state_dir().join("api-token"))
        .expect("api-token")
        .trim()
        .to_string()
}

#[test]
fn floods_of_idle_connections_leave_the_gateway_and_the_api_to_others() {
    let name = unique("flood");
    let limit = format!("--nofile=1024:{DAEMON_HARD_LIMIT}");
    let (_app, up) = start(&name, &["prlimit", &limit], &["--header-timeout", "3s"]);
    // Detected, raised and reported, not assumed.
    assert!(
        up.stderr().contains(&format!(
            "open-file limit {DAEMON_HARD_LIMIT} (raised from 1024)"
        )),
        "{}",
        up.stderr()
    );
    let gateway = SocketAddr::from(([127, 0, 0, 1], up.port.unwrap()));
    let api = api_addr(&up);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host(&name)
    );
    let answer = ask(gateway, request.as_bytes(), Duration::from_secs(10));
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "before the flood: {answer:?}"
    );

    // More idle connections than the platform has descriptors, from two
    // addresses, and more to the API than it serves at once.
    let mut held = Vec::new();
    for from in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)] {
        flood(from, gateway, 3000, &mut held);
    }
    flood(Ipv4Addr::new(127, 0, 0, 2), api, 400, &mut held);
    assert!(
        held.len() > DAEMON_HARD_LIMIT as usize,
        "only {} connections could be opened",
        held.len()
    );

    // Others are still served, promptly.
    let answer = ask(gateway, request.as_bytes(), Duration::from_secs(10));
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "a request from 127.0.0.1 during the flood: {answer:?}\n{}",
        up.stderr()
    );
    let call = format!(
        "GET /v1/services HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\n\
         Connection: close\r\n\r\n",
        api_token(&up)
    );
    let answer = ask(api, call.as_bytes(), Duration::from_secs(10));
    assert!(
        answer
            .as_ref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200") && a.contains(&name)),
        "an authenticated API call during the flood: {answer:?}"
    );

    // Connections over the caps were told why and closed at once.
    let last = held
        .iter_mut()
        .rev()
        .nth(500)
        .expect("a connection over the caps");
    let told = closed_by_server(last, Duration::from_secs(10));
    assert!(
        told.as_ref()
            .is_some_and(|t| t.contains("x-skiff-error: too-many-connections")),
        "{told:?}"
    );
    // Those admitted but silent are closed after --header-timeout (3 s).
    let first = &mut held[0];
    let closed = closed_by_server(first, Duration::from_secs(20));
    assert!(
        closed.is_some(),
        "a silent connection is still open after 20 s"
    );
    drop(held);
}

#[test]
fn an_api_connection_without_a_token_is_closed_after_its_answer() {
    let name = unique("apitoken");
    let (_app, up) = start(&name, &[], &[]);
    let api = api_addr(&up);
    let mut s = TcpStream::connect(api).unwrap();
    s.write_all(b"GET /v1/services HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    let answer = closed_by_server(&mut s, Duration::from_secs(10));
    assert!(
        answer
            .as_ref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 401") && a.contains("api-token")),
        "{answer:?}"
    );
    // One that sends nothing is closed soon too.
    let mut silent = TcpStream::connect(api).unwrap();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(15)).is_some(),
        "a silent API connection is still open after 15 s"
    );
}

/// Sends `head`, then `body_bytes` one a second (each written as
/// `piece(byte)`), and returns the answer, which must come before
/// `within`.
fn trickle(to: SocketAddr, head: &str, piece: fn(u8) -> Vec<u8>, within: Duration) -> String {
    let mut s = TcpStream::connect(to).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        // One byte a second, until the gateway answers.
        let _ = s.write_all(&piece(b'x'));
        let tick = Instant::now();
        while tick.elapsed() < Duration::from_secs(1) {
            match s.read(&mut buf) {
                Ok(0) => return String::from_utf8_lossy(&raw).into_owned(),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return String::from_utf8_lossy(&raw).into_owned(),
            }
        }
        if raw.windows(4).any(|w| w == b"\r\n\r\n") {
            // Answered; what is left of the body would only be dropped.
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(n) = s.read(&mut buf) {
                raw.extend_from_slice(&buf[..n]);
            }
            return String::from_utf8_lossy(&raw).into_owned();
        }
    }
    panic!(
        "no answer within {within:?} to a body sent at 1 byte/s: {:?}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn a_body_sent_at_one_byte_a_second_is_cut_off_long_before_the_request_timeout() {
    let name = unique("slowbody");
    // request_timeout is the default, 15 minutes.
    let (_app, up) = start(&name, &[], &["--header-timeout", "2s"]);
    let gateway = SocketAddr::from(([127, 0, 0, 1], up.port.unwrap()));
    let h = host(&name);
    // Served by the gateway's own HTTP/1.1 side (Content-Length) and by
    // hyper's (chunked).
    let plain = format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1000\r\n\r\n");
    let chunked = format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (head, piece) in [
        (plain, (|b| vec![b]) as fn(u8) -> Vec<u8>),
        (chunked, |b| vec![b'1', b'\r', b'\n', b, b'\r', b'\n']),
    ] {
        let answer = trickle(gateway, &head, piece, Duration::from_secs(60));
        assert!(answer.starts_with("HTTP/1.1 504"), "{head}: {answer}");
        assert!(
            answer.contains("x-skiff-error: request-body-timeout")
                && answer.contains("--min-body-rate")
                && answer.contains("was not sent to service"),
            "{head}: {answer}"
        );
    }
    // And the service still answers.
    let r = up.get(&h, "/");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn connect_is_answered_405_by_the_gateway() {
    let name = unique("connect");
    let (_app, up) = start(&name, &[], &[]);
    let gateway = SocketAddr::from(([127, 0, 0, 1], up.port.unwrap()));
    let h = host(&name);
    for request in [
        format!("CONNECT {h}:80 HTTP/1.1\r\nHost: {h}:80\r\n\r\n"),
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_string(),
    ] {
        let answer = ask(gateway, request.as_bytes(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{request}: {e}"));
        let lower = answer.to_ascii_lowercase();
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        assert!(
            lower.contains("x-skiff-error: connect-not-supported"),
            "{answer}"
        );
        assert!(lower.contains("allow: get"), "{answer}");
        assert!(answer.contains("not a forward proxy"), "{answer}");
    }
}

/// What the service saw as X-Forwarded-For for a request from `from`
/// carrying `X-Forwarded-For: 10.1.2.3`, over HTTP/1.1 (the gateway's own
/// side) or HTTP/1.0 (hyper's).
fn forwarded_for(from: Ipv4Addr, gateway: SocketAddr, h: &str, version: &str) -> String {
    let mut s = connect_from(from, gateway).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "GET /headers HTTP/{version}\r\nHost: {h}\r\nX-Forwarded-For: 10.1.2.3\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(
        raw.starts_with("HTTP/1.") && raw.get(8..13) == Some(" 200 "),
        "{raw}"
    );
    let seen = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let headers: std::collections::HashMap<String, String> =
        serde_json::from_str(seen).unwrap_or_else(|e| panic!("{e}: {seen}"));
    headers
        .get("x-forwarded-for")
        .cloned()
        .unwrap_or_else(|| panic!("no x-forwarded-for in {seen}"))
}

#[test]
fn a_clients_forwarded_for_is_replaced_and_only_a_trusted_proxys_kept() {
    let name = unique("xff");
    let (_app, up) = start(&name, &[], &["--trusted-proxy", "127.0.0.2/32"]);
    let gateway = SocketAddr::from(([127, 0, 0, 1], up.port.unwrap()));
    let h = host(&name);
    for version in ["1.1", "1.0"] {
        assert_eq!(
            forwarded_for(Ipv4Addr::new(127, 0, 0, 1), gateway, &h, version),
            "127.0.0.1",
            "a client's own list is replaced (HTTP/{version})"
        );
        assert_eq!(
            forwarded_for(Ipv4Addr::new(127, 0, 0, 3), gateway, &h, version),
            "127.0.0.3",
            "an address next to the trusted one is no proxy (HTTP/{version})"
        );
        assert_eq!(
            forwarded_for(Ipv4Addr::new(127, 0, 0, 2), gateway, &h, version),
            "10.1.2.3, 127.0.0.2",
            "a trusted proxy's list is kept and appended to (HTTP/{version})"
        );
    }
}
