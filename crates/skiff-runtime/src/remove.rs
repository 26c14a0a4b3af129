//! Remove: every version stopped, the records, image ref, build cache and
//! persistent files of a service gone.

use std::sync::Arc;

use tracing::warn;

use crate::errors::RemoveError;
use crate::images::build_cache::BuildCache;
use crate::platform::Handle;
use crate::service::{self, ServiceRuntime};

impl Handle {
    /// Stops the service (every version), forgets its records, its image
    /// ref and its persistent files.
    pub async fn remove(&self, name: &str) -> Result<(), RemoveError> {
        let shared = &self.shared;
        let recorded = shared.ctx.store.service(name)?.is_some();
        let runtimes: Vec<(i64, Arc<ServiceRuntime>)> = {
            let mut services = shared.table.write();
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
        let removed = shared.ctx.store.remove_service(name);
        if removed.is_ok() {
            // While the entry is still marked: a deploy of the same name is
            // refused until the files are gone, so it cannot lose its own.
            if let Err(e) = shared.images.remove_ref(name) {
                warn!("removing the image ref of {name}: {e}");
            }
            if let Err(e) = BuildCache::new(shared.ctx.build_cache_dir(name)).remove() {
                warn!("removing the build cache of {name}: {e}");
            }
            for dir in [shared.ctx.writable_dir(name), shared.ctx.users_dir(name)] {
                if let Err(e) = service::prune_versions(&dir, &[])
                    .and_then(|()| skiff_sandbox::beneath::remove_tree(&dir))
                {
                    warn!("removing {}: {e}", dir.display());
                }
            }
        }
        shared.table.forget(name);
        if removed.is_ok() {
            // Once the gateway routes to it no more (a request counted
            // after this is dropped at the next scrape).
            shared.ctx.metrics.forget(name);
        }
        removed?;
        shared.collect_images().await;
        Ok(())
    }
}
