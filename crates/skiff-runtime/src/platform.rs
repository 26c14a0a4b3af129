//! The platform: one gateway, the services deployed on it, their instances.
//! `skiff up` runs it in the foreground; the daemon will run the same code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use skiff_gateway::{Gateway, GatewayConfig, GatewayError, Route, Router, Upstream};
use skiff_model::ServiceSpec;
use skiff_sandbox::{Cgroups, Sandbox, CGROUP_ROOT};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::base::{self, BaseImageError};
use crate::build::{self, BuildContext, BuildError};
use crate::events::{Event, StartReport};
use crate::image::{self, ImageStore};
use crate::instance::StartError;
use crate::service::ServiceRuntime;

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
    /// A client must send a request's headers within this.
    pub header_read_timeout: std::time::Duration,
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
    #[error(
        "another skiff is running on the state directory {0}; stop it first, \
         or give this one its own with --state"
    )]
    StateInUse(PathBuf),
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    BaseImage(#[from] BaseImageError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Start(#[from] StartError),
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
    #[error("a service named {0:?} is already running here; give this one another name (name = \"...\" or --name)")]
    AlreadyDeployed(String),
    #[error("the platform is shutting down")]
    ShuttingDown,
    #[error("log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A service that serves.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub url: String,
    pub report: StartReport,
}

enum ServiceState {
    /// Being deployed; the runtime exists once the image does.
    Starting(Option<Arc<ServiceRuntime>>),
    Ready(Arc<ServiceRuntime>),
    Failed(String),
}

pub(crate) struct Shared {
    config: PlatformConfig,
    pub(crate) sandbox: Sandbox,
    pub(crate) events: broadcast::Sender<Event>,
    services: RwLock<HashMap<String, ServiceState>>,
    upstreams: RwLock<HashMap<String, Upstream>>,
    shutting_down: AtomicBool,
    next_instance: AtomicU64,
    gateway_addr: SocketAddr,
    images: ImageStore,
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

    pub(crate) fn register_upstream(&self, upstream: &Upstream) {
        write(&self.upstreams).insert(upstream.key.clone(), upstream.clone());
    }

    pub(crate) fn forget_upstream(&self, key: &str) {
        write(&self.upstreams).remove(key);
    }
}

