//! Running a service's build command as root in a build sandbox whose
//! writes become the image's top layer (docs/contract.md §1.1).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_core::Phase;
use skiff_model::{format_amount, format_duration, format_size, ServiceSpec};
use skiff_sandbox::{
    disk, outbound, Bind, CgroupLimits, Exit, Identity, Network, Sandbox, SandboxConfig,
    SandboxError, WritableLayer,
};
use tokio::sync::broadcast;

use crate::events::Event;
use crate::images::base::{which, APP_PATH};
use crate::images::build_cache::{self, BuildCache};
use crate::images::image::{tree_size, ImageDir, ImageStore};
use crate::instance::{command_environment, format_findings, push_tail, LogSink, Tail};
use skiff_store::LogSender;

/// What a build leaves that no instance needs: package-manager downloads,
/// indexes and caches. Each directory's contents are removed at the end of
/// the build, inside the build sandbox (see [`build_argv`]); `/tmp` is the
/// build's own tmpfs and never reaches the layer.
const DROPPED_AFTER_BUILD: &[&str] = &[
    "/var/cache/apt",
    "/var/lib/apt/lists",
    "/var/cache/debconf",
    "/var/log",
    "/root/.cache",
    "/root/.npm",
    "/var/tmp",
];

/// The build sandbox's command: the build command, then, if it succeeded,
/// the removal of [`DROPPED_AFTER_BUILD`]'s contents.
///
/// The removal runs in the sandbox, as the build did, and not in the
/// platform: a build can leave links anywhere in its layer (`ln -s /etc
/// /root/.npm`), and inside the sandbox a link resolves in the build's own
/// root, never the host's. A directory reached through a link is left as it
/// is (`realpath` must give the path back unchanged), so a link the build
/// made does not even empty a directory of its own image. The overlay
/// records the deletion of files from lower layers as whiteouts by itself.
/// The build command is passed as `$1` (no quoting); its exit status is the
/// build's.
fn build_argv(build: &str) -> Vec<String> {
    let dirs = DROPPED_AFTER_BUILD.join(" ");
    let apt_conf = build_cache::APT_CONF;
    let script = format!(
        "bash -c \"$1\" || exit\n\
         rm -f /{apt_conf}\n\
         for d in {dirs}; do\n\
         [ \"$(realpath -eq -- \"$d\")\" = \"$d\" ] && \
         find \"$d\" -mindepth 1 -maxdepth 1 -exec rm -rf -- {{}} + 2>/dev/null\n\
         done\n\
         exit 0"
    );
    vec![
        "bash".into(),
        "-c".into(),
        script,
        "bash".into(),
        build.to_string(),
    ]
}

/// Host files a build sees in place of the image's, read-only: the trusted
/// certificate authorities (a host behind a TLS-inspecting proxy has its CA
/// there). Public.
const HOST_FILES_FOR_BUILDS: &[&str] = &["/etc/ssl/certs/ca-certificates.crt"];

/// The `resolv.conf` of builds: the DNS forwarder of their user-space
/// network, which asks the host's resolvers.
pub const BUILD_RESOLV_CONF: &str =
    "# skiff: builds resolve names through their network's forwarder\nnameserver 10.0.2.3\n";

