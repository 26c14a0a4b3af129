//! What the gateway counts, per service: its answers by status class, how
//! long each took (from the request's head to the answer's, the body of a
//! streamed answer not included), and its own refusals by kind.
//!
//! Each gateway thread counts in a table of its own, behind a lock that
//! only a scrape takes besides it: counting costs a request an uncontended
//! lock, a lookup by name and a few additions, and no cache line moves
//! between cores. A scrape adds the tables up ([`Meters::snapshot`]).
//! Only services that exist get a row; requests for none (an unknown or
//! missing Host) are counted without one, so no client can make the tables
//! grow, and the platform drops the rows of removed services
//! ([`Meters::retain`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::ErrorKind;

/// Upper bounds of the duration histogram's buckets, in seconds (a last,
/// unbounded one follows).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// One service's counts (or those of requests for no service).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Answers by status class: 1xx to 5xx.
    pub by_class: [u64; 5],
    /// Answers per duration bucket (not cumulative); the last is beyond
    /// the last bound.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// The durations' sum, in seconds.
    pub sum: f64,
    /// The gateway's own answers, by kind (in `ErrorKind::ALL`'s order).
    pub refused: [u64; ErrorKind::ALL.len()],
}

impl Counts {
    fn answered(&mut self, status: u16, took: Duration, refused: Option<ErrorKind>) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class] += 1;
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.sum += secs;
        if let Some(kind) = refused {
            if let Some(i) = ErrorKind::ALL.iter().position(|k| *k == kind) {
                self.refused[i] += 1;
            }
        }
    }

    fn add(&mut self, other: &Counts) {
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a += b;
        }
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// How many answers.
    pub fn count(&self) -> u64 {
        self.by_class.iter().sum()
    }
}

#[derive(Debug, Default)]
struct Table {
    services: HashMap<Box<str>, Counts>,
    unrouted: Counts,
}

/// Every gateway thread's counts.
#[derive(Debug, Default)]
pub struct Meters {
    tables: Mutex<Vec<Arc<Mutex<Table>>>>,
}

/// Everything counted, added up over the threads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: Vec<(String, Counts)>,
    /// Requests the gateway routed to no service.
    pub unrouted: Counts,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Meters {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A table for one more gateway thread.
    pub fn for_thread(&self) -> ThreadMeter {
        let table = Arc::new(Mutex::new(Table::default()));
        locked(&self.tables).push(table.clone());
        ThreadMeter { table }
    }

    /// The counts so far, by service (sorted by name).
    pub fn snapshot(&self) -> Snapshot {
        let tables: Vec<_> = locked(&self.tables).clone();
        let mut services: HashMap<String, Counts> = HashMap::new();
        let mut unrouted = Counts::default();
        for table in tables {
            let table = locked(&table);
            for (name, counts) in &table.services {
                services.entry(name.to_string()).or_default().add(counts);
            }
            unrouted.add(&table.unrouted);
        }
        let mut services: Vec<_> = services.into_iter().collect();
        services.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot { services, unrouted }
    }

    /// A removed service's counts go.
    pub fn forget(&self, service: &str) {
        self.retain(|name| name != service);
    }

    /// Only the services `keep` names go on being counted (a request in
    /// flight when its service was removed counts it again).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        for table in locked(&self.tables).iter() {
            locked(table).services.retain(|name, _| keep(name));
        }
    }
}

/// One gateway thread's counts.
#[derive(Debug)]
pub struct ThreadMeter {
    table: Arc<Mutex<Table>>,
}

impl ThreadMeter {
    /// An answer for `service` (`None`: the request reached no service),
    /// `refused` when the gateway answered itself.
    pub fn answered(
        &self,
        service: Option<&str>,
        status: u16,
        took: Duration,
        refused: Option<ErrorKind>,
    ) {
        let mut table = locked(&self.table);
        let counts = match service {
            None => &mut table.unrouted,
            Some(name) => {
                if !table.services.contains_key(name) {
                    table.services.insert(name.into(), Counts::default());
                }
                match table.services.get_mut(name) {
                    Some(counts) => counts,
                    None => return,
                }
            }
        };
        counts.answered(status, took, refused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_count_apart_and_a_snapshot_adds_them_up() {
        let meters = Meters::new();
        let (a, b) = (meters.for_thread(), meters.for_thread());
        a.answered(Some("api"), 200, Duration::from_micros(300), None);
        b.answered(Some("api"), 204, Duration::from_millis(3), None);
        b.answered(
            Some("api"),
            504,
            Duration::from_secs(30),
            Some(ErrorKind::RequestTimeout),
        );
        a.answered(None, 404, Duration::ZERO, Some(ErrorKind::UnknownService));
        let snap = meters.snapshot();
        assert_eq!(snap.services.len(), 1);
        let (name, api) = &snap.services[0];
        assert_eq!(name, "api");
        assert_eq!(api.by_class, [0, 2, 0, 0, 1]);
        assert_eq!(api.count(), 3);
        // 0.3 ms in the first bucket, 3 ms in the 5 ms one, 30 s in 60 s.
        assert_eq!(api.buckets[0], 1);
        assert_eq!(api.buckets[3], 1);
        assert_eq!(api.buckets[13], 1);
        assert!((api.sum - 30.0033).abs() < 1e-9, "{}", api.sum);
        let timeout = ErrorKind::ALL
            .iter()
            .position(|k| *k == ErrorKind::RequestTimeout)
            .unwrap();
        assert_eq!(api.refused[timeout], 1);
        assert_eq!(snap.unrouted.by_class, [0, 0, 0, 1, 0]);
        assert_eq!(snap.unrouted.refused.iter().sum::<u64>(), 1);
        // Past the last bound; and a removed service's counts go.
        a.answered(Some("api"), 200, Duration::from_secs(600), None);
        assert_eq!(meters.snapshot().services[0].1.buckets[14], 1);
        meters.forget("api");
        assert!(meters.snapshot().services.is_empty());
    }
}
