//! What every part of the running platform reaches for: the sandbox, the
//! records, the event stream, the instances' upstreams, and where things
//! live under the state directory. Services and deploys hold it; it knows
//! no service (the table of services is `table.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use skiff_core::EventKind;
use skiff_gateway::Upstream;
use skiff_sandbox::Sandbox;
use skiff_store::{LogSource, Store};
use tokio::sync::broadcast;
use tracing::warn;

use crate::events::Event;
use crate::instance::{self, StartError};

/// The build's `/etc/resolv.conf`, under the state directory.
const BUILD_RESOLV_CONF_FILE: &str = "build-resolv.conf";

pub(crate) struct Context {
    pub(crate) state_dir: PathBuf,
    pub(crate) sandbox: Sandbox,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) store: Arc<Store>,
    /// The instances the gateway may connect to, by upstream key.
    upstreams: RwLock<HashMap<String, Upstream>>,
    next_instance: AtomicU64,
    pub(crate) gateway_addr: SocketAddr,
    pub(crate) domain: String,
    /// The platform's runtime: instance tasks are spawned here, also when
    /// the decision to start one is taken on a gateway thread.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Spares built at once, at most one per core: hundreds of services
    /// going idle together (after a restart, their idle stops line up)
    /// must not take the CPU from the starts that serve requests.
    pub(crate) spare_builds: tokio::sync::Semaphore,
    /// What `GET /metrics` shows.
    pub(crate) metrics: crate::metrics::Metrics,
}

impl Context {
    pub(crate) fn new(
        state_dir: PathBuf,
        sandbox: Sandbox,
        store: Arc<Store>,
        gateway_addr: SocketAddr,
        domain: String,
    ) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            state_dir,
            sandbox,
            events,
            store,
            upstreams: RwLock::default(),
            next_instance: AtomicU64::new(1),
            gateway_addr,
            domain,
            runtime: tokio::runtime::Handle::current(),
            spare_builds: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// A new instance id, unique on this host (see `instance_id`).
    pub(crate) fn instance_id(&self, service: &str) -> String {
        instance_id(service, self.next_instance.fetch_add(1, Ordering::SeqCst))
    }

    /// Where sandboxes mount their root inside their own mount namespace.
    pub(crate) fn mount_point(&self) -> PathBuf {
        self.state_dir.join("mnt")
    }

    /// The `/etc/resolv.conf` builds get (their own network's resolver).
    pub(crate) fn build_resolv_conf(&self) -> PathBuf {
        self.state_dir.join(BUILD_RESOLV_CONF_FILE)
    }

    /// Where the layers of a version's warm root are named while it is
    /// stacked (`skiff_sandbox::WarmRoot`); empty the rest of the time.
    pub(crate) fn warm_staging(&self, service: &str, version: i64) -> PathBuf {
        self.state_dir
            .join("warm")
            .join(format!("{service}-{version}"))
    }

    /// Where a persistent service keeps its writable layers.
    pub(crate) fn writable_dir(&self, service: &str) -> PathBuf {
        self.state_dir.join("writable").join(service)
    }

    /// Where a service's build cache is (`crate::images::build_cache`).
    pub(crate) fn build_cache_dir(&self, service: &str) -> PathBuf {
        self.state_dir.join("build-cache").join(service)
    }

    /// Where a service's account files are, per version (`crate::users`).
    pub(crate) fn users_dir(&self, service: &str) -> PathBuf {
        self.state_dir.join("users").join(service)
    }

    pub(crate) fn register_upstream(&self, upstream: &Upstream) {
        write(&self.upstreams).insert(upstream.key.to_string(), upstream.clone());
    }

    pub(crate) fn forget_upstream(&self, key: &str) {
        write(&self.upstreams).remove(key);
    }

    pub(crate) fn upstream(&self, key: &str) -> Option<Upstream> {
        read(&self.upstreams).get(key).cloned()
    }

    /// The URL a service is reached at.
    pub(crate) fn url(&self, service: &str) -> String {
        let addr = self.gateway_addr;
        let port = if addr.port() == 80 {
            String::new()
        } else {
            format!(":{}", addr.port())
        };
        format!("http://{service}.{}{port}/", self.domain)
    }

    /// Records what the diagnosis needs of a failed start: the addresses a
    /// service listened on instead of its port, an out-of-memory kill.
    pub(crate) fn record_start_failure(&self, service: &str, e: &StartError) {
        match e {
            StartError::PortNotListening {
                port, listeners, ..
            } => {
                let list: Vec<String> = listeners.iter().map(|a| a.to_string()).collect();
                let message = if list.is_empty() {
                    format!("listening on no TCP port, expected 0.0.0.0:{port}")
                } else {
                    format!("listening on {}, expected 0.0.0.0:{port}", list.join(", "))
                };
                self.record(service, EventKind::PortNotListening, &message);
            }
            StartError::NoHttpAnswer { port, .. } => self.record(
                service,
                EventKind::NoHttpAnswer,
                &format!("port {port} accepted connections but gave no HTTP answer"),
            ),
            StartError::EarlyExit {
                oom_limit: Some(limit),
                ..
            } => self.record(
                service,
                EventKind::OomKill,
                &format!(
                    "The start command was killed: {}",
                    instance::oom_message(*limit)
                ),
            ),
            _ => {}
        }
    }

    /// Records an event of `service` (and a platform line in its log).
    pub(crate) fn record(&self, service: &str, kind: EventKind, message: &str) {
        record(&self.store, service, kind, message);
    }
}

/// Records an event of `service` in `store`, and a platform line in its log.
pub(crate) fn record(store: &Store, service: &str, kind: EventKind, message: &str) {
    if let Err(e) = store.add_event(service, &kind, message) {
        warn!("recording an event of {service}: {e}");
    }
    store.log_sender(service, None).send(
        LogSource::Platform,
        None,
        None,
        message,
        SystemTime::now(),
    );
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The platform's tables stay usable after a panic elsewhere poisoned a
/// lock: every writer leaves them consistent between statements.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Instance ids carry the platform's pid (`NAME-PID-N`), so that cgroups
/// left by a killed platform can be told from those of a live one.
fn instance_id(service: &str, n: u64) -> String {
    format!("{service}-{}-{n}", std::process::id())
}

/// Whether the platform that made instance `id` no longer runs.
pub(crate) fn owner_is_gone(id: &str) -> bool {
    let mut parts = id.rsplitn(3, '-');
    let (Some(_n), Some(pid), Some(_service)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    match pid.parse::<u32>() {
        Ok(pid) => pid != std::process::id() && !process_runs(pid),
        Err(_) => false,
    }
}

/// Whether `pid` is a process that runs: a zombie (killed, not yet reaped
/// by its parent) no longer does.
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("state_dir", &self.state_dir)
            .field("gateway_addr", &self.gateway_addr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn instance_ids_name_their_platform() {
        let id = instance_id("my-svc", 3);
        assert_eq!(id, format!("my-svc-{}-3", std::process::id()));
        assert!(!owner_is_gone(&id), "our own instances are never stale");
        // pid_max is at most 2^22, so this pid cannot run.
        assert!(owner_is_gone("my-svc-99999999-1"));
        assert!(!owner_is_gone("not-an-id"));
        assert!(!owner_is_gone("x"));
    }

    #[test]
    fn a_zombie_platform_is_gone() {
        // A child that exited and is not reaped yet is a zombie.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while process_runs(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!process_runs(pid), "a zombie does not run");
        assert!(owner_is_gone(&format!("svc-{pid}-1")));
        child.wait().unwrap();
        assert!(process_runs(std::process::id()));
    }
}
