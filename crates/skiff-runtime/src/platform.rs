//! The platform: one gateway, the services deployed on it, their instances.
//! `skiff up` runs it in the foreground, `skiff serve` as a daemon; both
//! through this code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use skiff_core::{EventKind, StartReport};
use skiff_gateway::{Counts, GatewayConfig, GatewayError, GatewayThreads, Listeners};

use crate::metrics::InstanceUsage;
use skiff_model::ServiceSpec;
use skiff_sandbox::{Cgroups, Sandbox, CGROUP_ROOT};
use skiff_store::{Store, StoreError};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::context::{lock, owner_is_gone, Context};
use crate::events::Event;
use crate::history::{History, Sample, SAMPLE_EVERY};
use crate::images::build;
use crate::images::image::ImageStore;
use crate::requests;
use crate::service::ServiceRuntime;
use crate::table::{Entry, Table};

/// Where the platform keeps things and how it is reached.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// All platform state (logs, mount points); never visible to instances.
    pub state_dir: PathBuf,
    /// Cached images (the base image), shared between runs.
    pub cache_dir: PathBuf,
    /// The gateway's address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Services are reached at `NAME.<domain>`.
    pub domain: String,
    /// The skiff binary, started as the sandbox helper.
    pub helper: PathBuf,
    /// Debian mirror for building the base image.
    pub mirror: String,
    /// How the gateway treats client connections (its domain is `domain`).
    pub gateway: GatewayConfig,
    /// Threads that serve the gateway (one per core is best).
    pub gateway_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("state directory {dir}: {source}; pass another with --state")]
    State {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "another skiff is running on the state directory {0}; stop it first, \
         or give this one its own with --state"
    )]
    StateInUse(PathBuf),
}

/// How long a stopping platform waits for requests in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// A service that serves.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: i64,
    pub url: String,
    pub report: StartReport,
}

/// What a service is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// A version serves (another may be deploying).
    Ready,
    /// The first version (or the restored one) is starting.
    Deploying,
    /// Nothing serves; `failed` says why.
    Failed,
    /// Known to the records but not running (e.g. not restored yet).
    Stopped,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Deploying => "deploying",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// Instances of a service, by what they do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceCounts {
    pub running: usize,
    pub suspended: usize,
    pub starting: usize,
}

/// A service as it runs now, for `ls` and `status`.
#[derive(Debug, Clone)]
pub struct LiveStatus {
    pub name: String,
    pub state: ServiceState,
    pub url: String,
    /// The version serving.
    pub version: Option<i64>,
    pub spec: Option<ServiceSpec>,
    /// A deploy under way: its version and since when.
    pub deploying: Option<(i64, SystemTime)>,
    pub failed: Option<String>,
    pub instances: InstanceCounts,
    /// Replaced versions still answering requests.
    pub draining: usize,
}

/// What the platform's handles share: the context, the table of
/// services, and the images in use.
pub(crate) struct Shared {
    pub(crate) config: PlatformConfig,
    pub(crate) ctx: Arc<Context>,
    pub(crate) table: Arc<Table>,
    pub(crate) images: ImageStore,
    /// Image layers in use without a ref (deploys in progress, versions
    /// draining), by version; garbage collection keeps them.
    pins: Mutex<HashMap<i64, Vec<PathBuf>>>,
    /// Serialises garbage collection with the pinning of new layers.
    pub(crate) images_lock: tokio::sync::Mutex<()>,
    /// Held while a runtime layer is made, one per runtime.
    pub(crate) runtime_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) shutting_down: AtomicBool,
    /// Held while the platform runs: one platform per state directory.
    _state_lock: nix::fcntl::Flock<std::fs::File>,
    /// The last hour of each service, for the console (`history.rs`).
    history: History,
}

impl Shared {
    pub(crate) fn pin(&self, version: i64, layers: Vec<PathBuf>) {
        lock(&self.pins).insert(version, layers);
    }

    pub(crate) fn unpin(&self, version: i64) {
        lock(&self.pins).remove(&version);
    }

