//! One file per subcommand; this one holds the flags they share.

mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "skiff", version, about = "A self-hostable serverless runtime")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform in the foreground and deploy DIR (default `.`);
    /// Ctrl-C stops everything.
    Up(up::UpArgs),
}

/// Flags every platform command takes.
#[derive(Debug, Args)]
pub struct PlatformArgs {
    /// Gateway address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8000", env = "SKIFF_LISTEN")]
    pub listen: SocketAddr,
    /// All platform state (logs, mount points).
    #[arg(long, env = "SKIFF_STATE")]
    pub state: Option<PathBuf>,
    /// Where the base image is cached, shared between runs.
    #[arg(long, env = "SKIFF_CACHE")]
    pub cache: Option<PathBuf>,
    /// Services are reached at NAME.<domain>.
    #[arg(long, default_value = "localhost", env = "SKIFF_DOMAIN")]
    pub domain: String,
    /// How long a client may take to send a request's headers (slow
    /// clients are cut off after it).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "SKIFF_HEADER_TIMEOUT")]
    pub header_timeout: std::time::Duration,
    /// Debian mirror used once to build the base image.
    #[arg(
        long,
        default_value = "http://deb.debian.org/debian",
        env = "SKIFF_DEBIAN_MIRROR"
    )]
    pub mirror: String,
}

impl PlatformArgs {
    pub fn config(&self) -> anyhow::Result<skiff_runtime::PlatformConfig> {
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!(
                "skiff needs root to create sandboxes (namespaces, mounts, cgroups); \
                 run it as root, e.g. with sudo"
            );
        }
        let helper = std::env::current_exe().context("cannot find the skiff binary itself")?;
        Ok(skiff_runtime::PlatformConfig {
            state_dir: self
                .state
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/lib/skiff")),
            cache_dir: self
                .cache
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/cache/skiff")),
            listen: self.listen,
            domain: self.domain.trim_matches('.').to_ascii_lowercase(),
            helper,
            mirror: self.mirror.clone(),
            header_read_timeout: self.header_timeout,
        })
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    skiff_model::parse_duration(s)
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Up(args) => runtime.block_on(up::run(args)),
    }
}