/// Memory and processes a build may use, whatever the service's own limits:
/// compilers and package managers need more than a small service does.
const BUILD_MEMORY: u64 = 4 << 30;
const BUILD_PIDS: u32 = 4096;
/// Size of the build's private `/tmp` (not part of the image); its files
/// count toward the build's memory cgroup, which holds it on top.
const BUILD_TMP: u64 = 2 << 30;
/// Open files per process of a build, at least (bundlers open many).
const BUILD_OPEN_FILES: u64 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{}", failed_message(*exit, tail))]
    Failed { exit: Exit, tail: Vec<String> },
    #[error(
        "The build ran longer than the build timeout of {} and was stopped. \
         Make the build faster or raise limits.build_timeout in skiff.toml. \
         The running version of the service, if any, was not changed.",
        format_duration(*after)
    )]
    TimedOut { after: Duration },
    #[error("the build cannot get its network: {0}")]
    Network(String),
    #[error("{}", disk_full_message(*limit, *used, tail))]
    DiskFull {
        limit: u64,
        used: u64,
        tail: Vec<String>,
    },
    #[error(
        "The build may write up to {} (limits.build_disk), but the file system of skiff's \
         state directory ({}) has only {} free. Free space there, or lower [limits] \
         build_disk in skiff.toml if the build needs less. The running version of the \
         service, if any, was not changed.",
        format_size(*needed), dir.display(), format_amount(*free)
    )]
    NoRoom {
        needed: u64,
        free: u64,
        dir: PathBuf,
    },
    #[error(
        "builds write their layer on a disk of their own, made with mkfs.ext4, which is not \
         installed: install it with `apt-get install e2fsprogs`"
    )]
    NoMkfs,
    #[error("preparing the build layer {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl BuildError {
    /// The build's last lines of output the error quotes.
    pub fn output(&self) -> &[String] {
        match self {
            Self::Failed { tail, .. } | Self::DiskFull { tail, .. } => tail,
            Self::Sandbox(_)
            | Self::TimedOut { .. }
            | Self::Network(_)
            | Self::NoRoom { .. }
            | Self::NoMkfs
            | Self::Io { .. } => &[],
        }
    }
}

fn failed_message(exit: Exit, tail: &[String]) -> String {
    let mut s = format!("The build command failed ({exit}).");
    push_tail(&mut s, tail);
    // Only the rules that speak of builds: the others' fixes are about an
    // instance (its /tmp, its read-only image, its user).
    use skiff_core::diagnose::FindingKind as K;
    let for_builds = |k: K| {
        matches!(
            k,
            K::RuntimeTooOld
                | K::MissingPythonModule
                | K::MissingNodeModule
                | K::CommandNotFound
                | K::SyscallDenied
        )
    };
    let findings = skiff_core::diagnose::diagnose_lines(tail.iter().map(String::as_str));
    s.push_str(&format_findings(
        findings.iter().filter(|f| for_builds(f.kind)),
    ));
    s.push_str(
        "\nFix the build command (build = \"...\" in skiff.toml) or what it installs; \
         it runs as root with bash -c in /app. The running version of the service, \
         if any, was not changed.",
    );
    s
}

/// What went wrong in a step the platform ran with the build machinery (a
/// runtime layer), without the advice meant for the service's own build.
pub fn platform_step_failure(e: &BuildError) -> String {
    match e {
        BuildError::Failed { exit, tail } => {
            let mut s = format!("it ended ({exit}).");
            push_tail(&mut s, tail);
            s
        }
        BuildError::TimedOut { after } => {
            format!(
                "it ran longer than {} and was stopped.",
                format_duration(*after)
            )
        }
        other => other.to_string(),
    }
}

fn disk_full_message(limit: u64, used: u64, tail: &[String]) -> String {
    let mut s = format!(
        "The build wrote {} and filled its disk: a build may write at most {} \
         (limits.build_disk).",
        format_amount(used),
        format_size(limit)
    );
    push_tail(&mut s, tail);
    s.push_str(
        "\nRaise [limits] build_disk in skiff.toml, or have the build leave less behind: \
         drop caches and intermediate files in the build command (pip install \
         --no-cache-dir, npm ci && npm cache clean --force, rm -rf of build directories). \
         The running version of the service, if any, was not changed.",
    );
    s
}

/// What a finished build reports.
#[derive(Debug, Clone, Copy)]
pub struct BuildReport {
    pub elapsed: Duration,
    /// Bytes the build left in its layer. Caches are dropped inside the
    /// build sandbox, before the platform sees the layer, so this is also
    /// the layer's size.
    pub written: u64,
    /// Bytes in the new layer, after dropping caches.
    pub layer_size: u64,
}

