//! `skiff serve`: the platform as a long-running daemon. Services deployed
//! before (recorded in the state directory) are started again; the control
//! API takes deploys from `skiff deploy`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use skiff_runtime::{Handle, Platform};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use super::client::{ADDRESS_FILE, TOKEN_FILE};
use super::PlatformArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub platform: PlatformArgs,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.platform.config()?;
    let state = config.state_dir.clone();
    let platform = Platform::start(config).await?;
    let api = start_api(&platform.handle(), &args.platform, &state)
        .await
        .map_err(anyhow::Error::msg)?;
    let restored = platform.restore(&[])?;
    eprintln!(
        "skiff: serving services on http://{} (NAME.{}), control API on http://{}",
        platform.gateway_addr(),
        platform.domain(),
        api.addr
    );
    if !restored.is_empty() {
        eprintln!("skiff: starting again: {}", restored.join(", "));
    }
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    eprintln!("skiff: stopping: answering requests in flight, then stopping every instance");
    api.stop().await;
    platform.shutdown().await;
    let _ = std::fs::remove_file(state.join(ADDRESS_FILE));
    eprintln!("skiff: stopped");
    Ok(ExitCode::SUCCESS)
}

/// The control API while it runs.
pub struct RunningApi {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningApi {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Starts the control API: a token in the state directory (kept across
/// restarts, so clients holding it go on working; readable by root only),
/// and the address it listens on next to it, for the CLI to find.
pub async fn start_api(
    platform: &Handle,
    args: &PlatformArgs,
    state: &Path,
) -> Result<RunningApi, String> {
    let token = ensure_token(&state.join(TOKEN_FILE)).map_err(|e| {
        format!(
            "cannot create the API token in {}: {e}; check that the state directory is \
             writable, or pass another with --state",
            state.display()
        )
    })?;
    let listener = skiff_api::server::bind(args.api).await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::fs::write(state.join(ADDRESS_FILE), format!("{addr}\n"))
        .map_err(|e| format!("cannot write {}: {e}", state.join(ADDRESS_FILE).display()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = skiff_api::ApiConfig {
        token,
        uploads: state.join("uploads"),
        max_upload: args.max_upload,
    };
    // Uploads left by a daemon that was killed mid-deploy.
    let _ = skiff_runtime::remove_tree(&config.uploads);
    let task = tokio::spawn(skiff_api::server::serve(
        listener,
        platform.clone(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(RunningApi { addr, stop, task })
}

/// The token in `path`, made now (32 random bytes, hex) when there is none.
fn ensure_token(path: &Path) -> std::io::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        if t.trim().len() >= 32 {
            return Ok(t.trim().to_string());
        }
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(token)
}
