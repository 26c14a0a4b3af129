//! The platform: one gateway, the services deployed on it, their instances.
//! `skiff up` runs it in the foreground, `skiff serve` as a daemon; both
//! through this code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use skiff_gateway::{
    ErrorKind, ExchangeLimits, GatewayConfig, GatewayError, GatewayThreads, Listeners, Route,
    Router, Upstream,
};
use skiff_model::ServiceSpec;
use skiff_sandbox::{Cgroups, Sandbox, CGROUP_ROOT};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::base::{self, BaseImageError};
use crate::build::{self, BuildContext, BuildError};
use crate::build_cache::BuildCache;

/// The build's `/etc/resolv.conf`, under the state directory.
const BUILD_RESOLV_CONF_FILE: &str = "build-resolv.conf";
use crate::events::{Event, StartReport};
use crate::image::{self, ImageStore};
use crate::instance::StartError;
use crate::service::{self, ServiceRuntime};
use crate::store::{LogSource, Store, StoreError};

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

/// Records an event of `service` in `store`, and a platform line in its log.
fn record(store: &Store, service: &str, level: &str, kind: &str, message: &str) {
    if let Err(e) = store.add_event(service, level, kind, message) {
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

/// How long a stopping platform waits for requests in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    BaseImage(#[from] BaseImageError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot prepare the writable layer {dir} of the persistent service: {source}")]
    Writable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot snapshot the source directory {dir}: {source}")]
    Source {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a deploy of {service:?} is already in progress (version {version}); wait for it to \
         finish (skiff status {service}), then deploy again"
    )]
    InProgress { service: String, version: i64 },
    #[error("{service:?} is being removed; deploy it again once `skiff rm` has finished")]
    Removing { service: String },
    #[error(
        "the image of version {version} is missing ({path}); deploy the service again to \
         rebuild it"
    )]
    ImageMissing { version: i64, path: PathBuf },
    #[error("cannot mount the disk of the service's image: {source}; deploy it again")]
    ImageDisk { source: std::io::Error },
    /// The platform's own step, not the service's build: no setting of the
    /// service's is to blame.
    #[error(
        "skiff could not make the {runtime} runtime the service asks for ({command}, from \
         the npm registry); check that the host reaches registry.npmjs.org and deploy \
         again. What happened: {}",
        build::platform_step_failure(source)
    )]
    Runtime {
        runtime: String,
        command: String,
        source: BuildError,
    },
    #[error("the platform is shutting down")]
    ShuttingDown,
}

/// Why a service could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no service named {0:?} is deployed here; `skiff ls` lists the services")]
    Unknown(String),
    #[error(
        "a deploy of {service:?} is in progress (version {version}); wait for it to finish, \
         then remove the service"
    )]
    DeployInProgress { service: String, version: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A service that serves.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: i64,
    pub url: String,
    pub report: StartReport,
}

/// A deploy (or a restore) under way.
struct Deploying {
    version: i64,
    /// Exists once the image does, so that a shutdown stops it too.
    runtime: Option<Arc<ServiceRuntime>>,
    since: SystemTime,
}

/// What the platform runs of one service.
#[derive(Default)]
struct Entry {
    /// The version the gateway routes to.
    serving: Option<(i64, Arc<ServiceRuntime>)>,
    deploying: Option<Deploying>,
    /// Why nothing serves (the last deploy or restore failed).
    failed: Option<String>,
    /// Replaced versions answering what they accepted before they stop.
    draining: Vec<(i64, Arc<ServiceRuntime>)>,
    /// `skiff rm` is stopping it: no deploy may start meanwhile.
    removing: bool,
}