impl Router for Shared {
    fn route(&self, service: &str) -> Route {
        let services = read(&self.services);
        match services.get(service) {
            Some(ServiceState::Ready(service)) => {
                let service = service.clone();
                drop(services);
                service.route()
            }
            Some(ServiceState::Starting(_)) => Route::Unavailable {
                reason:
                    "it is starting and not yet answering its health check; try again in a moment"
                        .into(),
            },
            Some(ServiceState::Failed(reason)) => Route::Unavailable {
                reason: reason.clone(),
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
            Some(ServiceState::Ready(s)) => Some(s.persistent()),
            _ => None,
        }
    }

    fn upstream(&self, key: &str) -> Option<Upstream> {
        let ups = read(&self.upstreams);
        ups.get(key).cloned()
    }
}

/// A running platform. Dropping it without [`Platform::shutdown`] still
/// kills every instance (their helpers die with this process).
pub struct Platform {
    shared: Arc<Shared>,
    gateway_stop: watch::Sender<bool>,
    gateway_task: JoinHandle<()>,
}

impl Platform {
    /// Prepares the state directory and starts the gateway.
    pub async fn start(config: PlatformConfig) -> Result<Self, PlatformError> {
        for dir in [config.state_dir.join("logs"), config.state_dir.join("mnt")] {
            std::fs::create_dir_all(&dir).map_err(|source| PlatformError::State {
                dir: dir.clone(),
                source,
            })?;
        }
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
        let swept = Cgroups::sweep(Path::new(CGROUP_ROOT), owner_is_gone);
        if !swept.is_empty() {
            info!("removed cgroups left by a platform that was killed: {swept:?}");
        }
        let listener = Gateway::bind(config.listen).await?;
        let gateway_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            sandbox: Sandbox::new(config.helper.clone()),
            config,
            events,
            services: RwLock::default(),
            upstreams: RwLock::default(),
            shutting_down: AtomicBool::new(false),
            next_instance: AtomicU64::new(1),
            gateway_addr,
            images,
            _state_lock: state_lock,
        });
        let gateway = Gateway::new(
            shared.clone(),
            GatewayConfig {
                header_read_timeout: shared.config.header_read_timeout,
                ..GatewayConfig::new(&shared.config.domain)
            },
        );
        let (gateway_stop, mut stop_rx) = watch::channel(false);
        let gateway_task = tokio::spawn(gateway.serve(listener, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }));
        Ok(Self {
            shared,
            gateway_stop,
            gateway_task,
        })
    }

    /// The address the gateway really listens on.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.shared.gateway_addr
    }

    /// Everything the platform reports from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The URL a service is reached at.
    pub fn url(&self, service: &str) -> String {
        let addr = self.shared.gateway_addr;
        let port = if addr.port() == 80 {
            String::new()
        } else {
            format!(":{}", addr.port())
        };
        format!("http://{service}.{}{port}/", self.shared.config.domain)
    }

    /// Builds the service's image (or reuses it), starts its first instance,
    /// waits until it answers, and routes to it.
    pub async fn deploy(&self, spec: &ServiceSpec) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Err(DeployError::ShuttingDown);
        }
        {
            let mut services = write(&shared.services);
            if services.contains_key(&name) {
                return Err(DeployError::AlreadyDeployed(name));
            }
            services.insert(name.clone(), ServiceState::Starting(None));
        }
        let result = self.start_service(spec).await;
        if let Err(e) = &result {
            let reason = e.to_string();
            self.set_state(&name, ServiceState::Failed(reason.clone()));
            let _ = shared.events.send(Event::Failed {
                service: name,
                reason,
            });
        }
        result
    }

    fn set_state(&self, name: &str, state: ServiceState) {
        let mut services = write(&self.shared.services);
        services.insert(name.to_string(), state);
    }

    async fn start_service(&self, spec: &ServiceSpec) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let events = shared.events.clone();
        let base = base::ensure(&shared.config.cache_dir, &shared.config.mirror, |line| {
            let _ = events.send(Event::BaseImage {
                line: line.to_string(),
            });
        })
        .await?;
        let _ = shared.events.send(Event::BaseImageReady {
            built_in: base.built_in,
        });

        let layers = self.image(spec, &base, &shared.mount_point()).await?;
        let log_file = open_log(&shared.config.state_dir, &format!("{name}.log"))?;
        let service = ServiceRuntime::new(spec.clone(), layers.clone(), shared.clone(), log_file)
            .map_err(|source| DeployError::Writable {
            dir: shared.writable_dir(&name),
            source,
        })?;
        // Registered while it starts, so that a shutdown stops it too.
        self.set_state(&name, ServiceState::Starting(Some(service.clone())));
        let report = match service.start_first().await {
            Ok(report) => report,
            Err(e) => {
                service.shutdown().await;
                return Err(e.into());
            }
        };
        self.collect_images(&name, layers).await;
        self.set_state(&name, ServiceState::Ready(service));
        let url = self.url(&name);
        let _ = shared.events.send(Event::Ready {
            service: name.clone(),
            url: url.clone(),
            report,
        });
        Ok(Deployed { url, report })
    }

    /// Records the image `service` now runs on and removes images no
    /// service uses any more.
    async fn collect_images(&self, service: &str, layers: Vec<PathBuf>) {
        let store = self.shared.images.clone();
        let service = service.to_string();
        match tokio::task::spawn_blocking(move || {
            let refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
            store.set_ref_and_collect(&service, &refs)
        })
        .await
        {
            Ok(Ok(removed)) if !removed.is_empty() => info!("removed unused images: {removed:?}"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("collecting unused images: {e}"),
            Err(e) => warn!("collecting unused images: {e}"),
        }
    }

    /// The service's image, top layer first: its build layer (built now,
    /// or reused when the same source, build command and base were built
    /// before), its source snapshot, the base.
    async fn image(
        &self,
        spec: &ServiceSpec,
        base: &base::BaseImage,
        mount_point: &Path,
    ) -> Result<Vec<PathBuf>, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
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
        let Some(build) = &spec.build else {
            return Ok(vec![source.dir, base.root.clone()]);
        };
        let image = shared
            .images
            .image_for(&base::image_dir_name(), &source, build, &spec.env);
        let lower = vec![source.dir.clone(), base.root.clone()];
        if image.is_ready() {
            let _ = shared.events.send(Event::BuildFinished {
                service: name,
                elapsed: None,
                written: None,
                layer_size: image::tree_size(&image.upper()),
            });
        } else {
            let ctx = BuildContext {
                sandbox: &shared.sandbox,
                mount_point,
                log_file: open_log(&shared.config.state_dir, &format!("{name}.build.log"))?,
                events: shared.events.clone(),
            };
            let id = shared.instance_id(&format!("{name}-build"));
            let report = build::run(&ctx, spec, build, &lower, &image, &id).await?;
            let _ = shared.events.send(Event::BuildFinished {
                service: name,
                elapsed: Some(report.elapsed),
                written: Some(report.written),
                layer_size: report.layer_size,
            });
        }
        Ok([vec![image.upper()], lower].concat())
    }

    /// Stops every instance (SIGTERM, then SIGKILL after a grace period),
    /// removes their cgroups and stops the gateway. Nothing is left running.
    pub async fn shutdown(self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let services: Vec<Arc<ServiceRuntime>> = read(&self.shared.services)
            .values()
            .filter_map(|s| match s {
                ServiceState::Ready(rt) | ServiceState::Starting(Some(rt)) => Some(rt.clone()),
                _ => None,
            })
            .collect();
        // All at once: each may wait its instances' grace period.
        let mut stopping = tokio::task::JoinSet::new();
        for service in services {
            stopping.spawn(async move { service.shutdown().await });
        }
        while stopping.join_next().await.is_some() {}
        let _ = self.gateway_stop.send(true);
        let _ = self.gateway_task.await;
    }
}

fn open_log(state_dir: &Path, file: &str) -> Result<Arc<Mutex<std::fs::File>>, DeployError> {
    let path = state_dir.join("logs").join(file);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(|f| Arc::new(Mutex::new(f)))
        .map_err(|source| DeployError::Log { path, source })
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
        Ok(pid) => pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => false,
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
}
