//! The table of services: which version of each serves, which deploys,
//! which drain; and the gateway's view of it (`Router`): where a request
//! for a service goes, and what is recorded when the gateway refuses one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use skiff_core::EventKind;
use skiff_gateway::{ErrorKind, ExchangeLimits, Route, Router, Upstream};
use tracing::warn;

use crate::context::{self, lock, read, write, Context};
use crate::service::{self, ServiceRuntime};

/// A deploy (or a restore) under way.
pub(crate) struct Deploying {
    pub(crate) version: i64,
    /// Exists once the image does, so that a shutdown stops it too.
    pub(crate) runtime: Option<Arc<ServiceRuntime>>,
    pub(crate) since: SystemTime,
}

/// What the platform runs of one service.
#[derive(Default)]
pub(crate) struct Entry {
    /// The version the gateway routes to.
    pub(crate) serving: Option<(i64, Arc<ServiceRuntime>)>,
    pub(crate) deploying: Option<Deploying>,
    /// Why nothing serves (the last deploy or restore failed).
    pub(crate) failed: Option<String>,
    /// Replaced versions answering what they accepted before they stop.
    pub(crate) draining: Vec<(i64, Arc<ServiceRuntime>)>,
    /// `skiff rm` is stopping it: no deploy may start meanwhile.
    pub(crate) removing: bool,
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

    /// Every runtime of the service: serving, deploying, draining.
    pub(crate) fn runtimes(&self) -> Vec<Arc<ServiceRuntime>> {
        let deploying = self.deploying.as_ref().and_then(|d| d.runtime.clone());
        self.serving
            .iter()
            .map(|(_, rt)| rt.clone())
            .chain(deploying)
            .chain(self.draining.iter().map(|(_, rt)| rt.clone()))
            .collect()
    }
}

/// One kind of gateway refusal of one service: when it was last recorded,
/// how many came since.
type Refusals = (Option<Instant>, u32);

/// How often one kind of gateway refusal is recorded per service.
const REFUSAL_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Table {
    ctx: Arc<Context>,
    services: RwLock<HashMap<String, Entry>>,
    /// Gateway refusals per service and kind: when last recorded, how
    /// many since.
    refusals: Mutex<HashMap<(String, &'static str), Refusals>>,
}

impl Table {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            services: RwLock::default(),
            refusals: Mutex::default(),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Entry>> {
        read(&self.services)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Entry>> {
        write(&self.services)
    }

    /// Forgets `service` and what was counted of its refusals.
    pub(crate) fn forget(&self, service: &str) {
        self.write().remove(service);
        lock(&self.refusals).retain(|(s, _), _| s != service);
    }

    /// Removes what `service`'s versions that no longer run kept per
    /// version: persistent writable layers, account files.
    pub(crate) fn prune_versions(&self, service: &str) {
        let keep = self
            .read()
            .get(service)
            .map(Entry::live_versions)
            .unwrap_or_default();
        for dir in [self.ctx.writable_dir(service), self.ctx.users_dir(service)] {
            if let Err(e) = service::prune_versions(&dir, &keep) {
                warn!(
                    "removing what old versions of {service} kept in {}: {e}",
                    dir.display()
                );
            }
        }
    }
}

impl Table {
    /// `f` of the version `service` serves, under the read lock.
    fn with_serving<T>(&self, service: &str, f: impl FnOnce(&ServiceRuntime) -> T) -> Option<T> {
        let services = self.read();
        let (_, rt) = services.get(service)?.serving.as_ref()?;
        Some(f(rt))
    }
}

impl Router for Table {
    fn route(&self, service: &str) -> Route {
        let services = self.read();
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
        self.with_serving(service, ServiceRuntime::persistent)
    }

    fn exists(&self, service: &str) -> bool {
        self.read().contains_key(service)
    }

    fn upstream(&self, key: &str) -> Option<Upstream> {
        self.ctx.upstream(key)
    }

    fn limits(&self, service: &str) -> Option<ExchangeLimits> {
        self.with_serving(service, ServiceRuntime::exchange_limits)
    }

    fn refused(&self, service: &str, kind: ErrorKind, message: &str) {
        if !self.read().contains_key(service) {
            return;
        }
        // At most one record per service and kind a second: a client
        // hammering a limit must not turn into a database write per request.
        let now = Instant::now();
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
        let store = self.ctx.store.clone();
        let service = service.to_string();
        self.ctx.runtime.spawn_blocking(move || {
            context::record(&store, &service, EventKind::Refused(kind), &message)
        });
    }
}