    /// Removes images nothing uses any more.
    pub(crate) async fn collect_images(&self) {
        let _guard = self.images_lock.lock().await;
        let mut keep: Vec<PathBuf> = lock(&self.pins).values().flatten().cloned().collect();
        let (store, records) = (self.images.clone(), self.ctx.store.clone());
        let collected = tokio::task::spawn_blocking(move || {
            keep.extend(rollback_images(&records)?);
            store.collect(&keep)
        });
        match collected.await {
            Ok(Ok(removed)) if !removed.is_empty() => info!("removed unused images: {removed:?}"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("collecting unused images: {e}"),
            Err(e) => warn!("collecting unused images: {e}"),
        }
    }
}

/// The layers of the last versions of each service that served before the
/// serving one (`deploy::ROLLBACK_IMAGES` of them): kept, so that a
/// rollback to them needs no build.
fn rollback_images(records: &skiff_store::Store) -> std::io::Result<Vec<PathBuf>> {
    let mut keep = Vec::new();
    for service in records.services().map_err(std::io::Error::other)? {
        let versions = records
            .versions(&service.name, u32::MAX)
            .map_err(std::io::Error::other)?;
        let served = versions
            .into_iter()
            .filter(|v| v.state == skiff_store::VersionState::Replaced)
            .take(crate::deploy::ROLLBACK_IMAGES);
        keep.extend(served.flat_map(|v| v.layers.unwrap_or_default()));
    }
    Ok(keep)
}

/// A running platform. Dropping it without [`Platform::shutdown`] still
/// kills every instance (their helpers die with this process).
pub struct Platform {
    handle: Handle,
    /// The gateway threads accept connections while this is true, and
    /// serve those they have while `running` is.
    accepting: watch::Sender<bool>,
    running: watch::Sender<bool>,
    gateway: Option<GatewayThreads>,
    recorder: JoinHandle<()>,
    /// Moves the gateway's request records to the store (`requests.rs`).
    carrier: Option<requests::Carrier>,
    /// Samples the services for the console's charts (`history.rs`).
    sampler: JoinHandle<()>,
}

/// What the control API and the CLI do with a running platform; cheap to
/// clone.
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl std::ops::Deref for Platform {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl Platform {
    /// Prepares the state directory, opens the records and starts the
    /// gateway. Services are not started yet: see [`Handle::restore`].
    pub async fn start(config: PlatformConfig) -> Result<Self, PlatformError> {
        let mnt = config.state_dir.join("mnt");
        std::fs::create_dir_all(&mnt)
            .map_err(|source| PlatformError::State { dir: mnt, source })?;
        // Builds run as root and may leave setuid files or device nodes in
        // their layers; sources may hold secrets. None of it is for the
        // host's other users.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| PlatformError::State {
                dir: config.state_dir.clone(),
                source,
            })?;
        let state_err = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| PlatformError::State { dir, source }
        };
        let lock_path = config.state_dir.join("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(state_err(&lock_path))?;
        let state_lock =
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|_| PlatformError::StateInUse(config.state_dir.clone()))?;
        let images = ImageStore::open(&config.state_dir).map_err(state_err(&config.state_dir))?;
        let store = Store::open_with(&config.state_dir, skiff_sandbox::batch_priority)?;
        let unfinished = store.fail_unfinished(
            "the platform stopped while this version was being deployed; deploy it again",
        )?;
        if unfinished > 0 {
            info!("{unfinished} deploys were cut short by the last platform's end");
        }
        let swept = Cgroups::sweep(Path::new(CGROUP_ROOT), owner_is_gone);
        if !swept.is_empty() {
            info!("removed cgroups left by a platform that was killed: {swept:?}");
        }
        let threads = config.gateway_threads.max(1);
        let listeners = Listeners::bind(config.listen, threads)?;
        let gateway_addr = listeners.addr();
        let ctx = Arc::new(Context::new(
            config.state_dir.clone(),
            Sandbox::new(config.helper.clone()),
            store,
            gateway_addr,
            config.domain.clone(),
        ));
        let resolv = ctx.build_resolv_conf();
        std::fs::write(&resolv, build::BUILD_RESOLV_CONF).map_err(state_err(&resolv))?;
        let table = Arc::new(Table::new(ctx.clone()));
        let shared = Arc::new(Shared {
            config,
            ctx: ctx.clone(),
            table: table.clone(),
            pins: Mutex::default(),
            images_lock: tokio::sync::Mutex::new(()),
            runtime_locks: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            images,
            _state_lock: state_lock,
            history: History::default(),
        });
        let recorder = tokio::spawn(record_events(ctx.clone(), ctx.events.subscribe()));
        let carrier =
            requests::Carrier::start(ctx.clone()).map_err(|source| PlatformError::State {
                dir: shared.config.state_dir.clone(),
                source,
            })?;
        let (accepting, accepting_rx) = watch::channel(true);
        let (running, running_rx) = watch::channel(true);
        let gateway = GatewayThreads::spawn(
            table,
            GatewayConfig {
                domain: shared.config.domain.clone(),
                ..shared.config.gateway.clone()
            },
            listeners,
            accepting_rx,
            running_rx,
            ctx.metrics.gateway(),
        )
        .map_err(|source| PlatformError::State {
            dir: shared.config.state_dir.clone(),
            source,
        })?;
        let sampler = tokio::spawn(sample_history(Handle {
            shared: shared.clone(),
        }));
        Ok(Self {
            handle: Handle { shared },
            sampler,
            accepting,
            running,
            gateway: Some(gateway),
            recorder,
            carrier: Some(carrier),
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops taking connections, lets requests in flight finish (at most
    /// `SHUTDOWN_DRAIN`), then stops every instance (SIGTERM, then SIGKILL
    /// after a grace period) and removes their cgroups. Nothing is left
    /// running.
    pub async fn shutdown(mut self) {
        let shared = &self.handle.shared;
        shared.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.accepting.send(false);
        let runtimes: Vec<Arc<ServiceRuntime>> = shared
            .table
            .read()
            .values()
            .flat_map(Entry::runtimes)
            .collect();
        // All at once: each may wait its instances' grace period.
        let mut stopping = tokio::task::JoinSet::new();
        for rt in runtimes {
            stopping.spawn(async move {
                rt.drain(rt.drain_limit().min(SHUTDOWN_DRAIN)).await;
                rt.shutdown().await
            });
        }
        while stopping.join_next().await.is_some() {}
        self.recorder.abort();
        self.sampler.abort();
        let _ = self.running.send(false);
        if let Some(gateway) = self.gateway.take() {
            let _ = tokio::task::spawn_blocking(move || gateway.join()).await;
        }
        // The last requests' records, now that no more come.
        if let Some(carrier) = self.carrier.take() {
            let _ = tokio::task::spawn_blocking(move || carrier.finish()).await;
        }
        // The last lines and notes reach the records before the process ends.
        shared.ctx.store.flush(Duration::from_secs(2)).await;
    }
}

impl Handle {
    /// The address the gateway really listens on.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.shared.ctx.gateway_addr
    }

    /// Everything the platform reports from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.ctx.events.subscribe()
    }

    /// The platform's records.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.ctx.store
    }

