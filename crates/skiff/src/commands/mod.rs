//! One file per subcommand; this one holds the flags they share.

mod client;
mod deploy;
mod doctor;
mod logs;
mod ls;
mod rm;
mod rollback;
mod serve;
mod status;
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
    /// Run the platform as a long-lived daemon: gateway, control API,
    /// runtime; services deployed before are started again.
    Serve(serve::ServeArgs),
    /// Build and (re)deploy DIR (default `.`) to the running daemon; exits
    /// non-zero with the reason when the build, start or health check fails.
    Deploy(deploy::DeployArgs),
    /// Services with their state, instance counts and URL.
    Ls(ls::LsArgs),
    /// One service: state, instances, versions, last errors with their
    /// explanation.
    Status(status::StatusArgs),
    /// Build and runtime logs of a service; -f follows.
    Logs(logs::LogsArgs),
    /// Stop and remove a service and its data.
    Rm(rm::RmArgs),
    /// Serve an earlier version's image again (default: the version
    /// before the serving one), without building; the switch is a
    /// redeploy's.
    Rollback(rollback::RollbackArgs),
    /// Diagnose a service against the common errors: cause and fix for
    /// each finding, and where the time of its starts went.
    Doctor(doctor::DoctorArgs),
}

/// The manifest fields the command line overrides (the README).
#[derive(Debug, Args)]
pub struct OverrideArgs {
    /// Service name (overrides `name` in skiff.toml).
    #[arg(long)]
    pub name: Option<String>,
    /// Build command (overrides `build`).
    #[arg(long)]
    pub build: Option<String>,
    /// Start command (overrides `start`).
    #[arg(long)]
    pub start: Option<String>,
    /// Port the service listens on (overrides `port`).
    #[arg(long)]
    pub port: Option<u32>,
    /// serverless or persistent (overrides `mode`).
    #[arg(long)]
    pub mode: Option<String>,
}

impl OverrideArgs {
    pub fn overrides(&self) -> skiff_model::Overrides {
        skiff_model::Overrides {
            name: self.name.clone(),
            build: self.build.clone(),
            start: self.start.clone(),
            port: self.port,
            mode: self.mode.clone(),
        }
    }
}

/// Flags every platform command takes.
#[derive(Debug, Args)]
pub struct PlatformArgs {
    /// Gateway address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8000", env = "SKIFF_LISTEN")]
    pub listen: SocketAddr,
    /// Control API address (keep it on loopback unless you mean it);
    /// port 0 picks a free port. The CLI finds it in the state directory.
    #[arg(long, default_value = "127.0.0.1:7070", env = "SKIFF_API")]
    pub api: SocketAddr,
    /// Largest source upload the control API accepts.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, env = "SKIFF_MAX_UPLOAD")]
    pub max_upload: u64,
    /// All platform state (logs, mount points).
    #[arg(long, env = "SKIFF_STATE")]
    pub state: Option<PathBuf>,
    /// Where the base image is cached, shared between runs.
    #[arg(long, env = "SKIFF_CACHE")]
    pub cache: Option<PathBuf>,
    /// Services are reached at NAME.<domain>.
    #[arg(long, default_value = "localhost", env = "SKIFF_DOMAIN")]
    pub domain: String,
    /// How long a client may take to send a request's head, and a new
    /// connection its first request (slow or silent clients are cut off
    /// after it).
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "SKIFF_HEADER_TIMEOUT")]
    pub header_timeout: std::time::Duration,
    /// How long a kept-alive gateway connection may wait for its next
    /// request before it is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "SKIFF_IDLE_TIMEOUT")]
    pub idle_timeout: std::time::Duration,
    /// Slowest a serverless request's body may arrive, per second, after
    /// --header-timeout of grace (0: only the request timeout applies).
    #[arg(long, default_value = "1KiB", value_parser = parse_size, env = "SKIFF_MIN_BODY_RATE")]
    pub min_body_rate: u64,
    /// Most client connections the gateway holds at once (default: from
    /// the open-file limit, leaving room for instances, logs, the
    /// database).
    #[arg(long, env = "SKIFF_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most gateway connections from one client address (IPv6: one /64)
    /// (default: an eighth of --max-connections; clients behind one NAT
    /// share an address).
    #[arg(long, env = "SKIFF_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,
    /// A proxy in front of the gateway whose X-Forwarded-For is kept and
    /// appended to, as an address or range (repeatable; the variable takes
    /// a comma-separated list); anyone else's is replaced by their address.
    #[arg(
        long = "trusted-proxy",
        value_name = "CIDR",
        env = "SKIFF_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<skiff_gateway::Cidr>,
    /// Keep a record of each request (`skiff logs NAME --requests`): `on`
    /// or `off` (requests still get their x-request-id).
    #[arg(
        long,
        default_value = "on",
        value_parser = parse_switch,
        action = clap::ArgAction::Set,
        env = "SKIFF_REQUEST_LOG"
    )]
    pub request_log: bool,
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
        let connections = self.connection_limits(raise_open_files());
        let domain = self.domain.trim_matches('.').to_ascii_lowercase();
        let gateway = skiff_gateway::GatewayConfig {
            header_read_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            min_body_rate: self.min_body_rate,
            connections,
            trusted_proxies: self.trusted_proxies.clone().into(),
            request_log: self.request_log,
            ..skiff_gateway::GatewayConfig::new(&domain)
        };
        Ok(skiff_runtime::PlatformConfig {
            state_dir: self
                .state
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE)),
            cache_dir: self
                .cache
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/cache/skiff")),
            listen: self.listen,
            domain,
            helper,
            mirror: self.mirror.clone(),
            gateway,
            gateway_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

