//! Restore: after a restart, every recorded service serves its version
//! again, from the image it was built into, without a rebuild.

use std::path::PathBuf;
use std::time::SystemTime;

use skiff_core::EventKind;
use skiff_model::ServiceSpec;
use skiff_store::StoreError;
use tracing::warn;

use crate::deploy::Stack;
use crate::errors::DeployError;
use crate::events::Event;
use crate::platform::Handle;
use crate::table::Deploying;

impl Handle {
    /// Starts, in the background, the current version of every recorded
    /// service but those in `except`: after a restart, everything that
    /// served serves again, without a rebuild. Returns the names started.
    pub fn restore(&self, except: &[String]) -> Result<Vec<String>, StoreError> {
        let mut started = Vec::new();
        for record in self.shared.ctx.store.services()? {
            if except.contains(&record.name) {
                continue;
            }
            let Some(version) = record.current else {
                continue;
            };
            let v = match self.shared.ctx.store.version(version) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                // One unreadable record must not keep the others down.
                Err(e) => {
                    let reason = format!(
                        "its recorded version {version} cannot be read ({e}); deploy it again"
                    );
                    warn!("{}: {reason}", record.name);
                    self.shared
                        .table
                        .write()
                        .entry(record.name.clone())
                        .or_default()
                        .failed = Some(reason);
                    continue;
                }
            };
            {
                let mut services = self.shared.table.write();
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
                    this.shared.ctx.record(
                        &name,
                        EventKind::RestoreFailed,
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
        let (rt, report) = match self
            .start_runtime(spec, version, layers, Stack::Later)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.shared.unpin(version);
                return Err(e);
            }
        };
        {
            let mut services = self.shared.table.write();
            let entry = services.entry(name.clone()).or_default();
            entry.deploying = None;
            entry.failed = None;
            entry.serving = Some((version, rt));
        }
        let url = self.url(&name);
        let _ = self.shared.ctx.events.send(Event::Ready {
            service: name.clone(),
            url,
            report,
        });
        self.shared.ctx.record(
            &name,
            EventKind::Restored,
            &format!("version {version} serves again after the platform's restart"),
        );
        Ok(())
    }
}
