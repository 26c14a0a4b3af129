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
//!
//! The same tables hold the request log's records (`reqlog.rs`) until the
//! platform takes them ([`Meters::take_records`]), up to
//! [`RECORDS_PER_THREAD`] each: beyond that, a record is dropped and
//! counted, so a platform that falls behind costs no memory. A record's
//! text (path, id) is copied into one buffer of the thread's: a request
//! leaves no allocation of its thread for another thread to free (a free
//! of another thread's memory takes that thread's allocator lock, and a
//! thread of low priority holding it would stall the gateway).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::ErrorKind;
use crate::reqlog::{Entry, Record};

/// Request records one thread holds until the platform takes them.
pub const RECORDS_PER_THREAD: usize = 16_384;

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
    services: HashMap<Arc<str>, Counts>,
    unrouted: Counts,
    records: Vec<Raw>,
    /// The records' paths and ids, one after another.
    text: String,
    /// Records dropped since the platform last took them.
    dropped: u64,
}

/// One thread's records as `Meters::swap_out` took them: they go back,
/// emptied, as the next spares, so a busy thread's buffers are not made
/// anew every time.
#[derive(Debug, Default)]
pub struct Buffers {
    records: Vec<Raw>,
    text: String,
}

/// Records swapped out of the threads' tables.
#[derive(Debug)]
pub struct Taken {
    buffers: Vec<Buffers>,
    /// Records dropped because a thread held its most.
    pub dropped: u64,
}

impl Taken {
    /// How many gateway threads they come from.
    pub fn threads(&self) -> usize {
        self.buffers.len()
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.buffers.iter().map(|b| b.records.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records, oldest first per thread; the buffers stay, emptied.
    pub fn records(&mut self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.len());
        for b in &mut self.buffers {
            out.extend(b.records.drain(..).map(|r| r.record(&b.text)));
            b.text.clear();
        }
        out
    }

    /// The emptied buffers, for `Meters::swap_out`.
    pub fn into_spares(self) -> Vec<Buffers> {
        self.buffers
    }
}

/// A record as a thread holds it: its text in the table's buffer.
#[derive(Debug)]
struct Raw {
    service: Arc<str>,
    at: std::time::SystemTime,
    method: http::Method,
    path: std::ops::Range<usize>,
    request_id: std::ops::Range<usize>,
    status: u16,
    took: Duration,
    bytes_in: u64,
    bytes_out: Option<u64>,
    instance: Option<Arc<str>>,
    wake: crate::route::Wake,
    refused: Option<ErrorKind>,
}

impl Raw {
    fn record(self, text: &str) -> Record {
        let cut = |r: std::ops::Range<usize>| text.get(r).unwrap_or_default().into();
        Record {
            service: self.service,
            at: self.at,
            method: self.method,
            path: cut(self.path),
            status: self.status,
            took: self.took,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            instance: self.instance,
            wake: self.wake,
            request_id: cut(self.request_id),
            refused: self.refused,
        }
    }
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

    /// The request records since the last call, oldest first per thread,
    /// and how many were dropped because a thread held its most.
    pub fn take_records(&self) -> (Vec<Record>, u64) {
        let mut taken = self.swap_out(&mut Vec::new());
        let records = taken.records();
        (records, taken.dropped)
    }

    /// Swaps each thread's records out for `spares` (buffers a `Taken`
    /// gave back, emptied) or empty buffers: under each thread's lock,
    /// only a swap. The records are made from them later, on any thread
    /// (`Taken::records`).
    pub fn swap_out(&self, spares: &mut Vec<Buffers>) -> Taken {
        let tables: Vec<_> = locked(&self.tables).clone();
        let mut taken = Taken {
            buffers: Vec::with_capacity(tables.len()),
            dropped: 0,
        };
        for table in tables {
            let mut spare = spares.pop().unwrap_or_default();
            let mut table = locked(&table);
            taken.dropped += std::mem::take(&mut table.dropped);
            std::mem::swap(&mut table.records, &mut spare.records);
            std::mem::swap(&mut table.text, &mut spare.text);
            drop(table);
            taken.buffers.push(spare);
        }
        taken
    }

    /// A removed service's counts go.
    pub fn forget(&self, service: &str) {
        self.retain(|name| name != service);
    }

