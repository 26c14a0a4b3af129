//! The request log: one record per request the gateway routed to a
//! service, in a database of its own (`<state>/requests.db`), written by
//! a thread of its own in batches, the newest [`REQUEST_RETENTION`] kept
//! per service.
//!
//! A database of its own, because its writer runs at idle priority
//! (the platform's choice, `Store::open_with`): on a busy machine it may
//! wait long for a CPU, and the write lock it holds then must not be the
//! one deploys and log lines need. Reads never wait for it (WAL).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection};
use tokio::sync::watch;

use crate::{ms, open_connection, time, LogQuery, Store, StoreError};

/// The request log's schema, as its migrations (see `MIGRATIONS` in
/// `lib.rs`; the same rules).
const MIGRATIONS: &[&str] = &[
    // 1: the records. One b-tree, by service and id (the writer gives
    // the ids, increasing): an insert writes one, where a rowid table
    // with an index on (service, id) writes two.
    "
CREATE TABLE IF NOT EXISTS requests (
    service     TEXT NOT NULL,
    id          INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    method      TEXT NOT NULL,
    path        TEXT NOT NULL,
    status      INTEGER NOT NULL,
    duration_us INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL,
    bytes_out   INTEGER,
    instance    TEXT,
    wake        TEXT,
    request_id  TEXT NOT NULL,
    error       TEXT,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
",
];
/// Records in one transaction at most: the write lock is held briefly.
const PER_TRANSACTION: usize = 1024;
/// Records per INSERT statement (13 values each).
const PER_STATEMENT: usize = 32;
/// The columns, in the order `insert` binds them.
const COLUMNS: &str = "service, id, at, method, path, status, duration_us, bytes_in, \
     bytes_out, instance, wake, request_id, error";

/// Request records kept per service: up to about 1 KB each (a target is
/// cut at 512 bytes, an id at 128, a method at 16), most far less, and
/// older ones are deleted as new ones come.
pub const REQUEST_RETENTION: i64 = 100_000;
/// Batches waiting for the writer.
pub(crate) const REQUEST_QUEUE: usize = 64;
/// Records handed to the writer and not yet stored; beyond this a batch
/// is dropped (and counted) rather than memory growing without bound.
pub(crate) const MAX_PENDING: usize = 65_536;

/// One request, as the request log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Increasing; 0 for a record not yet stored.
    pub id: i64,
    pub service: String,
    /// When its head had been read.
    pub at: SystemTime,
    pub method: String,
    /// Path and query (cut at 512 bytes).
    pub path: String,
    pub status: u16,
    /// From its head to the answer's head.
    pub duration: Duration,
    pub bytes_in: u64,
    /// Unknown for a streamed answer of unannounced length.
    pub bytes_out: Option<u64>,
    pub instance: Option<String>,
    /// `cold` (its instance was started for it) or `thawed`; `None` when
    /// the instance was running.
    pub wake: Option<String>,
    pub request_id: String,
    /// The gateway answered itself: the kind (`x-skiff-error`).
    pub error: Option<String>,
}

/// Records for the writer.
type Write = Vec<RequestRecord>;

/// Removed services and when: their records go, those stored and those
/// still on their way (made before the removal); a later service of the
/// name keeps its own.
type Removals = Arc<Mutex<Vec<(String, SystemTime)>>>;

/// The request log, held by the `Store`.
pub(crate) struct RequestLog {
    tx: SyncSender<Write>,
    last: watch::Receiver<i64>,
    /// Records (and removals) handed over and not yet done.
    pending: Arc<AtomicUsize>,
    /// Removals the writer has not carried out yet.
    removals: Removals,
    /// For reading.
    conn: Mutex<Connection>,
}

impl RequestLog {
    /// Opens (or creates) `<state_dir>/requests.db` and starts its
    /// writer, which runs `setup` first.
    pub fn open(state_dir: &Path, setup: fn()) -> Result<Self, StoreError> {
        let path = state_dir.join("requests.db");
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(err)?;
        crate::run_migrations(&mut conn, MIGRATIONS).map_err(err)?;
        let last_id: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM requests", [], |r| {
                r.get(0)
            })
            .map_err(err)?;
        let writer = open_connection(&path).map_err(err)?;
        // The writer's pages stay in memory (32 MB at most) rather than
        // being read again from the page cache for every batch, and the
        // log is copied into the database every 8 MB of pages, not 4.
        writer
            .execute_batch("PRAGMA cache_size = -32000; PRAGMA wal_autocheckpoint = 2000;")
            .map_err(err)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(REQUEST_QUEUE);
        let (last_tx, last) = watch::channel(last_id);
        let pending = Arc::new(AtomicUsize::new(0));
        let done = pending.clone();
        let removals = Removals::default();
        let to_remove = removals.clone();
        std::thread::Builder::new()
            .name("skiff-request-log".into())
            .spawn(move || {
                setup();
                write_requests(writer, rx, last_tx, last_id, &done, &to_remove)
            })
            .map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Self {
            tx,
            last,
            pending,
            removals,
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has the writer delete `service`'s records: those it stored, and
    /// those made before now that are still on their way.
    pub fn forget(&self, service: &str) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((service.to_string(), SystemTime::now()));
    }
}

