//! Deploy: the base, the image (built or reused), the first instance
//! answering; then the switch of traffic and the old version's drain.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use skiff_core::{EventKind, StartReport};
use skiff_model::ServiceSpec;
use tracing::warn;

use crate::context::lock;
use crate::errors::DeployError;
use crate::events::Event;
use crate::images::base;
use crate::images::build::{self, BuildContext};
use crate::images::build_cache::BuildCache;
use crate::images::image;
use crate::platform::{Deployed, Handle};
use crate::service::ServiceRuntime;
use crate::table::Deploying;
use skiff_store::VersionState;

/// How many versions that served before keep their images, so that a
/// rollback to them needs no build (`Shared::collect_images`).
pub(crate) const ROLLBACK_IMAGES: usize = 3;

/// When a new runtime stacks its image's layers (`ServiceRuntime::stack_layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stack {
    /// Before its first start: a deploy, one at a time.
    First,
    /// Before its first spare: a restart, where every version starts at once.
    Later,
}

impl Handle {
    /// Builds `spec` (or reuses its image), starts its first instance and
    /// waits until it answers; then routes to it. A service that already
    /// serves keeps serving its old version until the new one answers, and
    /// keeps it when the new one fails; the old version then answers what it
    /// accepted and stops.
    pub async fn deploy(&self, spec: &ServiceSpec) -> Result<Deployed, DeployError> {
        self.new_version(spec, None).await
    }