impl Entry {
    /// The versions that run (and whose writable layers are in use).
    fn live_versions(&self) -> Vec<i64> {
        let deploying = self.deploying.as_ref().map(|d| d.version);
        self.serving
            .iter()
            .chain(&self.draining)
            .map(|(v, _)| *v)
            .chain(deploying)
            .collect()
    }
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

pub(crate) struct Shared {
    config: PlatformConfig,
    pub(crate) sandbox: Sandbox,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) store: Arc<Store>,
    services: RwLock<HashMap<String, Entry>>,
    upstreams: RwLock<HashMap<String, Upstream>>,
    /// Image layers in use without a ref (deploys in progress, versions
    /// draining), by version; garbage collection keeps them.
    pins: Mutex<HashMap<i64, Vec<PathBuf>>>,
    /// Serialises garbage collection with the pinning of new layers.
    images_lock: tokio::sync::Mutex<()>,
    /// Held while a runtime layer is made, one per runtime.
    runtime_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Gateway refusals per service and kind: when last recorded, how
    /// many since.
    refusals: Mutex<HashMap<(String, &'static str), Refusals>>,
    shutting_down: AtomicBool,
    next_instance: AtomicU64,
    gateway_addr: SocketAddr,
    images: ImageStore,
    /// The platform's runtime: instance tasks are spawned here, also when
    /// the decision to start one is taken on a gateway thread.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Held while the platform runs: one platform per state directory.
    _state_lock: nix::fcntl::Flock<std::fs::File>,
}

impl Shared {
    /// A new instance id, unique on this host (see `instance_id`).
    pub(crate) fn instance_id(&self, service: &str) -> String {
        instance_id(service, self.next_instance.fetch_add(1, Ordering::SeqCst))
    }

    /// Where sandboxes mount their root inside their own mount namespace.
    pub(crate) fn mount_point(&self) -> PathBuf {
        self.config.state_dir.join("mnt")
    }

    /// Where a persistent service keeps its writable layers.
    pub(crate) fn writable_dir(&self, service: &str) -> PathBuf {
        self.config.state_dir.join("writable").join(service)
    }

    /// Where a service's build cache is (`crate::build_cache`).
    pub(crate) fn build_cache_dir(&self, service: &str) -> PathBuf {
        self.config.state_dir.join("build-cache").join(service)
    }

    /// Where a service's account files are, per version (`crate::users`).
    pub(crate) fn users_dir(&self, service: &str) -> PathBuf {
        self.config.state_dir.join("users").join(service)
    }

    pub(crate) fn register_upstream(&self, upstream: &Upstream) {
        write(&self.upstreams).insert(upstream.key.to_string(), upstream.clone());
    }

    pub(crate) fn forget_upstream(&self, key: &str) {
        write(&self.upstreams).remove(key);
    }

    fn url(&self, service: &str) -> String {
        let addr = self.gateway_addr;
        let port = if addr.port() == 80 {
            String::new()
        } else {
            format!(":{}", addr.port())
        };
        format!("http://{service}.{}{port}/", self.config.domain)
    }

    fn pin(&self, version: i64, layers: Vec<PathBuf>) {
        lock(&self.pins).insert(version, layers);
    }

    fn unpin(&self, version: i64) {
        lock(&self.pins).remove(&version);
    }

    /// Removes images nothing uses any more.
    async fn collect_images(&self) {
        let _guard = self.images_lock.lock().await;
        let keep: Vec<PathBuf> = lock(&self.pins).values().flatten().cloned().collect();
        let store = self.images.clone();
        match tokio::task::spawn_blocking(move || store.collect(&keep)).await {
            Ok(Ok(removed)) if !removed.is_empty() => info!("removed unused images: {removed:?}"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("collecting unused images: {e}"),
            Err(e) => warn!("collecting unused images: {e}"),
        }
    }

    /// Removes what `service`'s versions that no longer run kept per
    /// version: persistent writable layers, account files.
    fn prune_versions(&self, service: &str) {
        let services = read(&self.services);
        let keep = services
            .get(service)
            .map(Entry::live_versions)
            .unwrap_or_default();
        for dir in [self.writable_dir(service), self.users_dir(service)] {
            if let Err(e) = service::prune_versions(&dir, &keep) {
                warn!(
                    "removing what old versions of {service} kept in {}: {e}",
                    dir.display()
                );
            }
        }
    }

    /// Records what the diagnosis needs of a failed start: the addresses a
    /// service listened on instead of its port, an out-of-memory kill.
    pub(crate) fn record_start_failure(&self, service: &str, e: &StartError) {
        use crate::diagnose::events;
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
                self.record(service, "error", events::PORT_NOT_LISTENING, &message);
            }
            StartError::NoHttpAnswer { port, .. } => self.record(
                service,
                "error",
                events::NO_HTTP_ANSWER,
                &format!("port {port} accepted connections but gave no HTTP answer"),
            ),
            StartError::EarlyExit {
                oom_limit: Some(limit),
                ..
            } => self.record(
                service,
                "error",
                events::OOM_KILL,
                &format!(
                    "The start command was killed: {}",
                    crate::instance::oom_message(*limit)
                ),
            ),
            _ => {}
        }
    }

