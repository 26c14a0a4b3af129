//! The request log: one record per request the gateway routed to a
//! service, written by a thread of its own in batches, the newest
//! [`REQUEST_RETENTION`] kept per service.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection};
use tokio::sync::watch;

use crate::{ms, time, LogQuery, Store, StoreError};

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

/// The writer's side of the request log, held by the `Store`.
pub(crate) struct RequestLog {
    pub tx: SyncSender<Vec<RequestRecord>>,
    pub last: watch::Receiver<i64>,
    /// Records handed over and not yet stored.
    pub pending: Arc<AtomicUsize>,
}

impl RequestLog {
    pub fn start(conn: Connection, last_id: i64, setup: fn()) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(REQUEST_QUEUE);
        let (last_tx, last) = watch::channel(last_id);
        let pending = Arc::new(AtomicUsize::new(0));
        let written = pending.clone();
        std::thread::Builder::new()
            .name("skiff-request-log".into())
            .spawn(move || {
                setup();
                write_requests(conn, rx, last_tx, &written)
            })?;
        Ok(Self { tx, last, pending })
    }
}

impl Store {
    /// Hands records to the writer; never blocks. Returns how many were
    /// dropped: a batch the writer has no room for.
    pub fn add_requests(&self, batch: Vec<RequestRecord>) -> u64 {
        if batch.is_empty() {
            return 0;
        }
        let n = batch.len();
        let pending = &self.requests.pending;
        if pending.fetch_add(n, Ordering::SeqCst) + n > MAX_PENDING {
            pending.fetch_sub(n, Ordering::SeqCst);
            return n as u64;
        }
        match self.requests.tx.try_send(batch) {
            Ok(()) => 0,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                pending.fetch_sub(n, Ordering::SeqCst);
                n as u64
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
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, service, at, method, path, status, duration_us, bytes_in, \
                 bytes_out, instance, wake, request_id, error FROM \
                 (SELECT * FROM requests WHERE service = ?1 AND id > ?2 AND at >= ?3 \
                  ORDER BY id DESC LIMIT ?4) ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![
                    service,
                    q.after.unwrap_or(0),
                    q.since.map(ms).unwrap_or(0),
                    q.limit.map_or(-1, i64::from)
                ],
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
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

/// The writer thread: each batch in one transaction; old records pruned
/// now and then. Ends when the store is gone.
fn write_requests(
    mut conn: Connection,
    rx: Receiver<Vec<RequestRecord>>,
    last: watch::Sender<i64>,
    pending: &AtomicUsize,
) {
    let mut since_prune = 0usize;
    let mut touched = std::collections::HashSet::new();
    while let Ok(mut batch) = rx.recv() {
        // What else waits goes in the same transaction.
        while batch.len() < 16_384 {
            match rx.try_recv() {
                Ok(mut more) => batch.append(&mut more),
                Err(_) => break,
            }
        }
        match insert(&mut conn, &batch) {
            Ok(id) if id > 0 => {
                last.send_replace(id);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("storing {} request records: {e}", batch.len()),
        }
        pending.fetch_sub(batch.len(), Ordering::SeqCst);
        since_prune += batch.len();
        for r in batch {
            if !touched.contains(&r.service) {
                touched.insert(r.service);
            }
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

fn insert(conn: &mut Connection, batch: &[RequestRecord]) -> rusqlite::Result<i64> {
    let tx = conn.transaction()?;
    let mut last_id = 0;
    {
        // Only for a service still recorded: records that were on their
        // way when it was removed do not come back.
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests(service, at, method, path, status, duration_us, bytes_in, \
             bytes_out, instance, wake, request_id, error) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 \
             WHERE EXISTS (SELECT 1 FROM services WHERE name = ?1)",
        )?;
        for r in batch {
            let inserted = stmt.execute(params![
                r.service,
                ms(r.at),
                r.method,
                r.path,
                r.status,
                i64::try_from(r.duration.as_micros()).unwrap_or(i64::MAX),
                i64::try_from(r.bytes_in).unwrap_or(i64::MAX),
                r.bytes_out.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
                r.instance,
                r.wake,
                r.request_id,
                r.error,
            ])?;
            if inserted > 0 {
                last_id = tx.last_insert_rowid();
            }
        }
    }
    tx.commit()?;
    Ok(last_id)
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
        for name in ["web", "api"] {
            store
                .conn()
                .execute(
                    "INSERT INTO services(name, created_at) VALUES (?1, 0)",
                    [name],
                )
                .unwrap();
        }
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
        assert!(store
            .requests("web", &LogQuery::default())
            .unwrap()
            .is_empty());
        assert_eq!(
            store.requests("api", &LogQuery::default()).unwrap().len(),
            1
        );
        // Records on their way when it was removed do not bring it back.
        assert_eq!(store.add_requests(vec![record("web", "/late", 200)]), 0);
        store.flush(Duration::from_secs(5)).await;
        assert!(store
            .requests("web", &LogQuery::default())
            .unwrap()
            .is_empty());
        assert_eq!(store.requests_pending(), 0);
    }
}