    pub fn domain(&self) -> &str {
        &self.shared.config.domain
    }

    /// The URL a service is reached at.
    pub fn url(&self, service: &str) -> String {
        self.shared.ctx.url(service)
    }

    /// What each service is doing now: those that run and those only
    /// recorded.
    pub fn list(&self) -> Result<Vec<LiveStatus>, StoreError> {
        let mut names: Vec<String> = self
            .shared
            .ctx
            .store
            .services()?
            .into_iter()
            .map(|s| s.name)
            .collect();
        names.extend(self.shared.table.read().keys().cloned());
        names.sort();
        names.dedup();
        Ok(names.iter().filter_map(|n| self.status(n)).collect())
    }

    /// What `name` is doing now; `None` when it is neither running nor
    /// recorded.
    pub fn status(&self, name: &str) -> Option<LiveStatus> {
        let services = self.shared.table.read();
        let url = self.url(name);
        let Some(entry) = services.get(name) else {
            drop(services);
            let record = self.shared.ctx.store.service(name).ok()??;
            let spec = record
                .current
                .and_then(|v| self.shared.ctx.store.version(v).ok()?)
                .map(|v| v.spec);
            return Some(LiveStatus {
                name: name.to_string(),
                state: ServiceState::Stopped,
                url,
                version: record.current,
                spec,
                deploying: None,
                failed: None,
                instances: InstanceCounts::default(),
                draining: 0,
            });
        };
        let mut instances = InstanceCounts::default();
        for (_, rt) in entry.serving.iter().chain(&entry.draining) {
            let (running, suspended, starting) = rt.counts();
            instances.running += running;
            instances.suspended += suspended;
            instances.starting += starting;
        }
        let state = if entry.serving.is_some() {
            ServiceState::Ready
        } else if entry.deploying.is_some() {
            ServiceState::Deploying
        } else if entry.failed.is_some() {
            ServiceState::Failed
        } else {
            ServiceState::Stopped
        };
        Some(LiveStatus {
            name: name.to_string(),
            state,
            url,
            version: entry.serving.as_ref().map(|(v, _)| *v),
            spec: entry.serving.as_ref().map(|(_, rt)| rt.spec().clone()),
            deploying: entry.deploying.as_ref().map(|d| (d.version, d.since)),
            failed: entry.failed.clone(),
            instances,
            draining: entry.draining.len(),
        })
    }
}

/// Samples every service for the console's charts, every `SAMPLE_EVERY`.
async fn sample_history(handle: Handle) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.sample_history();
    }
}

impl Handle {
    /// The last hour of each service (`history.rs`).
    pub fn history(&self) -> &History {
        &self.shared.history
    }