    /// Records an event of `service` (and a platform line in its log).
    pub(crate) fn record(&self, service: &str, level: &str, kind: &str, message: &str) {
        record(&self.store, service, level, kind, message);
    }
}

impl Router for Shared {
    fn route(&self, service: &str) -> Route {
        let services = read(&self.services);
        match services.get(service) {
            // Routed under the read lock: a swap (write lock) cannot slip in
            // between, so a version whose drain began gets no new request.
            Some(Entry {
                serving: Some((_, rt)),
                ..
            }) => rt.route(),
            Some(Entry { removing: true, .. }) => Route::Unavailable {
                reason: "it is being removed (skiff rm)".into(),
            },
            Some(Entry {
                deploying: Some(_), ..
            }) => Route::Unavailable {
                reason:
                    "it is starting and not yet answering its health check; try again in a moment"
                        .into(),
            },
            Some(Entry {
                failed: Some(reason),
                ..
            }) => Route::Unavailable {
                reason: reason.clone(),
            },
            Some(_) => Route::Unavailable {
                reason: "it is not running; deploy it again (skiff deploy)".into(),
            },
            None => {
                let mut deployed: Vec<String> = services.keys().cloned().collect();
                deployed.sort();
                Route::Unknown { deployed }
            }
        }
    }

    fn allows_streaming(&self, service: &str) -> Option<bool> {
        let services = read(&self.services);
        match services.get(service) {
            Some(Entry {
                serving: Some((_, rt)),
                ..
            }) => Some(rt.persistent()),
            _ => None,
        }
    }

    fn upstream(&self, key: &str) -> Option<Upstream> {
        let ups = read(&self.upstreams);
        ups.get(key).cloned()
    }

    fn limits(&self, service: &str) -> Option<ExchangeLimits> {
        match read(&self.services).get(service) {
            Some(Entry {
                serving: Some((_, rt)),
                ..
            }) => Some(rt.exchange_limits()),
            _ => None,
        }
    }

    fn refused(&self, service: &str, kind: ErrorKind, message: &str) {
        if !read(&self.services).contains_key(service) {
            return;
        }
        // At most one record per service and kind a second: a client
        // hammering a limit must not turn into a database write per request.
        let now = std::time::Instant::now();
        let repeated = {
            let mut seen = lock(&self.refusals);
            let entry = seen
                .entry((service.to_string(), kind.as_str()))
                .or_insert((None, 0));
            entry.1 += 1;
            if entry
                .0
                .is_some_and(|last| now.duration_since(last) < REFUSAL_EVERY)
            {
                return;
            }
            entry.0 = Some(now);
            std::mem::take(&mut entry.1)
        };
        let message = if repeated > 1 {
            format!("{message} ({repeated} times since the last record)")
        } else {
            message.to_string()
        };
        // Written from the platform's blocking pool: a database write
        // (which may wait for a reader) must not stall a gateway thread.
        let store = self.store.clone();
        let service = service.to_string();
        self.runtime
            .spawn_blocking(move || record(&store, &service, "error", kind.as_str(), &message));
    }
}

/// One kind of gateway refusal of one service: when it was last recorded,
/// how many came since.
type Refusals = (Option<std::time::Instant>, u32);

/// How often one kind of gateway refusal is recorded per service.
const REFUSAL_EVERY: Duration = Duration::from_secs(1);

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
}

