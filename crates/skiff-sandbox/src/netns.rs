//! Reaching a port inside an instance's network namespace without giving the
//! instance an address: the socket is created inside the namespace (a thread
//! enters it with `setns` for the length of one `socket()` call) and then
//! used from anywhere. The instance gets no network beyond its own loopback.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpSocket, TcpStream};

/// The platform's own network namespace, to return to after each `socket()`.
fn host_netns() -> io::Result<&'static File> {
    static HOST: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOST.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOST.get_or_init(|| f))
}

/// A handle on one instance's network namespace. Holding it keeps the
/// namespace alive, so it is dropped with the instance.
#[derive(Debug)]
pub struct NetNs {
    file: File,
}

impl NetNs {
    /// Opens the network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        host_netns()?;
        Ok(Self {
            file: File::open(Path::new("/proc").join(pid.to_string()).join("ns/net"))?,
        })
    }

    /// Runs `make` (one socket call) inside this namespace.
    fn inside<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let host = host_netns()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let made = make();
        if let Err(e) = setns(host, CloneFlags::CLONE_NEWNET) {
            // This thread would now open every later socket inside an
            // instance; carrying on would send user traffic to the wrong place.
            eprintln!("skiff: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        made
    }

    /// Creates a TCP socket that lives in this namespace.
    fn socket(&self) -> io::Result<TcpSocket> {
        self.inside(TcpSocket::new_v4)
    }

    /// A way to ask this namespace's kernel which TCP ports are listened
    /// on, without a connection to any of them (sock_diag netlink).
    pub fn listeners(&self) -> io::Result<Listeners> {
        let fd = self.inside(|| {
            // SAFETY: a plain socket call; the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    libc::NETLINK_SOCK_DIAG,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just returned by socket() and is ours alone.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        let mut listeners = Listeners {
            fd,
            seq: 0,
            buf: vec![0; 16 * 1024],
        };
        // A lookup that finds nothing and a kernel without the TCP handler
        // (no `tcp_diag` module) both answer ENOENT; a dump tells them
        // apart, once (the namespace is new: it holds no listener yet).
        listeners.ask(&listener_request(0, 0, true))?;
        Ok(listeners)
    }

    /// Connects to `127.0.0.1:port` as seen from inside the instance.
    pub async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let socket = self.socket()?;
        let stream = socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A sock_diag socket inside an instance's network namespace: whether a
/// TCP port is in LISTEN there, asked of the kernel (one lookup, about
/// 3 µs) rather than by connecting to it.
#[derive(Debug)]
pub struct Listeners {
    fd: OwnedFd,
    seq: u32,
    /// Where replies are received (asked every few hundred microseconds).
    buf: Vec<u8>,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const NLMSG_HEADER: usize = 16;

impl Listeners {
    /// Whether a TCP socket listens where a connection to
    /// `127.0.0.1:port` would reach it (on that address, on `0.0.0.0`, or on
    /// `[::]` taking IPv4 too): what the health probe connects to. One
    /// lookup in the kernel's table, not a dump of every listener (which
    /// walks the host's whole listening hash, for each namespace alike).
    pub fn listening_on(&mut self, port: u16) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        self.ask(&listener_request(port, self.seq, false))
    }

    /// Sends `request` (whose sequence number is `self.seq`) and reads
    /// until its answer.
    fn ask(&mut self, request: &[u8]) -> io::Result<bool> {
        // SAFETY: sending a buffer we own to the kernel (pid 0) on our socket.
        let sent = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let buf = &mut self.buf;
        loop {
            // SAFETY: receiving into a buffer we own, of the length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(found) = parse_listener_reply(&buf[..n as usize], self.seq)? {
                return Ok(found);
            }
        }
    }
}

/// An `inet_diag_req_v2` asking for the one TCP socket a connection from
/// nowhere to `127.0.0.1:port` would find: a listener, if any; or, as a
/// `dump`, for every IPv4 listener.
fn listener_request(port: u16, seq: u32, dump: bool) -> Vec<u8> {
    // nlmsghdr (16 bytes), then inet_diag_req_v2: family, protocol, ext,
    // pad, states (u32), and the inet_diag_sockid (48 bytes): source port,
    // destination port (big-endian), source and destination address (16
    // bytes each), interface, and the cookie (none: all ones).
    let len = NLMSG_HEADER + 8 + 48;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let dump = if dump { libc::NLM_F_DUMP } else { 0 };
    m.extend_from_slice(&((libc::NLM_F_REQUEST | dump) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m.extend_from_slice(&port.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
    m.extend_from_slice(&src);
    m.extend_from_slice(&[0; 16]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0xff; 8]);
    m
}

/// Reads one datagram of the reply to a listener request: `Some(true)` when
/// the socket was found in LISTEN, `Some(false)` when none was (or a dump
/// ended), `None` when the datagram held only replies to earlier requests.
fn parse_listener_reply(mut buf: &[u8], seq: u32) -> io::Result<Option<bool>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply");
    while buf.len() >= NLMSG_HEADER {
        let u32_at =
            |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let len = u32_at(0) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HEADER || len > buf.len() {
            return Err(bad());
        }
        // A reply to an earlier request (one abandoned on an error) is skipped.
        if u32_at(8) == seq {
            match kind {
                NLMSG_DONE => return Ok(Some(false)),
                NLMSG_ERROR => {
                    let errno = match buf.get(16..20).ok_or_else(bad)? {
                        &[a, b, c, d] => i32::from_ne_bytes([a, b, c, d]),
                        _ => return Err(bad()),
                    };
                    // No such socket; 0 would be a bare acknowledgement.
                    if errno == -libc::ENOENT || errno == 0 {
                        return Ok(Some(false));
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    // inet_diag_msg: family, then the socket's state.
                    let state = *buf.get(NLMSG_HEADER + 1).ok_or_else(bad)?;
                    return Ok(Some(u32::from(state) == TCP_LISTEN));
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HEADER + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize((len + 3) & !3, 0);
        m
    }

    fn socket(state: u32) -> Vec<u8> {
        let mut p = vec![libc::AF_INET as u8, state as u8, 0, 0];
        p.extend_from_slice(&8080u16.to_be_bytes());
        p.resize(72, 0);
        p
    }

    #[test]
    fn a_listener_request_names_the_port_on_loopback_and_no_cookie() {
        let m = listener_request(8080, 7, false);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DIAG_BY_FAMILY);
        // One socket asked for, not a dump.
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), libc::NLM_F_REQUEST as u16);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_TCP as u8);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 1 << 10);
        // Source port, then destination port, both big-endian.
        assert_eq!(&m[24..28], &[0x1f, 0x90, 0, 0]);
        assert_eq!(&m[28..32], &[127, 0, 0, 1]);
        assert!(m[32..64].iter().all(|&b| b == 0));
        assert_eq!(&m[64..72], &[0xff; 8]);
        let dump = listener_request(0, 1, true);
        assert_eq!(
            u16::from_ne_bytes([dump[6], dump[7]]),
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16
        );
    }

    #[test]
    fn a_reply_says_whether_a_listener_was_found() {
        let found = message(SOCK_DIAG_BY_FAMILY, 3, &socket(TCP_LISTEN));
        assert_eq!(parse_listener_reply(&found, 3).unwrap(), Some(true));
        let closing = message(SOCK_DIAG_BY_FAMILY, 3, &socket(7));
        assert_eq!(parse_listener_reply(&closing, 3).unwrap(), Some(false));
        let none = message(NLMSG_ERROR, 3, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_listener_reply(&none, 3).unwrap(), Some(false));
        let done = message(NLMSG_DONE, 3, &[0; 4]);
        assert_eq!(parse_listener_reply(&done, 3).unwrap(), Some(false));
        // An earlier request's answer is passed over for this one's.
        let mut both = message(SOCK_DIAG_BY_FAMILY, 2, &socket(TCP_LISTEN));
        assert_eq!(parse_listener_reply(&both, 3).unwrap(), None);
        both.extend(none);
        assert_eq!(parse_listener_reply(&both, 3).unwrap(), Some(false));
        let error = message(NLMSG_ERROR, 3, &(-libc::EPERM).to_ne_bytes());
        let e = parse_listener_reply(&error, 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut cut = message(SOCK_DIAG_BY_FAMILY, 3, &socket(TCP_LISTEN));
        cut.truncate(20);
        cut[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse_listener_reply(&cut, 3).is_err());
    }
}
