//! Outbound network for builds: a network namespace of their own, joined
//! to the internet by slirp4netns (user-space NAT run by the platform), with
//! reject routes the build cannot remove in front of every place on the
//! host it must not reach.
//!
//! Inside, the build has `lo` and `tap0` (10.0.2.100/24, gateway 10.0.2.2,
//! DNS forwarder 10.0.2.3). Its `127.0.0.1` is its own loopback, not the
//! host's; slirp4netns runs with `--disable-host-loopback`, so 10.0.2.2
//! does not lead to the host's loopback either. What slirp's NAT would
//! still reach — the host's own addresses (services bound to 0.0.0.0) and
//! link-local addresses (cloud metadata at 169.254.169.254) — gets a reject
//! route inside the namespace: connecting there fails at once with
//! "No route to host". The build has no CAP_NET_ADMIN, so it keeps them.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// slirp4netns's DNS forwarder, as seen from inside.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The interface slirp4netns creates inside the namespace.
pub const TAP: &str = "tap0";
/// How long the sandbox waits for slirp4netns to configure its interface.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// An IPv4 network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Ipv4Net {
    fn mask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }
}

/// Where a build must not connect: link-local (cloud metadata services)
/// and every IPv4 address of the host's own interfaces except loopback
/// (the build's 127.0.0.0/8 is its own).
pub fn blocked_for_builds() -> io::Result<Vec<Ipv4Net>> {
    let mut blocked = vec![Ipv4Net {
        addr: Ipv4Addr::new(169, 254, 0, 0),
        prefix: 16,
    }];
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let addr = addr.ip();
        if addr.is_loopback() || addr.is_unspecified() {
            continue;
        }
        let net = Ipv4Net { addr, prefix: 32 };
        if !blocked.contains(&net) {
            blocked.push(net);
        }
    }
    Ok(blocked)
}

/// Starts slirp4netns for the network namespace of `pid`. It runs until it
/// is killed (the child is killed when dropped) or the namespace is gone.
pub fn start_slirp(binary: &Path, pid: u32) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(binary);
    // SAFETY: only prctl, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // If skiff dies, so does the build's network.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args([
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        &pid.to_string(),
        TAP,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
}

/// Inside the namespace: adds a reject route for each of `blocked`.
pub(crate) fn add_reject_routes(blocked: &[Ipv4Net]) -> Result<(), String> {
    for net in blocked {
        reject_route(net).map_err(|e| format!("adding a reject route to {net}: {e}"))?;
    }
    Ok(())
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux (16
    // bytes); the kernel reads this one as the sockaddr_in it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn reject_route(net: &Ipv4Net) -> io::Result<()> {
    // SAFETY: a zeroed rtentry is valid (null device, no metrics); socket
    // and ioctl are plain calls on a descriptor closed by OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let _guard = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let mut rt: libc::rtentry = std::mem::zeroed();
        rt.rt_dst = sockaddr(net.network());
        rt.rt_genmask = sockaddr(net.mask());
        rt.rt_flags = libc::RTF_UP | libc::RTF_REJECT;
        if net.prefix == 32 {
            rt.rt_flags |= libc::RTF_HOST;
        }
        if libc::ioctl(fd, libc::SIOCADDRT, &rt) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Inside the namespace: waits until slirp4netns has configured `tap0`
/// (the default route through it is the last thing it adds).
pub(crate) fn wait_until_configured() -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let ready = routes.lines().skip(1).any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(TAP) && f.next() == Some("00000000")
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the build's network (slirp4netns) was not configured within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_networks() {
        let n = Ipv4Net {
            addr: Ipv4Addr::new(169, 254, 169, 254),
            prefix: 16,
        };
        assert_eq!(n.mask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(n.network(), Ipv4Addr::new(169, 254, 0, 0));
        let h = Ipv4Net {
            addr: Ipv4Addr::new(192, 0, 2, 2),
            prefix: 32,
        };
        assert_eq!(h.mask(), Ipv4Addr::BROADCAST);
        assert_eq!(h.network(), h.addr);
        let all = Ipv4Net {
            addr: Ipv4Addr::new(1, 2, 3, 4),
            prefix: 0,
        };
        assert_eq!(all.mask(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn builds_are_kept_from_link_local_and_the_hosts_own_addresses() {
        let blocked = blocked_for_builds().unwrap();
        assert!(blocked.contains(&Ipv4Net {
            addr: Ipv4Addr::new(169, 254, 0, 0),
            prefix: 16
        }));
        assert!(blocked.iter().all(|n| !n.addr.is_loopback()));
        // Every non-loopback IPv4 address of this host is in the list.
        for ifa in nix::ifaddrs::getifaddrs().unwrap() {
            if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                if !a.ip().is_loopback() {
                    assert!(blocked.iter().any(|n| n.addr == a.ip()), "{a}");
                }
            }
        }
    }
}
