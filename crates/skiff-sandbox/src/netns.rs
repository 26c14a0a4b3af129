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
        Ok(Listeners {
            fd,
            seq: 0,
            buf: vec![0; 16 * 1024],
        })
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
/// TCP port is in LISTEN there, asked of the kernel (a dump of the
/// namespace's listening sockets, a few microseconds) rather than by
/// connecting to it.
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
    /// Whether a TCP socket listens on `port` (IPv4 or IPv6, any address).
    pub fn listening_on(&mut self, port: u16) -> io::Result<bool> {
        for family in [libc::AF_INET, libc::AF_INET6] {
            if self.dump(family as u8)?.contains(&port) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The ports of `family`'s TCP sockets in LISTEN.
    fn dump(&mut self, family: u8) -> io::Result<Vec<u16>> {
        self.seq = self.seq.wrapping_add(1);
        let request = listen_request(family, self.seq);
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
        let mut ports = Vec::new();
        let buf = &mut self.buf;
        loop {
            // SAFETY: receiving into a buffer we own, of the length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            match parse_listen_reply(&buf[..n as usize], self.seq, &mut ports)? {
                true => return Ok(ports),
                false => continue,
            }
        }
    }
}

/// An `inet_diag_req_v2` dump request for `family`'s TCP sockets in LISTEN.
fn listen_request(family: u8, seq: u32) -> Vec<u8> {
    // nlmsghdr (16 bytes), then inet_diag_req_v2: family, protocol, ext,
    // pad, states (u32), and a zeroed inet_diag_sockid (48 bytes).
    let len = NLMSG_HEADER + 8 + 48;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m.resize(len, 0);
    m
}

/// Reads one datagram of a dump's reply into `ports` (each socket's source
/// port); true once the dump is done.
fn parse_listen_reply(mut buf: &[u8], seq: u32, ports: &mut Vec<u16>) -> io::Result<bool> {
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
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = match buf.get(16..20).ok_or_else(bad)? {
                        &[a, b, c, d] => i32::from_ne_bytes([a, b, c, d]),
                        _ => return Err(bad()),
                    };
                    // Error 0 is an acknowledgement: nothing more comes.
                    if errno == 0 {
                        return Ok(true);
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    // inet_diag_msg: family, state, timer, retrans, then
                    // the socket id, whose source port comes first (big-endian).
                    let port = buf
                        .get(NLMSG_HEADER + 4..NLMSG_HEADER + 6)
                        .ok_or_else(bad)?;
                    ports.push(u16::from_be_bytes([port[0], port[1]]));
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    Ok(false)
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

    fn socket(port: u16) -> Vec<u8> {
        let mut p = vec![libc::AF_INET as u8, TCP_LISTEN as u8, 0, 0];
        p.extend_from_slice(&port.to_be_bytes());
        p.resize(72, 0);
        p
    }

    #[test]
    fn a_listen_request_asks_for_tcp_sockets_in_listen() {
        let m = listen_request(libc::AF_INET6 as u8, 7);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        assert_eq!(m[17], libc::IPPROTO_TCP as u8);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 1 << 10);
    }

    #[test]
    fn a_reply_gives_the_ports_until_done() {
        let mut reply = message(SOCK_DIAG_BY_FAMILY, 3, &socket(8080));
        reply.extend(message(SOCK_DIAG_BY_FAMILY, 2, &socket(9))); // an old request's
        reply.extend(message(SOCK_DIAG_BY_FAMILY, 3, &socket(3000)));
        let mut ports = Vec::new();
        assert!(!parse_listen_reply(&reply, 3, &mut ports).unwrap());
        assert_eq!(ports, vec![8080, 3000]);
        let done = message(NLMSG_DONE, 3, &[0; 4]);
        assert!(parse_listen_reply(&done, 3, &mut ports).unwrap());
        let error = message(NLMSG_ERROR, 3, &(-libc::EPERM).to_ne_bytes());
        let e = parse_listen_reply(&error, 3, &mut ports).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut cut = message(SOCK_DIAG_BY_FAMILY, 3, &socket(1));
        cut.truncate(20);
        cut[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse_listen_reply(&cut, 3, &mut ports).is_err());
    }
}