impl PlatformArgs {
    /// The gateway's connection caps: the flags, else what fits `open_files`.
    fn connection_limits(&self, open_files: OpenFiles) -> skiff_gateway::ConnectionLimits {
        let derived = skiff_gateway::ConnectionLimits::for_descriptors(open_files.limit);
        let total = self.max_connections.unwrap_or(derived.total).max(1);
        let per_address = self
            .max_connections_per_address
            .unwrap_or(if self.max_connections.is_some() {
                (total / 8).max(8)
            } else {
                derived.per_address
            })
            .clamp(1, total);
        let caps = skiff_gateway::ConnectionLimits { total, per_address };
        let raised = match open_files.was {
            Some(was) => format!(" (raised from {was})"),
            None => String::new(),
        };
        eprintln!(
            "skiff: open-file limit {}{raised}: the gateway holds at most {} client \
             connections, {} per address",
            open_files.limit, caps.total, caps.per_address
        );
        if caps.total.saturating_mul(2) > usize::try_from(open_files.limit).unwrap_or(usize::MAX) {
            tracing::warn!(
                "--max-connections {} is more than half the open-file limit of {}: a flood \
                 of connections can leave none for instances, logs and the database; lower it",
                caps.total,
                open_files.limit
            );
        }
        caps
    }
}

/// The process's open-file limit, and what it was before skiff raised it.
#[derive(Debug, Clone, Copy)]
pub struct OpenFiles {
    pub limit: u64,
    pub was: Option<u64>,
}

/// Raises the soft open-file limit to the hard one (the most a process
/// may without CAP_SYS_RESOURCE, and often far above the soft 1024):
/// every client connection, pooled instance connection, log pipe and
/// sandbox takes descriptors. Returns what the process has.
pub fn raise_open_files() -> OpenFiles {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return OpenFiles {
            limit: 1024,
            was: None,
        };
    };
    // An unlimited hard limit still stops at the kernel's nr_open.
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(most);
    if soft >= target {
        return OpenFiles {
            limit: soft,
            was: None,
        };
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => OpenFiles {
            limit: target,
            was: Some(soft),
        },
        Err(e) => {
            tracing::warn!(
                "cannot raise the open-file limit from {soft} to {hard}: {e}; the gateway's \
                 connection caps follow {soft}"
            );
            OpenFiles {
                limit: soft,
                was: None,
            }
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    skiff_model::parse_size(s)
}

/// The default state directory, as the README gives it.
pub const DEFAULT_STATE: &str = "/var/lib/skiff";

/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
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

/// Says what the source showed: which start command was found when the
/// manifest gave none, and a framework a serverless service cannot serve.
fn say_what_the_source_shows(spec: &skiff_model::ServiceSpec) {
    if let Some(from) = &spec.start_from {
        eprintln!(
            "skiff: {}: no start command in skiff.toml; starting it with `{}` (from {from})",
            spec.name, spec.start
        );
    }
    if spec.node_by_default {
        eprintln!(
            "skiff: {}: a Node.js service: running it on Node.js {} (the current LTS; \
             runtime = \"node@<major>\" in skiff.toml chooses another)",
            spec.name,
            spec.node.unwrap_or_default()
        );
    }
    if let Some(hint) = skiff_model::streaming_hint(spec) {
        eprintln!("skiff: {}: warning: {hint}", spec.name);
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Up(_) | Command::Serve(_)) {
        skiff_sandbox::end_quietly_on_closed_output();
    }
    if matches!(cli.command, Command::Up(_) | Command::Serve(_)) {
        // Before any thread: the disks the platform mounts stay in a mount
        // namespace of its own, gone with the process however it ends.
        skiff_sandbox::own_mount_namespace().context(
            "cannot give the platform a mount namespace of its own; skiff up and skiff \
             serve run as root",
        )?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Up(args) => runtime.block_on(up::run(args)),
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Deploy(args) => runtime.block_on(deploy::run(args)),
        Command::Ls(args) => runtime.block_on(ls::run(args)),
        Command::Status(args) => runtime.block_on(status::run(args)),
        Command::Logs(args) => runtime.block_on(logs::run(args)),
        Command::Rm(args) => runtime.block_on(rm::run(args)),
        Command::Rollback(args) => runtime.block_on(rollback::run(args)),
        Command::Doctor(args) => runtime.block_on(doctor::run(args)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        platform: PlatformArgs,
    }

    #[test]
    fn the_request_log_is_on_unless_switched_off() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("skiff").chain(args.iter().copied()))
                .map(|c| c.platform.request_log)
        };
        assert!(parse(&[]).unwrap());
        assert!(!parse(&["--request-log", "off"]).unwrap());
        assert!(parse(&["--request-log=on"]).unwrap());
        let wrong = parse(&["--request-log", "maybe"]).unwrap_err().to_string();
        assert!(wrong.contains("neither on nor off"), "{wrong}");
    }
}