/// What the control API and the CLI do with a running platform; cheap to
/// clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
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
        let resolv = config.state_dir.join(BUILD_RESOLV_CONF_FILE);
        std::fs::write(&resolv, build::BUILD_RESOLV_CONF).map_err(state_err(&resolv))?;
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
        let store = Store::open(&config.state_dir)?;
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
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            sandbox: Sandbox::new(config.helper.clone()),
            config,
            events,
            store,
            services: RwLock::default(),
            upstreams: RwLock::default(),
            pins: Mutex::default(),
            images_lock: tokio::sync::Mutex::new(()),
            runtime_locks: Mutex::default(),
            refusals: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            next_instance: AtomicU64::new(1),
            gateway_addr,
            images,
            runtime: tokio::runtime::Handle::current(),
            _state_lock: state_lock,
        });
        let recorder = tokio::spawn(record_events(shared.clone(), shared.events.subscribe()));
        let (accepting, accepting_rx) = watch::channel(true);
        let (running, running_rx) = watch::channel(true);
        let gateway = GatewayThreads::spawn(
            shared.clone(),
            GatewayConfig {
                domain: shared.config.domain.clone(),
                ..shared.config.gateway.clone()
            },
            listeners,
            accepting_rx,
            running_rx,
        )
        .map_err(|source| PlatformError::State {
            dir: shared.config.state_dir.clone(),
            source,
        })?;
        Ok(Self {
            handle: Handle { shared },
            accepting,
            running,
            gateway: Some(gateway),
            recorder,
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
        let runtimes: Vec<Arc<ServiceRuntime>> = read(&shared.services)
            .values()
            .flat_map(|e| {
                let deploying = e.deploying.as_ref().and_then(|d| d.runtime.clone());
                e.serving
                    .iter()
                    .map(|(_, rt)| rt.clone())
                    .chain(deploying)
                    .chain(e.draining.iter().map(|(_, rt)| rt.clone()))
                    .collect::<Vec<_>>()
            })
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
        let _ = self.running.send(false);
        if let Some(gateway) = self.gateway.take() {
            let _ = tokio::task::spawn_blocking(move || gateway.join()).await;
        }
        // The last lines and notes reach the records before the process ends.
        shared.store.flush(Duration::from_secs(2)).await;
    }
}