    fn sample_history(&self) {
        let snapshot = self.shared.ctx.metrics.gateway().snapshot();
        let (names, runtimes) = self.deployed();
        let now = SystemTime::now();
        let none = Counts::default();
        let samples = names
            .into_iter()
            .map(|name| {
                let counts = snapshot
                    .services
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(&none, |(_, c)| c);
                let mut instances = (0, 0, 0);
                for (_, rt) in runtimes.iter().filter(|(n, _)| *n == name) {
                    let (running, suspended, starting) = rt.counts();
                    instances.0 += running;
                    instances.1 += suspended;
                    instances.2 += starting;
                }
                let sample = Sample::new(now, counts, instances);
                (name, sample)
            })
            .collect();
        self.shared.history.record(samples);
    }

    /// Every service in the table, and the runtimes of its serving and
    /// draining versions (whose instances `status` counts), read under
    /// the table's lock once.
    fn deployed(&self) -> (Vec<String>, Vec<(String, Arc<ServiceRuntime>)>) {
        let table = self.shared.table.read();
        let runtimes = table
            .iter()
            .flat_map(|(name, e)| {
                let versions = e.serving.iter().chain(&e.draining);
                versions.map(move |(_, rt)| (name.clone(), rt.clone()))
            })
            .collect();
        (table.keys().cloned().collect(), runtimes)
    }

    /// The platform's metrics in Prometheus's text format, with the
    /// instances of every service that has some at this moment.
    pub fn metrics(&self) -> String {
        let (names, runtimes) = self.deployed();
        // Counts of services no longer deployed (a request in flight while
        // one was removed) go.
        self.shared
            .ctx
            .metrics
            .gateway()
            .retain(|n| names.iter().any(|k| k == n));
        // Each service's instances (those of its serving and draining
        // versions, as `status` counts them), and what each uses, read
        // from its groups after the table's lock.
        let mut instances: Vec<_> = names
            .into_iter()
            .map(|n| (n, [("running", 0), ("suspended", 0), ("starting", 0)]))
            .collect();
        let mut usage: Vec<InstanceUsage> = Vec::new();
        for (service, rt) in runtimes {
            let (running, suspended, starting) = rt.counts();
            if let Some((_, states)) = instances.iter_mut().find(|(n, _)| *n == service) {
                for (state, n) in [running, suspended, starting].into_iter().enumerate() {
                    states[state].1 += n;
                }
            }
            usage.extend(
                rt.usage()
                    .into_iter()
                    .map(|(instance, cpu, memory)| InstanceUsage {
                        service: service.clone(),
                        instance,
                        cpu,
                        memory,
                    }),
            );
        }
        self.shared.ctx.metrics.encode(&instances, usage)
    }
}

/// Writes what happens to instances into the records, so `status` and
/// `logs` show it after the fact.
async fn record_events(ctx: Arc<Context>, mut events: broadcast::Receiver<Event>) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!("{n} platform events were not recorded: too many at once");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match event {
            Event::InstanceStarted {
                service,
                instance,
                report,
            } => ctx.record(
                &service,
                EventKind::InstanceStarted,
                &format!(
                    "started instance {instance} (sandbox {:.1}ms, app start {:.1}ms)",
                    report.sandbox.as_secs_f64() * 1000.0,
                    report.app.as_secs_f64() * 1000.0
                ),
            ),
            Event::InstanceStopped { service, instance } => ctx.record(
                &service,
                EventKind::InstanceStopped,
                &format!("stopped idle instance {instance}"),
            ),
            Event::Exited {
                service,
                instance,
                exit,
            } => ctx.record(
                &service,
                EventKind::InstanceExited,
                &format!("instance {instance} exited by itself ({exit})"),
            ),
            _ => {}
        }
    }
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("state_dir", &self.shared.config.state_dir)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::rollback_images;

    /// The layers kept for rollbacks: those of each service's last 3
    /// versions that served before its current one; not the current one's
    /// (its ref keeps it), not failed ones', not older ones'.
    #[test]
    fn rollbacks_keep_the_last_three_versions_that_served() {
        let state = tempfile::tempdir().unwrap();
        let store = skiff_store::Store::open(state.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("skiff.toml"),
            "name = \"api\"\nstart = \"python3 app.py\"\n",
        )
        .unwrap();
        let spec = skiff_model::load(dir.path(), &Default::default()).unwrap();
        let layer = |v: i64| vec![PathBuf::from(format!("/s/images/img-{v}"))];
        let mut served = Vec::new();
        for n in 0..6 {
            let v = store.begin_version(&spec).unwrap();
            store.set_layers(v, &layer(v), None).unwrap();
            if n == 4 {
                store.fail_version(v, "it crashed").unwrap();
                continue;
            }
            store
                .promote("api", v, Duration::ZERO, Duration::ZERO)
                .unwrap();
            served.push(v);
        }
        // Five served; the last serves now; a failed one in between.
        let kept = rollback_images(&store).unwrap();
        let expected: Vec<PathBuf> = served[1..4].iter().rev().flat_map(|v| layer(*v)).collect();
        assert_eq!(kept, expected);
    }
}