impl Store {
    /// Hands records to the writer; never blocks. Returns how many were
    /// dropped: those the writer has no room for.
    pub fn add_requests(&self, batch: Vec<RequestRecord>) -> u64 {
        if batch.is_empty() {
            return 0;
        }
        let mut batch = batch;
        let pending = &self.requests.pending;
        // What fits under the bound goes; the rest is dropped.
        let room = MAX_PENDING.saturating_sub(pending.load(Ordering::SeqCst));
        let dropped = batch.len().saturating_sub(room);
        batch.truncate(room);
        if batch.is_empty() {
            return dropped as u64;
        }
        let n = batch.len();
        pending.fetch_add(n, Ordering::SeqCst);
        match self.requests.tx.try_send(batch) {
            Ok(()) => dropped as u64,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                pending.fetch_sub(n, Ordering::SeqCst);
                (dropped + n) as u64
            }
        }
    }

    /// Records handed to the writer and not yet stored.
    pub(crate) fn requests_pending(&self) -> usize {
        self.requests.pending.load(Ordering::SeqCst)
    }

    /// Changes to the id of the last stored request record.
    pub fn request_watch(&self) -> watch::Receiver<i64> {
        self.requests.last.clone()
    }

    /// Stored request records of `service`, oldest first.
    pub fn requests(&self, service: &str, q: &LogQuery) -> Result<Vec<RequestRecord>, StoreError> {
        let err = |source| StoreError {
            path: self.path.with_file_name("requests.db"),
            source,
        };
        let conn = self.requests.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, service, at, method, path, status, duration_us, bytes_in, \
                 bytes_out, instance, wake, request_id, error FROM \
                 (SELECT * FROM requests WHERE service = ?1 AND id > ?2 AND at >= ?3 \
                  ORDER BY id DESC LIMIT ?4) ORDER BY id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(
                params![service, q.after(), q.since_ms(), q.limit_or_all()],
                |r| {
                    Ok(RequestRecord {
                        id: r.get(0)?,
                        service: r.get(1)?,
                        at: time(r.get(2)?),
                        method: r.get(3)?,
                        path: r.get(4)?,
                        status: r.get(5)?,
                        duration: Duration::from_micros(r.get::<_, i64>(6)?.max(0) as u64),
                        bytes_in: r.get::<_, i64>(7)?.max(0) as u64,
                        bytes_out: r.get::<_, Option<i64>>(8)?.map(|b| b.max(0) as u64),
                        instance: r.get(9)?,
                        wake: r.get(10)?,
                        request_id: r.get(11)?,
                        error: r.get(12)?,
                    })
                },
            )
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

/// The writer thread: records in transactions of at most
/// `PER_TRANSACTION`; old records pruned now and then; removals in
/// their turn. Ends when the store is gone.
fn write_requests(
    mut conn: Connection,
    rx: Receiver<Write>,
    last: watch::Sender<i64>,
    mut last_id: i64,
    pending: &AtomicUsize,
    removals: &Mutex<Vec<(String, SystemTime)>>,
) {
    let mut since_prune = 0usize;
    let mut touched = std::collections::HashSet::new();
    // Services removed lately, and when: records made before then that
    // come later are dropped (kept an hour).
    let mut removed: Vec<(String, SystemTime)> = Vec::new();
    loop {
        let write = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(w) => Some(w),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now: Vec<_> = std::mem::take(&mut *removals.lock().unwrap_or_else(|p| p.into_inner()));
        for (service, at) in now {
            touched.remove(&service);
            let deleted = conn.execute(
                "DELETE FROM requests WHERE service = ?1 AND at <= ?2",
                params![service, ms(at)],
            );
            if let Err(e) = deleted {
                tracing::warn!("deleting the request records of {service}: {e}");
            }
            removed.push((service, at));
            pending.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(hour_ago) = SystemTime::now().checked_sub(Duration::from_secs(3600)) {
            removed.retain(|(_, at)| *at > hour_ago);
        }
        let Some(mut batch) = write else { continue };
        let n = batch.len();
        batch.retain(|r| !removed.iter().any(|(s, at)| *s == r.service && r.at <= *at));
        pending.fetch_sub(n - batch.len(), Ordering::SeqCst);
        since_prune += batch.len();
        for r in &batch {
            if !touched.contains(&r.service) {
                touched.insert(r.service.clone());
            }
        }
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let chunk: Vec<RequestRecord> = batch.by_ref().take(PER_TRANSACTION).collect();
            let n = chunk.len();
            let stored = insert(&mut conn, chunk, last_id + 1);
            // The ids are used either way: a rolled-back chunk's are never
            // given again.
            last_id += n as i64;
            match stored {
                Ok(()) => {
                    last.send_replace(last_id);
                }
                Err(e) => tracing::warn!("storing {n} request records: {e}"),
            }
            pending.fetch_sub(n, Ordering::SeqCst);
        }
        if since_prune >= 8192 {
            since_prune = 0;
            for service in touched.drain() {
                let pruned = conn.execute(
                    "DELETE FROM requests WHERE service = ?1 AND id <= \
                     (SELECT id FROM requests WHERE service = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    params![service, REQUEST_RETENTION],
                );
                if let Err(e) = pruned {
                    tracing::warn!("pruning old request records of {service}: {e}");
                }
            }
        }
    }
}

/// Stores `batch` in one transaction, with ids from `first` on, in
/// statements of `PER_STATEMENT` records (fewer statements to run).
fn insert(conn: &mut Connection, batch: Vec<RequestRecord>, first: i64) -> rusqlite::Result<()> {
    use rusqlite::types::Value::{Integer, Null, Text};
    let int = |n: u64| Integer(i64::try_from(n).unwrap_or(i64::MAX));
    let text = |t: Option<String>| t.map_or(Null, Text);
    let tx = conn.transaction()?;
    {
        let mut id = first;
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(PER_STATEMENT * 13);
            for r in batch.by_ref().take(PER_STATEMENT) {
                values.extend([
                    Text(r.service),
                    Integer(id),
                    Integer(ms(r.at)),
                    Text(r.method),
                    Text(r.path),
                    Integer(i64::from(r.status)),
                    int(u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX)),
                    int(r.bytes_in),
                    r.bytes_out.map_or(Null, int),
                    text(r.instance),
                    text(r.wake),
                    Text(r.request_id),
                    text(r.error),
                ]);
                id += 1;
            }
            let rows =
                vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; values.len() / 13].join(", ");
            let mut stmt =
                tx.prepare_cached(&format!("INSERT INTO requests({COLUMNS}) VALUES {rows}"))?;
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
    }
    tx.commit()
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("last", &*self.last.borrow())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, path: &str, status: u16) -> RequestRecord {
        RequestRecord {
            id: 0,
            service: service.into(),
            at: SystemTime::now(),
            method: "GET".into(),
            path: path.into(),
            status,
            duration: Duration::from_micros(1500),
            bytes_in: 0,
            bytes_out: Some(12),
            instance: Some("web-1-1".into()),
            wake: Some("cold".into()),
            request_id: "abc".into(),
            error: None,
        }
    }

    #[tokio::test]
    async fn records_are_stored_in_order_per_service_and_go_with_it() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let mut watch = store.request_watch();
        let batch = vec![record("web", "/a", 200), record("api", "/x", 500)];
        assert_eq!(store.add_requests(batch), 0);
        assert_eq!(store.add_requests(vec![record("web", "/b?q=1", 404)]), 0);
        tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|id| *id >= 3))
            .await
            .expect("stored within 5 s")
            .unwrap();
        let web = store.requests("web", &LogQuery::default()).unwrap();
        let got: Vec<_> = web.iter().map(|r| (r.path.as_str(), r.status)).collect();
        assert_eq!(got, [("/a", 200), ("/b?q=1", 404)]);
        assert_eq!(web[0].duration, Duration::from_micros(1500));
        assert_eq!(web[0].wake.as_deref(), Some("cold"));
        assert_eq!(web[0].bytes_out, Some(12));
        // The last one, and those after an id.
        let last = LogQuery {
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(store.requests("web", &last).unwrap()[0].path, "/b?q=1");
        let after = LogQuery {
            after: Some(web[0].id),
            ..Default::default()
        };
        assert_eq!(store.requests("web", &after).unwrap().len(), 1);

        store.remove_service("web").unwrap();
        store.flush(Duration::from_secs(5)).await;
        assert!(store
            .requests("web", &LogQuery::default())
            .unwrap()
            .is_empty());
        assert_eq!(
            store.requests("api", &LogQuery::default()).unwrap().len(),
            1
        );
        // Records handed over before the removal go with it; a later
        // service of the name keeps its own.
        assert_eq!(store.add_requests(vec![record("api", "/late", 200)]), 0);
        store.remove_service("api").unwrap();
        assert_eq!(store.add_requests(vec![record("api", "/new", 200)]), 0);
        store.flush(Duration::from_secs(5)).await;
        let api = store.requests("api", &LogQuery::default()).unwrap();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].path, "/new");
        assert_eq!(store.requests_pending(), 0);
        // In a file of its own, kept across a reopening.
        drop(store);
        let store = Store::open(state.path()).unwrap();
        assert_eq!(
            store.requests("api", &LogQuery::default()).unwrap().len(),
            1
        );
        assert!(state.path().join("requests.db").is_file());
    }
}