pub struct BuildContext<'a> {
    pub sandbox: &'a Sandbox,
    pub images: &'a ImageStore,
    /// The service's build cache, mounted where package managers keep
    /// their downloads (none for the platform's own runtime layers).
    pub cache: Option<&'a BuildCache>,
    pub mount_point: &'a Path,
    /// A file holding [`BUILD_RESOLV_CONF`], mounted as the build's
    /// `/etc/resolv.conf`.
    pub resolv_conf: &'a Path,
    pub log: LogSender,
    pub events: broadcast::Sender<Event>,
}

/// The command that makes the runtime layer for Node.js `major` (the npm
/// registry's `node` package puts that version's binary first on PATH, in
/// /usr/local/bin; npm itself runs on it).
pub fn node_runtime_command(major: u32) -> String {
    format!("npm install -g node@{major} && node --version")
}

/// The environment of the build command.
fn environment(spec: &ServiceSpec) -> Vec<(String, String)> {
    command_environment(
        spec,
        &[
            ("DEBIAN_FRONTEND", "noninteractive"),
            // The image belongs to the service: `pip install` in the build
            // installs into it, as the README's example does, without
            // PEP 668's "externally-managed-environment".
            ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
            ("PIP_ROOT_USER_ACTION", "ignore"),
            // Node ships its own CA list; make it also trust the system bundle.
            ("NODE_EXTRA_CA_CERTS", "/etc/ssl/certs/ca-certificates.crt"),
        ],
        "/root",
    )
}

/// Runs `spec.build` over `lower` (top first) and leaves its writes in
/// `image.upper()`, on a disk of `limits.build_disk` (mounted read-only
/// once the build is done). On any failure the partial layer is removed.
pub async fn run(
    ctx: &BuildContext<'_>,
    spec: &ServiceSpec,
    build: &str,
    lower: &[PathBuf],
    image: &ImageDir,
    id: &str,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let result = async {
        prepare_disk(ctx.images, spec, image)?;
        let built = run_sandboxed(ctx, spec, build, lower, image, id).await;
        if let Some(cache) = ctx.cache {
            cache.release();
        }
        if let Ok(()) | Err(BuildError::Failed { .. }) = built {
            // A write that failed for want of space may have failed the
            // build, or been ignored by it: either way the layer is not
            // what the build meant to make.
            let usage = disk::usage(&image.disk_dir()).map_err(io(&image.disk_dir()))?;
            if usage.is_full() {
                let tail = match built {
                    Err(BuildError::Failed { tail, .. }) => tail,
                    _ => Vec::new(),
                };
                return Err(BuildError::DiskFull {
                    limit: spec.limits.build_disk,
                    used: usage.used,
                    tail,
                });
            }
        }
        built?;
        finish_layer(image).map_err(io(&image.dir))
    }
    .await;
    if let Err(e) = result {
        // The build's own failure is what the user needs to hear.
        if let Err(r) = ctx.images.remove_image(&image.dir) {
            tracing::warn!(
                "removing the failed build's layer {}: {r}",
                image.dir.display()
            );
        }
        return Err(e);
    }
    let size = tree_size(&image.upper());
    Ok(BuildReport {
        elapsed: started.elapsed(),
        written: size,
        layer_size: size,
    })
}

fn io(dir: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let dir = dir.to_path_buf();
    move |source| BuildError::Io { dir, source }
}