    /// Serves an earlier version's image again, as a new version with its
    /// settings (`to`, or the last one that served before the serving
    /// one), without building: the same switch as a deploy, so no request
    /// fails, and the same failure rule (the serving version stays).
    pub async fn rollback(&self, name: &str, to: Option<i64>) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let no = |reason: String| DeployError::NoRollback {
            service: name.to_string(),
            reason,
        };
        // Chosen, checked and pinned under the lock garbage collection
        // takes: the image cannot go between the check and the start.
        let (target, layers, pin) = {
            let _collection = shared.images_lock.lock().await;
            let current = shared
                .ctx
                .store
                .service(name)?
                .ok_or_else(|| no("no such service is deployed".into()))?
                .current;
            let versions = shared.ctx.store.versions(name, u32::MAX)?;
            let target = match to {
                Some(v) => versions.into_iter().find(|r| r.id == v).ok_or_else(|| {
                    no(format!("it has no version {v} (see `skiff status {name}`)"))
                })?,
                None => versions
                    .into_iter()
                    .filter(|r| r.state == VersionState::Replaced && Some(r.id) != current)
                    .max_by_key(|r| r.id)
                    .ok_or_else(|| no("no earlier version served".into()))?,
            };
            if Some(target.id) == current {
                return Err(no(format!("version {} is the one serving", target.id)));
            }
            if target.state != VersionState::Replaced {
                return Err(no(format!(
                    "version {} never served ({}); only a version that served can serve again",
                    target.id,
                    target.state.as_str()
                )));
            }
            let layers = target.layers.clone().unwrap_or_default();
            if let Some(gone) = layers.iter().find(|l| !l.exists()) {
                return Err(no(format!(
                    "the image of version {} is gone ({}): skiff keeps the images of the \
                     last {ROLLBACK_IMAGES} versions that served; deploy that source again",
                    target.id,
                    gone.display()
                )));
            }
            // Pinned under a key of its own until the new version pins it.
            static NEXT_PIN: AtomicI64 = AtomicI64::new(-1);
            let pin = NEXT_PIN.fetch_sub(1, Ordering::SeqCst);
            shared.pin(pin, layers.clone());
            (target, layers, pin)
        };
        let result = self
            .new_version(&target.spec, Some((target.id, layers)))
            .await;
        shared.unpin(pin);
        result
    }

    /// A new version of `spec`: built from its source, or on the recorded
    /// image of the version `from` (a rollback).
    async fn new_version(
        &self,
        spec: &ServiceSpec,
        from: Option<(i64, Vec<PathBuf>)>,
    ) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Err(DeployError::ShuttingDown);
        }
        {
            let mut services = shared.table.write();
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
        if from.is_some() {
            match shared.ctx.store.service(&name) {
                Ok(Some(_)) => {}
                // Removed since the rollback chose its version: it stays removed.
                Ok(None) => {
                    shared.table.forget(&name);
                    return Err(DeployError::NoRollback {
                        service: name,
                        reason: "it was removed meanwhile".into(),
                    });
                }
                Err(e) => {
                    self.deploy_failed(&name, &e.to_string());
                    return Err(e.into());
                }
            }
        }
        let version = match shared.ctx.store.begin_version(spec) {
            Ok(v) => v,
            Err(e) => {
                self.deploy_failed(&name, &e.to_string());
                return Err(e.into());
            }
        };
        if let Some(d) = shared
            .table
            .write()
            .get_mut(&name)
            .and_then(|e| e.deploying.as_mut())
        {
            d.version = version;
        }
        let started = match &from {
            None => format!("deploying version {version}"),
            Some((earlier, _)) => {
                format!("rolling back to version {earlier}'s image as version {version}")
            }
        };
        shared.ctx.record(&name, EventKind::DeployStarted, &started);
        let result = self
            .make_version(spec, version, from.map(|(_, layers)| layers))
            .await;
        match &result {
            Ok(_) => shared.ctx.record(
                &name,
                EventKind::Deployed,
                &format!("version {version} serves"),
            ),
            Err(e) => {
                let reason = e.to_string();
                shared.unpin(version);
                shared.table.prune_versions(&name);
                if let Err(e) = shared.ctx.store.fail_version(version, &reason) {
                    warn!("recording the failure of {name} version {version}: {e}");
                }
                self.deploy_failed(&name, &reason);
                shared.ctx.record(
                    &name,
                    EventKind::DeployFailed,
                    &format!("version {version} failed: {reason}"),
                );
                let _ = shared.ctx.events.send(Event::Failed {
                    service: name.clone(),
                    reason,
                });
            }
        }
        result
    }

    /// The deploy is over without a new version: what served still does;
    /// if nothing did, the service is failed with `reason`.
    pub(crate) fn deploy_failed(&self, name: &str, reason: &str) {
        let mut services = self.shared.table.write();
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
        let events = shared.ctx.events.clone();
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
        let _ = shared.ctx.events.send(Event::BaseImageReady {
            built_in: base.built_in,
        });
        Ok(base)
    }

    /// Version `version` of `spec`: its image built (or reused), or, for a
    /// rollback, the `recorded` one; then the switch to it.
    async fn make_version(
        &self,
        spec: &ServiceSpec,
        version: i64,
        recorded: Option<Vec<PathBuf>>,
    ) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let (layers, build) = match recorded {
            None => {
                let base = self.base_image(spec).await?;
                self.image(spec, version, &base).await?
            }
            // No build: the layers of a version that served.
            Some(layers) => {
                shared.pin(version, layers.clone());
                self.attach_images(&layers).await?;
                (layers, None)
            }
        };
        shared.ctx.store.set_layers(version, &layers, build)?;
        self.switch_to(spec, version, layers).await
    }

    /// Starts `version` on `layers` and, once it answers, routes to it;
    /// the version before drains and stops.
    async fn switch_to(
        &self,
        spec: &ServiceSpec,
        version: i64,
        layers: Vec<PathBuf>,
    ) -> Result<Deployed, DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let (rt, report) = self
            .start_runtime(spec, version, layers.clone(), Stack::First)
            .await?;
        if let Err(e) = shared
            .ctx
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
            let mut services = shared.table.write();
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
                    this.shared.ctx.record(
                        &old.name,
                        EventKind::DrainTimeout,
                        &format!(
                            "version {old_version} still had requests in flight after {}; \
                             they were cut off when it stopped",
                            humantime::format_duration(old.drain_limit())
                        ),
                    );
                }
                old.shutdown().await;
                if let Some(entry) = this.shared.table.write().get_mut(&old.name) {
                    entry.draining.retain(|(v, _)| *v != old_version);
                }
                this.shared.unpin(old_version);
                this.shared.table.prune_versions(&old.name);
            }
            this.shared.collect_images().await;
        });
        let url = self.url(&name);
        let _ = shared.ctx.events.send(Event::Ready {
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
    pub(crate) async fn start_runtime(
        &self,
        spec: &ServiceSpec,
        version: i64,
        layers: Vec<PathBuf>,
        stack: Stack,
    ) -> Result<(Arc<ServiceRuntime>, StartReport), DeployError> {
        let shared = &self.shared;
        let name = spec.name.to_string();
        let log = shared.ctx.store.log_sender(&name, Some(version));
        let rt = ServiceRuntime::new(spec.clone(), version, layers, shared.ctx.clone(), log)
            .map_err(|source| DeployError::Writable {
                dir: shared.ctx.writable_dir(&name),
                source,
            })?;
        let stopping = {
            // Registered and checked under the lock shutdown snapshots
            // under: either shutdown sees this runtime, or this sees the flag.
            let mut services = shared.table.write();
            if let Some(d) = services.get_mut(&name).and_then(|e| e.deploying.as_mut()) {
                d.runtime = Some(rt.clone());
            }
            shared.shutting_down.load(Ordering::SeqCst)
        };
        if stopping {
            rt.shutdown().await;
            return Err(DeployError::ShuttingDown);
        }
        if stack == Stack::First {
            rt.stack_layers().await;
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
            shared.ctx.metrics.build(&name, "reused", None);
            let _ = shared.ctx.events.send(Event::BuildFinished {
                service: name,
                elapsed: None,
                written: None,
                layer_size: image::tree_size(&image.upper()),
            });
        } else {
            let mount_point = shared.ctx.mount_point();
            let resolv_conf = shared.ctx.build_resolv_conf();
            let cache = BuildCache::new(shared.ctx.build_cache_dir(&name));
            let ctx = BuildContext {
                sandbox: &shared.ctx.sandbox,
                images: &shared.images,
                cache: Some(&cache),
                mount_point: &mount_point,
                resolv_conf: &resolv_conf,
                log: shared.ctx.store.log_sender(&name, Some(version)),
                events: shared.ctx.events.clone(),
            };
            let id = shared.ctx.instance_id(&format!("{name}-build"));
            let began = std::time::Instant::now();
            let ran = build::run(&ctx, spec, build, &lower, &image, &id).await;
            let result = if ran.is_ok() { "built" } else { "failed" };
            shared
                .ctx
                .metrics
                .build(&name, result, Some(began.elapsed()));
            let report = ran?;
            elapsed = Some(report.elapsed);
            let _ = shared.ctx.events.send(Event::BuildFinished {
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
        runtime: &crate::images::image::ImageDir,
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
        shared.ctx.record(
            &name,
            EventKind::RuntimeMade,
            &format!(
                "making the Node.js {major} runtime (once for every service that asks for it)"
            ),
        );
        // The platform's command, not the service's: none of its
        // environment, cache or limits beyond the defaults.
        let mut platform_spec = spec.clone();
        platform_spec.env.clear();
        platform_spec.limits = skiff_model::Limits::default();
        let mount_point = shared.ctx.mount_point();
        let resolv_conf = shared.ctx.build_resolv_conf();
        let ctx = BuildContext {
            sandbox: &shared.ctx.sandbox,
            images: &shared.images,
            cache: None,
            mount_point: &mount_point,
            resolv_conf: &resolv_conf,
            log: shared.ctx.store.log_sender(&name, Some(version)),
            events: shared.ctx.events.clone(),
        };
        let id = shared.ctx.instance_id(&format!("{name}-runtime"));
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
    pub(crate) async fn attach_images(&self, layers: &[PathBuf]) -> Result<(), DeployError> {
        let store = self.shared.images.clone();
        let layers = layers.to_vec();
        tokio::task::spawn_blocking(move || store.attach(&layers))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| DeployError::ImageDisk { source })
    }
}
