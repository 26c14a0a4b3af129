//! Reaching a port inside an instance's network namespace without giving the
//! instance an address: the socket is created inside the namespace (a thread
//! enters it with `setns` for the length of one `socket()` call) and then
//! used from anywhere. The instance gets no network beyond its own loopback.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
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

    /// Creates a TCP socket that lives in this namespace.
    fn socket(&self) -> io::Result<TcpSocket> {
        let host = host_netns()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let socket = TcpSocket::new_v4();
        if let Err(e) = setns(host, CloneFlags::CLONE_NEWNET) {
            // This thread would now open every later socket inside an
            // instance; carrying on would send user traffic to the wrong place.
            eprintln!("skiff: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        socket
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