/// A new, empty disk of `limits.build_disk` for the layer, mounted with the
/// overlay's upper and work directories on it. Refused when the state
/// directory's file system could not hold what the build may write.
fn prepare_disk(
    images: &ImageStore,
    spec: &ServiceSpec,
    image: &ImageDir,
) -> Result<(), BuildError> {
    let mkfs = which("mkfs.ext4").ok_or(BuildError::NoMkfs)?;
    images.remove_image(&image.dir).map_err(io(&image.dir))?;
    let store = image.dir.parent().unwrap_or(&image.dir);
    let free = disk::free_space(store).map_err(io(store))?;
    if free < spec.limits.build_disk {
        return Err(BuildError::NoRoom {
            needed: spec.limits.build_disk,
            free,
            dir: store.to_path_buf(),
        });
    }
    fs::create_dir_all(image.disk_dir()).map_err(io(&image.dir))?;
    disk::format(
        &mkfs,
        &image.disk_file(),
        spec.limits.build_disk,
        disk::Durability::Scratch,
    )
    .map_err(io(&image.disk_file()))?;
    // The whole disk is the build's while it runs (others' builds and the
    // host's own writes cannot take it away); what it does not use goes
    // back when the build is done (`finish_layer`).
    disk::reserve(&image.disk_file()).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            BuildError::NoRoom {
                needed: spec.limits.build_disk,
                free: disk::free_space(store).unwrap_or(0),
                dir: store.to_path_buf(),
            }
        } else {
            io(&image.disk_file())(e)
        }
    })?;
    disk::mount_disk(&image.disk_file(), &image.disk_dir(), false)
        .map_err(io(&image.disk_dir()))?;
    for dir in [image.upper(), image.work()] {
        fs::create_dir(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

async fn run_sandboxed(
    ctx: &BuildContext<'_>,
    spec: &ServiceSpec,
    build: &str,
    lower: &[PathBuf],
    image: &ImageDir,
    id: &str,
) -> Result<(), BuildError> {
    let service = spec.name.to_string();
    // The build trusts certificate authorities as the host does and
    // resolves names through its network's forwarder; the image keeps its
    // own files for later.
    let mut binds: Vec<Bind> = HOST_FILES_FOR_BUILDS
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| Bind {
            source: PathBuf::from(p),
            target: p.to_string(),
            writable: false,
        })
        .collect();
    binds.push(Bind {
        source: ctx.resolv_conf.to_path_buf(),
        target: "/etc/resolv.conf".into(),
        writable: false,
    });
    // The cache is a help, not a need: without it the build downloads
    // everything, as it would the first time.
    let mut env = environment(spec);
    let cache = ctx.cache.map(|cache| {
        which("mkfs.ext4")
            .ok_or_else(|| std::io::Error::other("mkfs.ext4 is missing"))
            .and_then(|mkfs| cache.prepare(&mkfs))
            .and_then(|binds| build_cache::prepare_layer(&image.upper()).map(|()| binds))
    });
    match cache.unwrap_or(Ok(Vec::new())) {
        Ok(cache) if cache.is_empty() => {}
        Ok(cache) => {
            binds.extend(cache);
            env.extend(
                build_cache::ENV
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        }
        Err(e) => tracing::warn!("{service}: building without the build cache: {e}"),
    }
    let network = Network::Outbound {
        slirp4netns: which("slirp4netns").ok_or_else(|| {
            BuildError::Network(
                "builds reach package registries through slirp4netns, which is not \
                 installed: install it with `apt-get install slirp4netns`"
                    .into(),
            )
        })?,
        blocked: outbound::blocked_for_builds()
            .map_err(|e| BuildError::Network(format!("listing the host's addresses: {e}")))?,
    };
    let config = SandboxConfig {
        hostname: format!("build-{service}"),
        mount_point: ctx.mount_point.to_path_buf(),
        layers: lower.to_vec(),
        writable: Some(WritableLayer {
            upper: image.upper(),
            work: image.work(),
        }),
        binds,
        cwd: APP_PATH.into(),
        tmp_size: BUILD_TMP,
        identity: Identity::BuildRoot,
        network,
        argv: build_argv(build),
        env,
        open_files: spec.limits.open_files.max(BUILD_OPEN_FILES),
        syscall_filter: true,
        layers_owned_by: None,
        warm_root: None,
        hold: false,
    };
    let limits = CgroupLimits {
        memory_bytes: BUILD_MEMORY.max(spec.limits.memory) + BUILD_TMP,
        pids: BUILD_PIDS,
        cpu: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
    };
    let _ = ctx.events.send(Event::BuildStarted {
        service: service.clone(),
    });
    let mut instance = ctx.sandbox.spawn(id, &config, limits).await?;
    let tail = Tail::default();
    let sink = LogSink {
        service,
        phase: Phase::Build,
        tail: tail.clone(),
        log: ctx.log.clone(),
        instance: None,
        events: ctx.events.clone(),
    };
    let pumps = sink.pump_output(&mut instance);
    let waited = tokio::time::timeout(spec.limits.build_timeout, instance.wait()).await;
    let exit = match waited {
        Ok(exit) => exit.map_err(SandboxError::from)?,
        Err(_) => {
            let _ = instance.stop(Duration::ZERO).await;
            return Err(BuildError::TimedOut {
                after: spec.limits.build_timeout,
            });
        }
    };
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    instance.stop(Duration::ZERO).await?;
    if exit.code != 0 {
        return Err(BuildError::Failed {
            exit,
            tail: tail.lines(),
        });
    }
    Ok(())
}

/// Removes the overlay work directory (the platform's own: the kernel, not
/// the build, writes there), makes the disk read-only and marks the layer
/// complete. Nothing under the layer itself is touched: the build's caches
/// were dropped in its sandbox.
fn finish_layer(image: &ImageDir) -> std::io::Result<()> {
    fs::remove_dir_all(image.work())?;
    disk::trim(&image.disk_dir())?;
    disk::remount_read_only(&image.disk_dir())?;
    image.mark_ready()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wrapper runs in bash: here on the host, in a directory of the
    /// test's own, with the dropped directories replaced by ones under it.
    fn run_wrapper(build: &str, root: &Path) -> (i32, String) {
        let mut argv = build_argv(build);
        let r = root.display().to_string();
        for d in DROPPED_AFTER_BUILD {
            argv[2] = argv[2].replacen(&format!(" {d}"), &format!(" {r}{d}"), 1);
        }
        let conf = build_cache::APT_CONF;
        let script = argv[2].replacen(&format!(" /{conf}"), &format!(" {r}/{conf}"), 1);
        assert_ne!(script, argv[2], "the wrapper removes the apt configuration");
        argv[2] = script;
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn the_build_status_is_kept_and_caches_go_only_after_success() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("var/cache/apt/archives")).unwrap();
        fs::write(r.join("var/cache/apt/archives/x.deb"), "x").unwrap();
        fs::write(r.join("var/cache/apt/.hidden"), "x").unwrap();
        fs::create_dir_all(r.join("etc/apt/apt.conf.d")).unwrap();
        fs::write(r.join(build_cache::APT_CONF), "x").unwrap();
        // A failing build keeps its status and its files.
        let (code, _) = run_wrapper("echo 'it''s \"quoted\"'; exit 7", r);
        assert_eq!(code, 7);
        assert!(r.join("var/cache/apt/archives/x.deb").exists());
        // The command arrives unquoted and unchanged.
        let (code, out) = run_wrapper("echo \"a  b\" '$HOME'", r);
        assert_eq!((code, out.as_str()), (0, "a  b $HOME\n"));
        assert!(r.join("var/cache/apt").is_dir());
        assert_eq!(fs::read_dir(r.join("var/cache/apt")).unwrap().count(), 0);
        assert!(
            !r.join(build_cache::APT_CONF).exists(),
            "the cache's apt configuration stays"
        );
    }

    #[test]
    fn a_directory_reached_through_a_link_is_not_emptied() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let elsewhere = tempfile::tempdir().unwrap();
        fs::write(elsewhere.path().join("keep"), "k").unwrap();
        fs::create_dir_all(r.join("root")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), r.join("root/.npm")).unwrap();
        fs::create_dir_all(r.join("var")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), r.join("var/log")).unwrap();
        let (code, _) = run_wrapper("true", r);
        assert_eq!(code, 0);
        assert!(elsewhere.path().join("keep").exists());
    }
}