impl Handle {
    /// The address the gateway really listens on.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.shared.gateway_addr
    }

    /// Everything the platform reports from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The platform's records.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    pub fn domain(&self) -> &str {
        &self.shared.config.domain
    }

    /// The URL a service is reached at.
    pub fn url(&self, service: &str) -> String {
        self.shared.url(service)
    }

    /// Starts, in the background, the current version of every recorded
    /// service but those in `except`: after a restart, everything that
    /// served serves again, without a rebuild. Returns the names started.
    pub fn restore(&self, except: &[String]) -> Result<Vec<String>, StoreError> {
        let mut started = Vec::new();
        for record in self.shared.store.services()? {
            if except.contains(&record.name) {
                continue;
            }
            let Some(version) = record.current else {
                continue;
            };
            let v = match self.shared.store.version(version) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                // One unreadable record must not keep the others down.
                Err(e) => {
                    let reason = format!(
                        "its recorded version {version} cannot be read ({e}); deploy it again"
                    );
                    warn!("{}: {reason}", record.name);
                    write(&self.shared.services)
                        .entry(record.name.clone())
                        .or_default()
                        .failed = Some(reason);
                    continue;
                }
            };
            {
                let mut services = write(&self.shared.services);
                let entry = services.entry(record.name.clone()).or_default();
                if entry.serving.is_some() || entry.deploying.is_some() {
                    continue;
                }
                entry.deploying = Some(Deploying {
                    version,
                    runtime: None,
                    since: SystemTime::now(),
                });
            }
            let this = self.clone();
            started.push(record.name.clone());
            tokio::spawn(async move {
                let name = v.spec.name.to_string();
                let layers = v.layers.clone().unwrap_or_default();
                let result = this.restore_version(&v.spec, version, layers).await;
                if let Err(e) = result {
                    let reason = e.to_string();
                    this.deploy_failed(&name, &reason);
                    this.shared.record(
                        &name,
                        "error",
                        "restore_failed",
                        &format!("version {version} could not be started again: {reason}"),
                    );
                }
            });
        }
        Ok(started)
    }

    async fn restore_version(
        &self,
        spec: &ServiceSpec,
        version: i64,
        layers: Vec<PathBuf>,
    ) -> Result<(), DeployError> {
        let name = spec.name.to_string();
        // The recorded layers name the base the version was built on; it is
        // on disk (or the version is reported missing below). No base is
        // made here: an upgrade's new default must not hold restores up.
        self.attach_images(&layers).await?;
        if let Some(missing) = layers.iter().find(|l| !l.exists()) {
            return Err(DeployError::ImageMissing {
                version,
                path: missing.clone(),
            });
        }
        self.shared.pin(version, layers.clone());
        let (rt, report) = match self.start_runtime(spec, version, layers).await {
            Ok(r) => r,
            Err(e) => {
                self.shared.unpin(version);
                return Err(e);
            }
        };
        {
            let mut services = write(&self.shared.services);
            let entry = services.entry(name.clone()).or_default();
            entry.deploying = None;
            entry.failed = None;
            entry.serving = Some((version, rt));
        }
        let url = self.url(&name);
        let _ = self.shared.events.send(Event::Ready {
            service: name.clone(),
            url,
            report,
        });
        self.shared.record(
            &name,
            "info",
            "restored",
            &format!("version {version} serves again after the platform's restart"),
        );
        Ok(())
    }

    /// Builds `spec` (or reuses its image), starts its first instance and
    /// waits until it answers; then routes to it. A service that already
    /// serves keeps serving its old version until the new one answers, and
    /// keeps it when the new one fails; the old version then answers what it
    /// accepted and stops.
    pub async fn deploy(&self, spec: &ServiceSpec) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Err(DeployError::ShuttingDown);
        }
        {
            let mut services = write(&shared.services);
            let entry = services.entry(name.clone()).or_default();
            if let Some(d) = &entry.deploying {
                return Err(DeployError::InProgress {
                    service: name,
                    version: d.version,
                });
            }
            if entry.removing {
                return Err(DeployError::Removing { service: name });
            }
            entry.deploying = Some(Deploying {
                version: 0,
                runtime: None,
                since: SystemTime::now(),
            });
        }
        let version = match shared.store.begin_version(spec) {
            Ok(v) => v,
            Err(e) => {
                self.deploy_failed(&name, &e.to_string());
                return Err(e.into());
            }
        };
        if let Some(d) = write(&shared.services)
            .get_mut(&name)
            .and_then(|e| e.deploying.as_mut())
        {
            d.version = version;
        }
        shared.record(
            &name,
            "info",
            "deploy_started",
            &format!("deploying version {version}"),
        );
        let result = self.deploy_version(spec, version).await;
        match &result {
            Ok(_) => shared.record(
                &name,
                "info",
                "deployed",
                &format!("version {version} serves"),
            ),
            Err(e) => {
                let reason = e.to_string();
                shared.unpin(version);
                shared.prune_versions(&name);
                if let Err(e) = shared.store.fail_version(version, &reason) {
                    warn!("recording the failure of {name} version {version}: {e}");
                }
                self.deploy_failed(&name, &reason);
                shared.record(
                    &name,
                    "error",
                    "deploy_failed",
                    &format!("version {version} failed: {reason}"),
                );
                let _ = shared.events.send(Event::Failed {
                    service: name.clone(),
                    reason,
                });
            }
        }
        result
    }

    /// The deploy is over without a new version: what served still does;
    /// if nothing did, the service is failed with `reason`.
    fn deploy_failed(&self, name: &str, reason: &str) {
        let mut services = write(&self.shared.services);
        if let Some(entry) = services.get_mut(name) {
            entry.deploying = None;
            if entry.serving.is_none() {
                entry.failed = Some(reason.to_string());
            }
        }
    }

    /// The base image `spec` runs on (made the first time it is needed).
    async fn base_image(&self, spec: &ServiceSpec) -> Result<base::BaseImage, DeployError> {
        let shared = &self.shared;
        let events = shared.events.clone();
        let suite = base::suite_for(spec.python.as_deref());
        let progress = move |line: &str| {
            let _ = events.send(Event::BaseImage {
                line: line.to_string(),
            });
        };
        let base = base::ensure_suite(
            &shared.config.cache_dir,
            &shared.config.mirror,
            suite,
            progress,
        )
        .await?;
        let _ = shared.events.send(Event::BaseImageReady {
            built_in: base.built_in,
        });
        Ok(base)
    }

    async fn deploy_version(
        &self,
        spec: &ServiceSpec,
        version: i64,
    ) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let base = self.base_image(spec).await?;
        let (layers, build) = self.image(spec, version, &base).await?;
        shared.store.set_layers(version, &layers, build)?;
        let (rt, report) = self.start_runtime(spec, version, layers.clone()).await?;
        if let Err(e) = shared
            .store
            .promote(&name, version, report.sandbox, report.app)
        {
            // Not recorded as serving: it must not run unrecorded either.
            rt.shutdown().await;
            return Err(e.into());
        }
        if let Err(e) = shared.images.set_ref(&name, &layers) {
            warn!("recording the image of {name}: {e}");
        }
        let old = {
            let mut services = write(&shared.services);
            let entry = services.entry(name.clone()).or_default();
            entry.deploying = None;
            entry.failed = None;
            let old = entry.serving.replace((version, rt.clone()));
            if let Some(old) = &old {
                entry.draining.push(old.clone());
            }
            old
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Some((old_version, old)) = old {
                let drained = old.drain(old.drain_limit()).await;
                if !drained {
                    this.shared.record(
                        &old.name,
                        "info",
                        "drain_timeout",
                        &format!(
                            "version {old_version} still had requests in flight after {}; \
                             they were cut off when it stopped",
                            humantime::format_duration(old.drain_limit())
                        ),
                    );
                }
                old.shutdown().await;
                if let Some(entry) = write(&this.shared.services).get_mut(&old.name) {
                    entry.draining.retain(|(v, _)| *v != old_version);
                }
                this.shared.unpin(old_version);
                this.shared.prune_versions(&old.name);
            }
            this.shared.collect_images().await;
        });
        let url = self.url(&name);
        let _ = shared.events.send(Event::Ready {
            service: name.clone(),
            url: url.clone(),
            report,
        });
        Ok(Deployed {
            version,
            url,
            report,
        })
    }

    /// A runtime for `version` on `layers`, its first instance answering.
    async fn start_runtime(
        &self,
        spec: &ServiceSpec,
        version: i64,
        layers: Vec<PathBuf>,
    ) -> Result<(Arc<ServiceRuntime>, StartReport), DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let log = shared.store.log_sender(&name, Some(version));
        let rt = ServiceRuntime::new(spec.clone(), version, layers, shared.clone(), log).map_err(
            |source| DeployError::Writable {
                dir: shared.writable_dir(&name),
                source,
            },
        )?;
        let stopping = {
            // Registered and checked under the lock shutdown snapshots
            // under: either shutdown sees this runtime, or this sees the flag.
            let mut services = write(&shared.services);
            if let Some(d) = services.get_mut(&name).and_then(|e| e.deploying.as_mut()) {
                d.runtime = Some(rt.clone());
            }
            shared.shutting_down.load(Ordering::SeqCst)
        };
        if stopping {
            rt.shutdown().await;
            return Err(DeployError::ShuttingDown);
        }
        // A failure is recorded for diagnosis by the instance task, which
        // sees it first (`ServiceRuntime::run_instance`).
        match rt.start_first().await {
            Ok(report) => Ok((rt, report)),
            Err(e) => {
                rt.shutdown().await;
                Err(e.into())
            }
        }
    }

    /// The service's image, top layer first: its build layer (built now,
    /// or reused when the same source, build command and base were built
    /// before), its source snapshot, the base. The layers are pinned under
    /// `version` until the deploy ends. Also returns the build's duration.
    async fn image(
        &self,
        spec: &ServiceSpec,
        version: i64,
        base: &base::BaseImage,
    ) -> Result<(Vec<PathBuf>, Option<Duration>), DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let (source, image, runtime) = {
            // Snapshot and pin under the lock garbage collection takes, so
            // a collection running for another service cannot remove them.
            let _guard = shared.images_lock.lock().await;
            let store = shared.images.clone();
            let source_dir = spec.source.clone();
            let source = tokio::task::spawn_blocking(move || store.snapshot(&source_dir))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|source| DeployError::Source {
                    dir: spec.source.clone(),
                    source,
                })?;
            let base_name = base::image_dir_name_for(base::suite_for(spec.python.as_deref()));
            let runtime = spec.node.map(|major| {
                shared
                    .images
                    .runtime_for(&base_name, &format!("node@{major}"))
            });
            // The runtime is part of what the build runs on.
            let base_key = match spec.node {
                Some(major) => format!("{base_name}+node@{major}"),
                None => base_name.clone(),
            };
            let image = spec.build.as_ref().map(|build| {
                shared
                    .images
                    .image_for(&name, &base_key, &source, build, &spec.env)
            });
            let mut pinned = vec![source.dir.clone()];
            pinned.extend(runtime.as_ref().map(|r| r.upper()));
            pinned.extend(image.as_ref().map(|i| i.upper()));
            shared.pin(version, pinned);
            (source, image, runtime)
        };
        let mut lower = vec![source.dir.clone()];
        if let (Some(runtime), Some(major)) = (runtime, spec.node) {
            lower.push(
                self.runtime_layer(spec, version, major, &runtime, base)
                    .await?,
            );
        }
        lower.push(base.root.clone());
        let (Some(build), Some(image)) = (&spec.build, image) else {
            return Ok((lower, None));
        };
        let mut elapsed = None;
        let mut ready = image.is_ready();
        if ready {
            if let Err(e) = self
                .attach_images(std::slice::from_ref(&image.upper()))
                .await
            {
                // A layer whose disk cannot be mounted is built again.
                warn!("{name}: {e}; building the image again");
                ready = false;
            }
        }
        if ready {
            let _ = shared.events.send(Event::BuildFinished {
                service: name,
                elapsed: None,
                written: None,
                layer_size: image::tree_size(&image.upper()),
            });
        } else {
            let mount_point = shared.mount_point();
            let resolv_conf = shared.config.state_dir.join(BUILD_RESOLV_CONF_FILE);
            let cache = BuildCache::new(shared.build_cache_dir(&name));
            let ctx = BuildContext {
                sandbox: &shared.sandbox,
                images: &shared.images,
                cache: Some(&cache),
                mount_point: &mount_point,
                resolv_conf: &resolv_conf,
                log: shared.store.log_sender(&name, Some(version)),
                events: shared.events.clone(),
            };
            let id = shared.instance_id(&format!("{name}-build"));
            let report = build::run(&ctx, spec, build, &lower, &image, &id).await?;
            elapsed = Some(report.elapsed);
            let _ = shared.events.send(Event::BuildFinished {
                service: name,
                elapsed: Some(report.elapsed),
                written: Some(report.written),
                layer_size: report.layer_size,
            });
        }
        Ok(([vec![image.upper()], lower].concat(), elapsed))
    }

    /// The runtime layer `runtime` (Node.js `major`), made once for every
    /// service that asks for it; returns its upper directory.
    async fn runtime_layer(
        &self,
        spec: &ServiceSpec,
        version: i64,
        major: u32,
        runtime: &crate::image::ImageDir,
        base: &base::BaseImage,
    ) -> Result<PathBuf, DeployError> {
        let shared = &self.shared;
        // One maker per runtime at a time: two services asking for the same
        // one must not build it in the same directory; others go on.
        let lock = lock(&shared.runtime_locks)
            .entry(runtime.key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if runtime.is_ready() {
            // Shared: a layer others run on is never made again here, even
            // when its disk cannot be mounted now.
            self.attach_images(std::slice::from_ref(&runtime.upper()))
                .await?;
            return Ok(runtime.upper());
        }
        let name = spec.name.to_string();
        shared.record(
            &name,
            "info",
            "runtime",
            &format!(
                "making the Node.js {major} runtime (once for every service that asks for it)"
            ),
        );
        // The platform's command, not the service's: none of its
        // environment, cache or limits beyond the defaults.
        let mut platform_spec = spec.clone();
        platform_spec.env.clear();
        platform_spec.limits = skiff_model::Limits::default();
        let mount_point = shared.mount_point();
        let resolv_conf = shared.config.state_dir.join(BUILD_RESOLV_CONF_FILE);
        let ctx = BuildContext {
            sandbox: &shared.sandbox,
            images: &shared.images,
            cache: None,
            mount_point: &mount_point,
            resolv_conf: &resolv_conf,
            log: shared.store.log_sender(&name, Some(version)),
            events: shared.events.clone(),
        };
        let id = shared.instance_id(&format!("{name}-runtime"));
        let command = build::node_runtime_command(major);
        build::run(
            &ctx,
            &platform_spec,
            &command,
            std::slice::from_ref(&base.root),
            runtime,
            &id,
        )
        .await
        .map_err(|source| DeployError::Runtime {
            runtime: format!("Node.js {major}"),
            command,
            source,
        })?;
        Ok(runtime.upper())
    }

    /// Mounts the disks of the build layers among `layers`.
    async fn attach_images(&self, layers: &[PathBuf]) -> Result<(), DeployError> {
        let store = self.shared.images.clone();
        let layers = layers.to_vec();
        tokio::task::spawn_blocking(move || store.attach(&layers))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| DeployError::ImageDisk { source })
    }

    /// Stops the service (every version), forgets its records, its image
    /// ref and its persistent files.
    pub async fn remove(&self, name: &str) -> Result<(), RemoveError> {
        let shared = &self.shared;
        let recorded = shared.store.service(name)?.is_some();
        let runtimes: Vec<(i64, Arc<ServiceRuntime>)> = {
            let mut services = write(&shared.services);
            match services.get_mut(name) {
                None if !recorded => return Err(RemoveError::Unknown(name.to_string())),
                None => Vec::new(),
                Some(e) => {
                    if let Some(d) = &e.deploying {
                        return Err(RemoveError::DeployInProgress {
                            service: name.to_string(),
                            version: d.version,
                        });
                    }
                    // The entry stays, marked, until the records are gone:
                    // a deploy of the same name meanwhile is refused.
                    e.removing = true;
                    e.failed = None;
                    e.serving
                        .take()
                        .into_iter()
                        .chain(e.draining.drain(..))
                        .collect()
                }
            }
        };
        let mut stopping = tokio::task::JoinSet::new();
        for (version, rt) in runtimes {
            shared.unpin(version);
            stopping.spawn(async move { rt.shutdown().await });
        }
        while stopping.join_next().await.is_some() {}
        let removed = shared.store.remove_service(name);
        if removed.is_ok() {
            // While the entry is still marked: a deploy of the same name is
            // refused until the files are gone, so it cannot lose its own.
            if let Err(e) = shared.images.remove_ref(name) {
                warn!("removing the image ref of {name}: {e}");
            }
            if let Err(e) = BuildCache::new(shared.build_cache_dir(name)).remove() {
                warn!("removing the build cache of {name}: {e}");
            }
            for dir in [shared.writable_dir(name), shared.users_dir(name)] {
                if let Err(e) = service::prune_versions(&dir, &[])
                    .and_then(|()| skiff_sandbox::beneath::remove_tree(&dir))
                {
                    warn!("removing {}: {e}", dir.display());
                }
            }
        }
        write(&shared.services).remove(name);
        lock(&shared.refusals).retain(|(s, _), _| s != name);
        removed?;
        shared.collect_images().await;
        Ok(())
    }

    /// What each service is doing now: those that run and those only
    /// recorded.
    pub fn list(&self) -> Result<Vec<LiveStatus>, StoreError> {
        let mut names: Vec<String> = self
            .shared
            .store
            .services()?
            .into_iter()
            .map(|s| s.name)
            .collect();
        names.extend(read(&self.shared.services).keys().cloned());
        names.sort();
        names.dedup();
        Ok(names.iter().filter_map(|n| self.status(n)).collect())
    }

    /// What `name` is doing now; `None` when it is neither running nor
    /// recorded.
    pub fn status(&self, name: &str) -> Option<LiveStatus> {
        let services = read(&self.shared.services);
        let url = self.url(name);
        let Some(entry) = services.get(name) else {
            drop(services);
            let record = self.shared.store.service(name).ok()??;
            let spec = record
                .current
                .and_then(|v| self.shared.store.version(v).ok()?)
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

/// Writes what happens to instances into the records, so `status` and
/// `logs` show it after the fact.
async fn record_events(shared: Arc<Shared>, mut events: broadcast::Receiver<Event>) {
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
            } => shared.record(
                &service,
                "info",
                "instance_started",
                &format!(
                    "started instance {instance} (sandbox {:.1}ms, app start {:.1}ms)",
                    report.sandbox.as_secs_f64() * 1000.0,
                    report.app.as_secs_f64() * 1000.0
                ),
            ),
            Event::InstanceStopped { service, instance } => shared.record(
                &service,
                "info",
                "instance_stopped",
                &format!("stopped idle instance {instance}"),
            ),
            Event::Exited {
                service,
                instance,
                exit,
            } => shared.record(
                &service,
                "error",
                "instance_exited",
                &format!("instance {instance} exited by itself ({exit})"),
            ),
            _ => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The platform's tables stay usable after a panic elsewhere poisoned a
/// lock: every writer leaves them consistent between statements.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Instance ids carry the platform's pid (`NAME-PID-N`), so that cgroups
/// left by a killed platform can be told from those of a live one.
fn instance_id(service: &str, n: u64) -> String {
    format!("{service}-{}-{n}", std::process::id())
}

/// Whether the platform that made instance `id` no longer runs.
fn owner_is_gone(id: &str) -> bool {
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
    use super::*;

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
