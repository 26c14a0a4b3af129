//! Is the service listening? The health probe (docs/contract.md §1.3) and, when
//! it is not, what the service listens on instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use skiff_sandbox::NetNs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The path the platform polls. Any HTTP answer counts as healthy.
pub const HEALTH_PATH: &str = "/kaithhealth";

/// What one probe saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe {
    /// When the port took the connection.
    pub connected: Option<std::time::Instant>,
    /// Whether an HTTP answer came.
    pub answered: bool,
    /// The port took the connection, then closed it (or answered
    /// something other than HTTP) before the probe's time was up.
    pub refused_http: bool,
}

/// One probe of `http://0.0.0.0:{port}/kaithhealth` from inside the instance.
pub async fn probe(netns: &NetNs, port: u16, timeout: Duration) -> bool {
    probe_phases(netns, port, timeout).await.answered
}

/// A probe that also tells when the port took the connection.
pub async fn probe_phases(netns: &NetNs, port: u16, timeout: Duration) -> Probe {
    let mut seen = Probe::default();
    let connected = &mut seen.connected;
    let attempt = async {
        let mut stream = netns.connect(port).await.ok()?;
        *connected = Some(std::time::Instant::now());
        stream
            .write_all(
                format!(
                    "GET {HEALTH_PATH} HTTP/1.1\r\nHost: localhost:{port}\r\n\
                     User-Agent: skiff-health\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .ok()?;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.ok()?;
        if &buf != b"HTTP/" {
            return Some(false);
        }
        // Healthy now. Read the rest in the background before closing:
        // closing with unread data sends a reset (the service would log a
        // broken connection per probe), and a server that keeps the
        // connection open despite `Connection: close` must not delay the
        // start.
        tokio::spawn(async move {
            let mut rest = [0u8; 4096];
            let drain = async {
                let mut total = 0;
                while let Ok(n @ 1..) = stream.read(&mut rest).await {
                    total += n;
                    if total > 1 << 20 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(250), drain).await;
        });
        Some(true)
    };
    let outcome = tokio::time::timeout(timeout, attempt).await;
    seen.answered = matches!(outcome, Ok(Some(true)));
    // Finished in time without an answer, after the port took it.
    seen.refused_http = matches!(outcome, Ok(None | Some(false))) && seen.connected.is_some();
    seen
}

/// The TCP addresses a process's network namespace listens on, read from
/// `/proc/<pid>/net/tcp{,6}` (those files show the namespace of `pid`).
pub fn listening(pid: u32) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let path = format!("/proc/{pid}/net/{file}");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(parse_listeners(&text, v6));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Parses the kernel's `/proc/net/tcp` table and keeps sockets in LISTEN (0A).
fn parse_listeners(text: &str, v6: bool) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if v6 {
                // Four 32-bit words, each in the kernel's (little-endian) order.
                let mut bytes = [0u8; 16];
                for i in 0..4 {
                    let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                    bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(bytes))
            } else {
                let word = u32::from_str_radix(addr, 16).ok()?;
                IpAddr::V4(Ipv4Addr::from(word.to_le_bytes()))
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// The sentence after the port message: what the service does listen on.
pub fn describe_listeners(listeners: &[SocketAddr], port: u16) -> String {
    if listeners.is_empty() {
        return format!(
            "The service is not listening on any TCP port. Make it listen on port {port} \
             (skiff passes it in the PORT environment variable), on 0.0.0.0."
        );
    }
    let list = listeners
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "The service is listening on {list}, expected 0.0.0.0:{port}. Make it listen on \
         0.0.0.0 and the port configured in skiff.toml (port = {port}; skiff passes it in the \
         PORT environment variable), or set port to the one it uses."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001        0 1 1 0 100 0 0 10 0\n\
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001        0 2 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000 10001        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v4, false),
            vec![
                "127.0.0.1:3000".parse::<SocketAddr>().unwrap(),
                "0.0.0.0:8080".parse().unwrap()
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0\n\
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(
            parse_listeners(v6, true),
            vec![
                "[::]:8080".parse::<SocketAddr>().unwrap(),
                "[::1]:80".parse().unwrap()
            ]
        );
    }

    #[test]
    fn describes() {
        let s = describe_listeners(&["127.0.0.1:3000".parse().unwrap()], 8080);
        assert!(
            s.contains("listening on 127.0.0.1:3000, expected 0.0.0.0:8080"),
            "{s}"
        );
        assert!(describe_listeners(&[], 8080).contains("not listening on any TCP port"));
    }
}
