//! Who may hold a connection: caps per client address and in total, so
//! that no client can take the descriptors everyone else needs; and which
//! peers are trusted proxies (whose `X-Forwarded-For` is kept).
//!
//! The accounting is per connection, never per request: one short lock
//! when a connection is accepted and one when it ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How many client connections may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In total, over all clients.
    pub total: usize,
    /// From one client address (IPv6: one /64, what one host is given).
    pub per_address: usize,
}

impl ConnectionLimits {
    /// Caps that fit a process allowed `descriptors` open files.
    ///
    /// A quarter (at least 256, at most 8192) is left for everything but
    /// client connections: the database, log files, listening sockets,
    /// the control API (256 connections at most), instances' control
    /// sockets, pipes and cgroup files. Of the rest, half may be client
    /// connections, since each one being served may hold a pooled
    /// connection to an instance. One address may hold an eighth of the
    /// total: many users behind one NAT (an office, a mobile carrier)
    /// share an address and must not be cut off early, and eight
    /// addresses are still needed to fill the gateway.
    pub fn for_descriptors(descriptors: u64) -> Self {
        let n = usize::try_from(descriptors).unwrap_or(usize::MAX);
        let reserve = (n / 4).clamp(256, 8192);
        let total = (n.saturating_sub(reserve) / 2).max(16);
        Self {
            total,
            per_address: (total / 8).max(8),
        }
    }
}

impl Default for ConnectionLimits {
    /// The caps for 1024 descriptors, the usual soft limit.
    fn default() -> Self {
        Self::for_descriptors(1024)
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds `per_address` connections already.
    PerAddress,
    /// The gateway holds `total` connections already.
    Total,
}

/// The open connections, counted per client address and in total.
/// Shared by all of a gateway's threads.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionTable {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Counts a new connection from `peer`, unless that would pass a cap.
    /// The connection is counted until the returned guard is dropped.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        limits: ConnectionLimits,
    ) -> Result<Admitted, Refused> {
        let key = address_key(peer);
        // Counted first, taken back when over: no lock for the total.
        if self.total.fetch_add(1, Ordering::Relaxed) >= limits.total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Total);
        }
        let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(key).or_insert(0);
        if *held >= limits.per_address {
            drop(map);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::PerAddress);
        }
        *held += 1;
        Ok(Admitted {
            table: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn release(&self, key: IpAddr) {
        let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&key) {
            *held -= 1;
            if *held == 0 {
                map.remove(&key);
            }
        }
        drop(map);
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<ConnectionTable>,
    key: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

/// The address a connection is counted under: IPv4 as it is (also when
/// mapped into IPv6), IPv6 by its /64, since one host usually holds a
/// whole /64 and could otherwise use a new address per connection.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An address range such as `10.0.0.0/8`, `192.0.2.7` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A range that could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not an address range; write an address with an optional prefix length, \
     e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32"
)]
pub struct CidrError(String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let err = || CidrError(s.to_string());
        let text = s.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| err())?
            }
            Some(_) => return Err(err()),
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4 address mapped into IPv6
    /// counts as the IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are the same.
fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        (a[whole] & mask) == (b[whole] & mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_room_for_everything_else() {
        for (descriptors, total, per_address) in [
            (1024, 384, 48),
            (4096, 1536, 192),
            (20_000, 7500, 937),
            (1 << 20, 520_192, 65_024),
            (10, 16, 8),
        ] {
            let caps = ConnectionLimits::for_descriptors(descriptors);
            assert_eq!(caps.total, total, "{descriptors}");
            assert_eq!(caps.per_address, per_address, "{descriptors}");
            if descriptors >= 1024 {
                // Two descriptors per connection, and a reserve, fit.
                assert!(2 * caps.total + 256 <= descriptors as usize);
            }
        }
    }

    #[test]
    fn connections_are_capped_per_address_and_in_total() {
        let table = ConnectionTable::new();
        let limits = ConnectionLimits {
            total: 5,
            per_address: 2,
        };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "::ffff:192.0.2.3".parse().unwrap();
        let first = table.admit(a, limits).unwrap();
        let _second = table.admit(a, limits).unwrap();
        assert_eq!(table.admit(a, limits).unwrap_err(), Refused::PerAddress);
        let _b1 = table.admit(b, limits).unwrap();
        let _b2 = table.admit(b, limits).unwrap();
        let _c1 = table.admit(c, limits).unwrap();
        assert_eq!(table.open(), 5);
        assert_eq!(table.admit(c, limits).unwrap_err(), Refused::Total);
        drop(first);
        assert_eq!(table.open(), 4);
        let _again = table.admit(a, limits).unwrap();
        // Refusals left no count behind.
        assert_eq!(table.open(), 5);
    }

    #[test]
    fn ipv6_hosts_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let table = ConnectionTable::new();
        let limits = ConnectionLimits {
            total: 100,
            per_address: 1,
        };
        let _one = table.admit("2001:db8:1:2::1".parse().unwrap(), limits);
        assert_eq!(
            table
                .admit("2001:db8:1:2:ffff::9".parse().unwrap(), limits)
                .unwrap_err(),
            Refused::PerAddress
        );
        assert!(table
            .admit("2001:db8:1:3::1".parse().unwrap(), limits)
            .is_ok());
        let _v4 = table.admit("192.0.2.1".parse().unwrap(), limits).unwrap();
        assert_eq!(
            table
                .admit("::ffff:192.0.2.1".parse().unwrap(), limits)
                .unwrap_err(),
            Refused::PerAddress
        );
    }

    #[test]
    fn ranges_parse_and_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.0.2.7", "192.0.2.7", true),
            ("192.0.2.7", "192.0.2.8", false),
            ("192.0.2.0/25", "192.0.2.127", true),
            ("192.0.2.0/25", "192.0.2.128", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("127.0.0.1/32", "::ffff:127.0.0.1", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/33", "2001:db8:8000::1", false),
            ("::1", "::1", true),
            ("::/0", "192.0.2.1", false),
        ];
        for (range, ip, inside) in cases {
            let cidr: Cidr = range.parse().unwrap_or_else(|e| panic!("{range}: {e}"));
            assert_eq!(cidr.contains(ip.parse().unwrap()), *inside, "{range} {ip}");
        }
        assert_eq!(
            " 10.1.0.0/16 ".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "a.b.c.d",
            "10.0.0.0/8/8",
            "localhost",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains("e.g. 10.0.0.0/8"), "{bad}: {e}");
        }
    }
}
