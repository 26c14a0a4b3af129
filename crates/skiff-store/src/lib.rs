//! The platform's records: services, their versions, build and run logs,
//! and events, in SQLite (WAL) at `<state>/skiff.db`. Images stay files in
//! the image store; everything else the platform knows is here, so a
//! restarted platform finds what it served before.
//!
//! Metadata calls are short statements on one connection behind a mutex.
//! Log lines arrive far more often: they go through a bounded channel to a
//! writer thread with its own connection that commits them in batches and
//! announces the last committed id, which `skiff logs -f` waits on.

mod requests;

pub use requests::{RequestRecord, REQUEST_RETENTION};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use skiff_core::{EventKind, Level};
use skiff_model::ServiceSpec;
use tokio::sync::watch;

/// Log lines kept per service; older ones are deleted as new ones come.
const LOG_RETENTION: i64 = 50_000;
/// Events kept per service.
const EVENT_RETENTION: i64 = 2_000;
/// Log lines waiting for the writer; beyond this, lines are dropped (and
/// the drop is recorded) rather than memory growing without bound.
const LOG_QUEUE: usize = 16_384;

/// The schema, as the migrations that made it: the database's
/// `user_version` is how many have run. One that has shipped is never
/// edited: a change is the next migration, so a user who upgrades skiff
/// keeps every service, version and log. (A database made before versions
/// were recorded has version 0 and the tables of the first migration,
/// whose `IF NOT EXISTS` makes running it again harmless.)
const MIGRATIONS: &[&str] = &[
    // 1: services, versions, logs, events, starts.
    "
CREATE TABLE IF NOT EXISTS services (
    name       TEXT PRIMARY KEY,
    current    INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    service     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    layers      TEXT,
    state       TEXT NOT NULL,
    error       TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    build_ms    INTEGER,
    sandbox_ms  INTEGER,
    app_ms      INTEGER
);
CREATE INDEX IF NOT EXISTS versions_service ON versions(service, id);
CREATE TABLE IF NOT EXISTS logs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    service  TEXT NOT NULL,
    version  INTEGER,
    at       INTEGER NOT NULL,
    source   TEXT NOT NULL,
    stream   TEXT,
    instance TEXT,
    line     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_service ON logs(service, id);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    at      INTEGER NOT NULL,
    level   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_service ON events(service, id);
CREATE TABLE IF NOT EXISTS starts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    service         TEXT NOT NULL,
    version         INTEGER,
    instance        TEXT NOT NULL,
    at              INTEGER NOT NULL,
    sandbox_ready   INTEGER NOT NULL,
    process_started INTEGER NOT NULL,
    port_listening  INTEGER NOT NULL,
    first_answer    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS starts_service ON starts(service, id);
",
    // 2: each service's own host user.
    "
-- Each service's host user: SERVICE_UID_BASE + n. AUTOINCREMENT never
-- gives an n twice, even after the row is deleted, so no uid is reused.
CREATE TABLE IF NOT EXISTS service_users (
    n       INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL UNIQUE
);
",
    // 3: the request log moved to a database of its own (requests.db);
    // a database that had it here during development loses the table.
    "
DROP INDEX IF EXISTS requests_service;
DROP TABLE IF EXISTS requests;
",
];

/// The first host uid (and gid) given to a service. Services get uids from
/// here up, each its own, never one another service had: in the range
/// systemd leaves to container managers (524288-1879048191), far above
/// the users and subordinate ranges of a host.
pub const SERVICE_UID_BASE: u32 = 1_800_000_000;
/// One past the last uid a service may get.
const SERVICE_UID_END: u32 = 1_879_048_192;

/// Starts kept per service.
const START_RETENTION: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let newer = match &self.source {
            rusqlite::Error::ToSqlConversionFailure(e) => e.downcast_ref::<NewerSchema>(),
            _ => None,
        };
        match newer {
            Some(newer) => write!(
                f,
                "the platform's database {}: {newer}",
                self.path.display()
            ),
            None => write!(
                f,
                "the platform's database {}: {}; if the file is damaged, move it away and \
                 start again (deployed services are then forgotten and must be deployed anew)",
                self.path.display(),
                self.source
            ),
        }
    }
}

/// A database made by a newer skiff, whose schema this one does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "it was made by a newer skiff (schema version {found}; this skiff knows up to \
     {known}): run that skiff, or a newer one, on this state directory"
)]
struct NewerSchema {
    found: i64,
    known: usize,
}