    /// Only the services `keep` names go on being counted, and keep their
    /// records not yet taken (a request in
    /// flight when its service was removed counts it again).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        for table in locked(&self.tables).iter() {
            let mut table = locked(table);
            let gone: Vec<Arc<str>> = table
                .services
                .keys()
                .filter(|name| !keep(name))
                .cloned()
                .collect();
            if gone.is_empty() {
                continue;
            }
            for name in &gone {
                table.services.remove(name);
            }
            table.records.retain(|r| !gone.contains(&r.service));
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
    /// `refused` when the gateway answered itself; with the request's
    /// `entry`, a record of it for the request log (requests for no
    /// service have none).
    pub fn answered(
        &self,
        service: Option<&str>,
        status: u16,
        took: Duration,
        refused: Option<ErrorKind>,
        entry: Option<Entry<'_>>,
    ) {
        let mut guard = locked(&self.table);
        let table = &mut *guard;
        let Some(name) = service else {
            table.unrouted.answered(status, took, refused);
            return;
        };
        if !table.services.contains_key(name) {
            table.services.insert(name.into(), Counts::default());
        }
        if let Some(counts) = table.services.get_mut(name) {
            counts.answered(status, took, refused);
        }
        let Some(e) = entry else { return };
        let Some((service, _)) = table.services.get_key_value(name) else {
            return;
        };
        let service = service.clone();
        if table.records.len() >= RECORDS_PER_THREAD {
            table.dropped += 1;
            return;
        }
        let mut copy = |s: &str| {
            let start = table.text.len();
            table.text.push_str(s);
            start..table.text.len()
        };
        let path = copy(e.path);
        let request_id = copy(e.request_id);
        table.records.push(Raw {
            service,
            at: e.at,
            method: e.method,
            path,
            request_id,
            status,
            took,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            instance: e.instance,
            wake: e.wake,
            refused,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_count_apart_and_a_snapshot_adds_them_up() {
        let meters = Meters::new();
        let (a, b) = (meters.for_thread(), meters.for_thread());
        a.answered(Some("api"), 200, Duration::from_micros(300), None, None);
        b.answered(Some("api"), 204, Duration::from_millis(3), None, None);
        b.answered(
            Some("api"),
            504,
            Duration::from_secs(30),
            Some(ErrorKind::RequestTimeout),
            None,
        );
        a.answered(
            None,
            404,
            Duration::ZERO,
            Some(ErrorKind::UnknownService),
            None,
        );
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
        a.answered(Some("api"), 200, Duration::from_secs(600), None, None);
        assert_eq!(meters.snapshot().services[0].1.buckets[14], 1);
        meters.forget("api");
        assert!(meters.snapshot().services.is_empty());
    }

    fn entry(path: &str) -> Entry<'_> {
        Entry {
            at: std::time::SystemTime::now(),
            method: http::Method::GET,
            path,
            bytes_in: 0,
            bytes_out: Some(2),
            instance: Some(Arc::from("i1")),
            wake: crate::route::Wake::Cold,
            request_id: "r1",
        }
    }

    #[test]
    fn records_are_taken_once_and_held_up_to_a_bound() {
        let meters = Meters::new();
        let (a, b) = (meters.for_thread(), meters.for_thread());
        a.answered(Some("api"), 200, Duration::ZERO, None, Some(entry("/a")));
        b.answered(
            Some("api"),
            502,
            Duration::ZERO,
            Some(ErrorKind::UpstreamFailed),
            Some(entry("/b")),
        );
        a.answered(None, 404, Duration::ZERO, None, None);
        let (records, dropped) = meters.take_records();
        assert_eq!(dropped, 0);
        let paths: Vec<_> = records.iter().map(|r| (&*r.path, r.status)).collect();
        assert_eq!(paths, [("/a", 200), ("/b", 502)]);
        assert_eq!(&*records[1].service, "api");
        assert_eq!(records[1].refused, Some(ErrorKind::UpstreamFailed));
        assert!(meters.take_records().0.is_empty(), "taken once");

        for _ in 0..RECORDS_PER_THREAD + 5 {
            a.answered(Some("api"), 200, Duration::ZERO, None, Some(entry("/")));
        }
        let (records, dropped) = meters.take_records();
        assert_eq!((records.len(), dropped), (RECORDS_PER_THREAD, 5));
        // Counted all the same.
        assert_eq!(
            meters.snapshot().services[0].1.by_class[1],
            RECORDS_PER_THREAD as u64 + 6
        );
    }
}