/// Brings the database's schema up to date (see [`MIGRATIONS`]).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    run_migrations(conn, MIGRATIONS)
}

/// Runs the `migrations` a database has not run yet (its `user_version`
/// says how many it has).
fn run_migrations(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > migrations.len() as i64 {
        return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
            NewerSchema {
                found: version,
                known: migrations.len(),
            },
        )));
    }
    let tx = conn.transaction()?;
    for migration in &migrations[version.max(0) as usize..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", migrations.len() as i64)?;
    tx.commit()
}

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Building,
    Starting,
    /// Serving (the service's current version).
    Ready,
    Failed,
    /// Served, then a newer version took over.
    Replaced,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Building => "building",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Replaced => "replaced",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "building" => Self::Building,
            "starting" => Self::Starting,
            "ready" => Self::Ready,
            "replaced" => Self::Replaced,
            _ => Self::Failed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRecord {
    pub name: String,
    /// The version that serves, if one ever did.
    pub current: Option<i64>,
    pub created_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub id: i64,
    pub service: String,
    pub spec: ServiceSpec,
    /// The image's layers, top first, once built.
    pub layers: Option<Vec<PathBuf>>,
    pub state: VersionState,
    pub error: Option<String>,
    pub created_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// How long the build took (`None`: reused or no build command).
    pub build: Option<Duration>,
    /// The first start's phases.
    pub sandbox: Option<Duration>,
    pub app: Option<Duration>,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    Build,
    Run,
    /// The platform's own notes about the service.
    Platform,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Build => "build",
            Self::Run => "run",
            Self::Platform => "platform",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "build" => Self::Build,
            "run" => Self::Run,
            _ => Self::Platform,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Increasing; 0 for a line not yet stored.
    pub id: i64,
    pub service: String,
    pub version: Option<i64>,
    pub at: SystemTime,
    pub source: LogSource,
    /// `stdout` or `stderr`.
    pub stream: Option<String>,
    pub instance: Option<String>,
    pub line: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: i64,
    pub service: String,
    pub at: SystemTime,
    pub level: Level,
    pub kind: EventKind,
    pub message: String,
}

/// One instance start, phase by phase (microseconds from the request).
#[derive(Debug, Clone, PartialEq)]
pub struct StartRecord {
    pub service: String,
    pub version: Option<i64>,
    pub instance: String,
    pub at: SystemTime,
    pub phases: skiff_core::Phases,
}

/// Which log lines to read.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Only lines with a larger id.
    pub after: Option<i64>,
    pub since: Option<SystemTime>,
    /// The last `limit` lines that match (oldest first).
    pub limit: Option<u32>,
}

impl LogQuery {
    /// The query's bounds as its SQL takes them (`id > ?`, `at >= ?`,
    /// `LIMIT ?`; -1: no limit).
    fn after(&self) -> i64 {
        self.after.unwrap_or(0)
    }

    fn since_ms(&self) -> i64 {
        self.since.map(ms).unwrap_or(0)
    }

    fn limit_or_all(&self) -> i64 {
        self.limit.map_or(-1, i64::from)
    }
}

pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    logs: SyncSender<LogRecord>,
    last_log: watch::Receiver<i64>,
    /// Log lines handed to the writer, and those it has dealt with.
    queued: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    requests: requests::RequestLog,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn dur(ms: Option<i64>) -> Option<Duration> {
    ms.map(|m| Duration::from_millis(m.max(0) as u64))
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Store {
    /// Opens (or creates) `<state_dir>/skiff.db` and starts the log writer.
    pub fn open(state_dir: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_with(state_dir, || {})
    }

    /// `open`, with `setup` run first on the request log's writer thread
    /// (the platform sets its scheduling there).
    pub fn open_with(state_dir: &Path, setup: fn()) -> Result<Arc<Self>, StoreError> {
        let path = state_dir.join("skiff.db");
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(err)?;
        migrate(&mut conn).map_err(err)?;
        let last: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM logs", [], |r| r.get(0))
            .map_err(err)?;
        let requests = requests::RequestLog::open(state_dir, setup)?;
        let writer = open_connection(&path).map_err(err)?;
        let (tx, rx) = mpsc::sync_channel(LOG_QUEUE);
        let (last_tx, last_log) = watch::channel(last);
        let written = Arc::new(AtomicU64::new(0));
        let done = written.clone();
        std::thread::Builder::new()
            .name("skiff-log-writer".into())
            .spawn(move || write_logs(writer, rx, last_tx, done))
            .map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Arc::new(Self {
            path,
            conn: Mutex::new(conn),
            logs: tx,
            last_log,
            queued: Arc::new(AtomicU64::new(0)),
            written,
            requests,
        }))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a new version of `spec.name` (creating the service) in
    /// state `building`; returns its id.
    pub fn begin_version(&self, spec: &ServiceSpec) -> Result<i64, StoreError> {
        let spec_json = serde_json::to_string(spec)
            .map_err(|e| self.err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let now = ms(SystemTime::now());
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR IGNORE INTO services(name, current, created_at) VALUES (?1, NULL, ?2)",
            params![spec.name.as_str(), now],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO versions(service, spec, state, created_at) VALUES (?1, ?2, 'building', ?3)",
            params![spec.name.as_str(), spec_json, now],
        )
        .map_err(|e| self.err(e))?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(|e| self.err(e))?;
        Ok(id)
    }

    pub fn set_layers(
        &self,
        version: i64,
        layers: &[PathBuf],
        build: Option<Duration>,
    ) -> Result<(), StoreError> {
        let layers: Vec<String> = layers
            .iter()
            .map(|l| l.to_string_lossy().into_owned())
            .collect();
        let json = serde_json::to_string(&layers).unwrap_or_else(|_| "[]".into());
        self.conn()
            .execute(
                "UPDATE versions SET layers = ?2, build_ms = ?3, state = 'starting' WHERE id = ?1",
                params![version, json, build.map(|d| d.as_millis() as i64)],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The version failed (build, start or health check): it never served.
    pub fn fail_version(&self, version: i64, error: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE versions SET state = 'failed', error = ?2, finished_at = ?3 WHERE id = ?1",
                params![version, error, ms(SystemTime::now())],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// `version` serves now; the one before it is replaced.
    pub fn promote(
        &self,
        service: &str,
        version: i64,
        sandbox: Duration,
        app: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE versions SET state = 'replaced' WHERE service = ?1 AND state = 'ready' AND id != ?2",
            params![service, version],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE versions SET state = 'ready', finished_at = ?2, sandbox_ms = ?3, app_ms = ?4 WHERE id = ?1",
            params![
                version,
                ms(SystemTime::now()),
                sandbox.as_millis() as i64,
                app.as_millis() as i64
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE services SET current = ?2 WHERE name = ?1",
            params![service, version],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Versions left `building` or `starting` by a platform that stopped
    /// mid-deploy never finished: they failed.
    pub fn fail_unfinished(&self, reason: &str) -> Result<usize, StoreError> {
        self.conn()
            .execute(
                "UPDATE versions SET state = 'failed', error = ?1, finished_at = ?2 \
                 WHERE state IN ('building', 'starting')",
                params![reason, ms(SystemTime::now())],
            )
            .map_err(|e| self.err(e))
    }

    pub fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, current, created_at FROM services ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], service_row).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn service(&self, name: &str) -> Result<Option<ServiceRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT name, current, created_at FROM services WHERE name = ?1",
                [name],
                service_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn version(&self, id: i64) -> Result<Option<VersionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("{VERSION_COLUMNS} WHERE id = ?1"))
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query_map([id], version_row).map_err(|e| self.err(e))?;
        rows.next().transpose().map_err(|e| self.err(e))
    }

    /// The service's newest versions, newest first.
    pub fn versions(&self, service: &str, limit: u32) -> Result<Vec<VersionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "{VERSION_COLUMNS} WHERE service = ?1 ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![service, limit], version_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Forgets the service: its versions, logs, events and requests.
    pub fn remove_service(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let n = tx
            .execute("DELETE FROM services WHERE name = ?1", [name])
            .map_err(|e| self.err(e))?;
        for table in ["versions", "logs", "events", "starts", "service_users"] {
            tx.execute(&format!("DELETE FROM {table} WHERE service = ?1"), [name])
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.requests.forget(name);
        Ok(n > 0)
    }

    /// The host uid (and gid) `service` runs as, given on first use.
    pub fn service_uid(&self, service: &str) -> Result<u32, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO service_users(service) VALUES (?1)",
            [service],
        )
        .map_err(|e| self.err(e))?;
        let n: i64 = conn
            .query_row(
                "SELECT n FROM service_users WHERE service = ?1",
                [service],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        u32::try_from(n)
            .ok()
            .and_then(|n| SERVICE_UID_BASE.checked_add(n))
            .filter(|uid| *uid < SERVICE_UID_END)
            .ok_or_else(|| self.err(rusqlite::Error::IntegralValueOutOfRange(0, n)))
    }

    /// Records an event of `service`, under its kind's stable name and
    /// level.
    pub fn add_event(
        &self,
        service: &str,
        kind: &EventKind,
        message: &str,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events(service, at, level, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                service,
                ms(SystemTime::now()),
                kind.level().as_str(),
                kind.as_str(),
                message
            ],
        )
        .map_err(|e| self.err(e))?;
        conn.execute(
            "DELETE FROM events WHERE service = ?1 AND id <= \
             (SELECT id FROM events WHERE service = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![service, EVENT_RETENTION],
        )
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// Records one instance start.
    pub fn add_start(&self, start: &StartRecord) -> Result<(), StoreError> {
        let us = |d: Duration| d.as_micros() as i64;
        let p = &start.phases;
        let conn = self.conn();
        conn.execute(
            "INSERT INTO starts(service, version, instance, at, sandbox_ready, process_started, \
             port_listening, first_answer) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                start.service,
                start.version,
                start.instance,
                ms(start.at),
                us(p.sandbox_ready),
                us(p.process_started),
                us(p.port_listening),
                us(p.first_answer)
            ],
        )
        .map_err(|e| self.err(e))?;
        conn.execute(
            "DELETE FROM starts WHERE service = ?1 AND id <= \
             (SELECT id FROM starts WHERE service = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![start.service, START_RETENTION],
        )
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// The service's newest starts, newest first.
    pub fn starts(&self, service: &str, limit: u32) -> Result<Vec<StartRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT service, version, instance, at, sandbox_ready, process_started, \
                 port_listening, first_answer FROM starts WHERE service = ?1 \
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        let rows = stmt
            .query_map(params![service, limit], |r| {
                Ok(StartRecord {
                    service: r.get(0)?,
                    version: r.get(1)?,
                    instance: r.get(2)?,
                    at: time(r.get(3)?),
                    phases: skiff_core::Phases {
                        sandbox_ready: us(r.get(4)?),
                        process_started: us(r.get(5)?),
                        port_listening: us(r.get(6)?),
                        first_answer: us(r.get(7)?),
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The service's newest events, oldest first.
    pub fn events(&self, service: &str, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, service, at, level, kind, message FROM \
                 (SELECT * FROM events WHERE service = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![service, limit], |r| {
                Ok(EventRecord {
                    id: r.get(0)?,
                    service: r.get(1)?,
                    at: time(r.get(2)?),
                    level: match r.get_ref(3)?.as_str()? {
                        "error" => Level::Error,
                        _ => Level::Info,
                    },
                    kind: EventKind::parse(r.get_ref(4)?.as_str()?),
                    message: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Waits (at most `limit`) until every log line and request record
    /// sent so far is stored.
    pub async fn flush(&self, limit: Duration) {
        let target = self.queued.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while (self.written.load(Ordering::SeqCst) < target || self.requests_pending() > 0)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A handle that records `service`'s log lines.
    pub fn log_sender(&self, service: &str, version: Option<i64>) -> LogSender {
        LogSender {
            queued: self.queued.clone(),
            tx: self.logs.clone(),
            service: service.to_string(),
            version,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Changes to the id of the last stored log line.
    pub fn log_watch(&self) -> watch::Receiver<i64> {
        self.last_log.clone()
    }

    /// Stored log lines of `service`, oldest first.
    pub fn logs(&self, service: &str, q: &LogQuery) -> Result<Vec<LogRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, service, version, at, source, stream, instance, line FROM \
                 (SELECT * FROM logs WHERE service = ?1 AND id > ?2 AND at >= ?3 \
                  ORDER BY id DESC LIMIT ?4) ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![service, q.after(), q.since_ms(), q.limit_or_all()],
                |r| {
                    Ok(LogRecord {
                        id: r.get(0)?,
                        service: r.get(1)?,
                        version: r.get(2)?,
                        at: time(r.get(3)?),
                        source: LogSource::parse(&r.get::<_, String>(4)?),
                        stream: r.get(5)?,
                        instance: r.get(6)?,
                        line: r.get(7)?,
                    })
                },
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

fn service_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServiceRecord> {
    Ok(ServiceRecord {
        name: r.get(0)?,
        current: r.get(1)?,
        created_at: time(r.get(2)?),
    })
}

const VERSION_COLUMNS: &str = "SELECT id, service, spec, layers, state, error, created_at, \
     finished_at, build_ms, sandbox_ms, app_ms FROM versions";

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
    let bad = |i, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let spec: String = r.get(2)?;
    let layers: Option<String> = r.get(3)?;
    Ok(VersionRecord {
        id: r.get(0)?,
        service: r.get(1)?,
        spec: serde_json::from_str(&spec).map_err(|e| bad(2, e))?,
        layers: layers
            .map(|l| serde_json::from_str::<Vec<PathBuf>>(&l))
            .transpose()
            .map_err(|e| bad(3, e))?,
        state: VersionState::parse(&r.get::<_, String>(4)?),
        error: r.get(5)?,
        created_at: time(r.get(6)?),
        finished_at: r.get::<_, Option<i64>>(7)?.map(time),
        build: dur(r.get(8)?),
        sandbox: dur(r.get(9)?),
        app: dur(r.get(10)?),
    })
}

/// Records one service's log lines (cheap to clone; never blocks).
#[derive(Clone)]
pub struct LogSender {
    queued: Arc<AtomicU64>,
    tx: SyncSender<LogRecord>,
    service: String,
    version: Option<i64>,
    dropped: Arc<AtomicU64>,
}

impl LogSender {
    pub fn send(
        &self,
        source: LogSource,
        stream: Option<&str>,
        instance: Option<&str>,
        line: &str,
        at: SystemTime,
    ) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = self.record(
                LogSource::Platform,
                None,
                None,
                &format!("{dropped} log lines were dropped: the service wrote faster than they could be stored"),
                at,
            );
            match self.tx.try_send(note) {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    self.dropped.fetch_add(dropped, Ordering::Relaxed);
                }
            }
        }
        let record = self.record(source, stream, instance, line, at);
        match self.tx.try_send(record) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::SeqCst);
            }
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn record(
        &self,
        source: LogSource,
        stream: Option<&str>,
        instance: Option<&str>,
        line: &str,
        at: SystemTime,
    ) -> LogRecord {
        LogRecord {
            id: 0,
            service: self.service.clone(),
            version: self.version,
            at,
            source,
            stream: stream.map(str::to_string),
            instance: instance.map(str::to_string),
            line: line.to_string(),
        }
    }
}

/// The log writer thread: batches of lines in one transaction each; old
/// lines pruned now and then. Ends when every sender is gone.
fn write_logs(
    mut conn: Connection,
    rx: Receiver<LogRecord>,
    last: watch::Sender<i64>,
    written: Arc<AtomicU64>,
) {
    let mut since_prune = 0u32;
    let mut touched = std::collections::HashSet::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 2048 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = (|| -> rusqlite::Result<i64> {
            let tx = conn.transaction()?;
            let mut last_id = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO logs(service, version, at, source, stream, instance, line) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for r in &batch {
                    stmt.execute(params![
                        r.service,
                        r.version,
                        ms(r.at),
                        r.source.as_str(),
                        r.stream,
                        r.instance,
                        r.line
                    ])?;
                    last_id = tx.last_insert_rowid();
                }
            }
            tx.commit()?;
            Ok(last_id)
        })();
        match result {
            Ok(id) => {
                last.send_replace(id);
            }
            Err(e) => tracing::warn!("storing {} log lines: {e}", batch.len()),
        }
        written.fetch_add(batch.len() as u64, Ordering::SeqCst);
        since_prune += batch.len() as u32;
        touched.extend(batch.into_iter().map(|r| r.service));
        if since_prune >= 4096 {
            since_prune = 0;
            for service in touched.drain() {
                let pruned = conn.execute(
                    "DELETE FROM logs WHERE service = ?1 AND id <= \
                     (SELECT id FROM logs WHERE service = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    params![service, LOG_RETENTION],
                );
                if let Err(e) = pruned {
                    tracing::warn!("pruning old log lines of {service}: {e}");
                }
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LogSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSender")
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ServiceSpec {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("skiff.toml"),
            format!("name = \"{name}\"\nstart = \"python3 app.py\"\n"),
        )
        .unwrap();
        skiff_model::load(dir.path(), &Default::default()).unwrap()
    }

    async fn wait_for_logs(store: &Store, id: i64) {
        let mut w = store.log_watch();
        tokio::time::timeout(Duration::from_secs(5), w.wait_for(|last| *last >= id))
            .await
            .expect("log lines stored within 5 s")
            .unwrap();
    }

    #[tokio::test]
    async fn versions_promote_and_survive_reopening() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let s = spec("web");
        let v1 = store.begin_version(&s).unwrap();
        store
            .set_layers(
                v1,
                &[PathBuf::from("/l/1")],
                Some(Duration::from_millis(1500)),
            )
            .unwrap();
        store
            .promote(
                "web",
                v1,
                Duration::from_millis(3),
                Duration::from_millis(40),
            )
            .unwrap();
        let v2 = store.begin_version(&s).unwrap();
        store.fail_version(v2, "build failed").unwrap();
        let v3 = store.begin_version(&s).unwrap();
        store
            .set_layers(v3, &[PathBuf::from("/l/3")], None)
            .unwrap();
        store
            .promote(
                "web",
                v3,
                Duration::from_millis(2),
                Duration::from_millis(30),
            )
            .unwrap();
        let v4 = store.begin_version(&s).unwrap();
        drop(store);

        let store = Store::open(state.path()).unwrap();
        assert_eq!(store.fail_unfinished("platform restarted").unwrap(), 1);
        let svc = store.service("web").unwrap().unwrap();
        assert_eq!(svc.current, Some(v3));
        let versions = store.versions("web", 10).unwrap();
        let states: Vec<_> = versions.iter().map(|v| (v.id, v.state)).collect();
        assert_eq!(
            states,
            vec![
                (v4, VersionState::Failed),
                (v3, VersionState::Ready),
                (v2, VersionState::Failed),
                (v1, VersionState::Replaced)
            ]
        );
        let current = store.version(v3).unwrap().unwrap();
        assert_eq!(current.spec, s, "the spec round-trips");
        assert_eq!(current.layers, Some(vec![PathBuf::from("/l/3")]));
        assert_eq!(current.app, Some(Duration::from_millis(30)));
        assert_eq!(
            store.version(v1).unwrap().unwrap().build,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            store.version(v2).unwrap().unwrap().error.as_deref(),
            Some("build failed")
        );
    }

    #[tokio::test]
    async fn logs_are_batched_queried_and_removed_with_the_service() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let s = spec("web");
        store.begin_version(&s).unwrap();
        let web = store.log_sender("web", Some(1));
        let other = store.log_sender("other", None);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..100 {
            let at = t0 + Duration::from_secs(i);
            web.send(
                LogSource::Run,
                Some("stdout"),
                Some("web-1"),
                &format!("line {i}"),
                at,
            );
            other.send(LogSource::Build, None, None, "x", at);
        }
        wait_for_logs(&store, 200).await;
        let all = store.logs("web", &LogQuery::default()).unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[0].line, "line 0");
        assert_eq!(all[99].instance.as_deref(), Some("web-1"));
        let tail = store
            .logs(
                "web",
                &LogQuery {
                    limit: Some(3),
                    ..Default::default()
                },
            )
            .unwrap();
        let lines: Vec<_> = tail.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["line 97", "line 98", "line 99"]);
        let since = store
            .logs(
                "web",
                &LogQuery {
                    since: Some(t0 + Duration::from_secs(98)),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(since.len(), 2);
        let after = store
            .logs(
                "web",
                &LogQuery {
                    after: Some(all[49].id),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(after.len(), 50);

        store
            .add_event("web", &EventKind::DeployFailed, "boom")
            .unwrap();
        let recorded = &store.events("web", 10).unwrap()[0];
        assert_eq!(recorded.message, "boom");
        assert_eq!(recorded.kind, EventKind::DeployFailed);
        assert_eq!(recorded.level, Level::Error);
        assert!(store.remove_service("web").unwrap());
        assert!(store.logs("web", &LogQuery::default()).unwrap().is_empty());
        assert!(store.events("web", 10).unwrap().is_empty());
        assert!(store.service("web").unwrap().is_none());
        assert_eq!(
            store.logs("other", &LogQuery::default()).unwrap().len(),
            100
        );
        assert!(!store.remove_service("web").unwrap());
    }

    #[test]
    fn each_service_has_its_own_uid_and_none_is_given_twice() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let a = store.service_uid("a").unwrap();
        let b = store.service_uid("b").unwrap();
        assert!(a >= SERVICE_UID_BASE && b >= SERVICE_UID_BASE);
        assert_ne!(a, b);
        assert_eq!(store.service_uid("a").unwrap(), a, "kept");
        // Removed and deployed again: a new uid, never the old one.
        store.remove_service("a").unwrap();
        let again = store.service_uid("a").unwrap();
        assert!(again != a && again != b, "{again} {a} {b}");
        // Kept across a restart.
        drop(store);
        let store = Store::open(state.path()).unwrap();
        assert_eq!(store.service_uid("b").unwrap(), b);
    }

    /// The schema as skiff made it before versions were recorded
    /// (`user_version` 0), frozen here: a test against `MIGRATIONS[0]`
    /// itself could not notice an edit of a migration that has shipped.
    const FIRST_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS services (
    name       TEXT PRIMARY KEY,
    current    INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    service     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    layers      TEXT,
    state       TEXT NOT NULL,
    error       TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    build_ms    INTEGER,
    sandbox_ms  INTEGER,
    app_ms      INTEGER
);
CREATE INDEX IF NOT EXISTS versions_service ON versions(service, id);
CREATE TABLE IF NOT EXISTS logs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    service  TEXT NOT NULL,
    version  INTEGER,
    at       INTEGER NOT NULL,
    source   TEXT NOT NULL,
    stream   TEXT,
    instance TEXT,
    line     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_service ON logs(service, id);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    at      INTEGER NOT NULL,
    level   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_service ON events(service, id);
CREATE TABLE IF NOT EXISTS starts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    service         TEXT NOT NULL,
    version         INTEGER,
    instance        TEXT NOT NULL,
    at              INTEGER NOT NULL,
    sandbox_ready   INTEGER NOT NULL,
    process_started INTEGER NOT NULL,
    port_listening  INTEGER NOT NULL,
    first_answer    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS starts_service ON starts(service, id);
";

    #[test]
    fn a_database_of_an_older_skiff_keeps_everything_and_is_brought_up_to_date() {
        let state = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(state.path().join("skiff.db")).unwrap();
            old.execute_batch(FIRST_SCHEMA).unwrap();
            let spec = serde_json::to_string(&spec("web")).unwrap();
            old.execute(
                "INSERT INTO services(name, current, created_at) VALUES ('web', 1, 0)",
                [],
            )
            .unwrap();
            old.execute(
                "INSERT INTO versions(id, service, spec, layers, state, created_at) \
                 VALUES (1, 'web', ?1, '[\"/l/1\"]', 'ready', 0)",
                [spec],
            )
            .unwrap();
            old.execute(
                "INSERT INTO logs(service, version, at, source, line) \
                 VALUES ('web', 1, 0, 'run', 'hello from before')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(state.path()).unwrap();
        let service = store.service("web").unwrap().expect("the service is kept");
        assert_eq!(service.current, Some(1));
        let version = store.version(1).unwrap().expect("the version is kept");
        assert_eq!(version.layers, Some(vec![PathBuf::from("/l/1")]));
        let logs = store.logs("web", &LogQuery::default()).unwrap();
        assert_eq!(logs[0].line, "hello from before");
        // What later migrations added works.
        assert!(store.service_uid("web").unwrap() >= SERVICE_UID_BASE);
        let v: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        // Opened again: nothing runs twice, nothing is lost.
        drop(store);
        let store = Store::open(state.path()).unwrap();
        assert!(store.service("web").unwrap().is_some());
    }

    #[test]
    fn a_database_of_a_newer_skiff_is_refused_with_what_to_do() {
        let state = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(state.path().join("skiff.db")).unwrap();
            db.pragma_update(None, "user_version", 99).unwrap();
        }
        let msg = Store::open(state.path()).expect_err("refused").to_string();
        assert!(
            msg.contains("made by a newer skiff (schema version 99"),
            "{msg}"
        );
        assert!(!msg.contains("move it away"), "{msg}");
    }

    #[test]
    fn a_damaged_database_is_reported_with_what_to_do() {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join("skiff.db"), vec![0x42u8; 8192]).unwrap();
        let e = Store::open(state.path()).expect_err("garbage is refused");
        let msg = e.to_string();
        assert!(
            msg.contains("skiff.db") && msg.contains("move it away"),
            "{msg}"
        );
    }
}
