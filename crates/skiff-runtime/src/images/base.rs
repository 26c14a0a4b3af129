//! The base image: a Debian root file system with bash, python3 (pip, venv)
//! and node (npm), made once with `debootstrap` and cached: Debian 13 by
//! default (Python 3.13), Debian 12 for a service that asks for Python 3.11. It is built from
//! Debian's packages only, so nothing of the host (its users, home
//! directories, secrets, skiff's own state) is in it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Bump when the recipe changes: a new version is built beside the old one.
const RECIPE_VERSION: &str = "1";
/// The default base: Debian 13, Python 3.13 (the newest Python a Debian
/// release gives), Node.js 20.
const SUITE: &str = "trixie";
/// The Debian release that brings each Python a service may ask for
/// (`runtime = "python@3.11"`): its python3 is that version.
pub const PYTHON_SUITES: &[(&str, &str)] = &[("3.13", "trixie"), ("3.11", "bookworm")];

/// The Debian release of the base for `python` (`None`: the default).
pub fn suite_for(python: Option<&str>) -> &'static str {
    PYTHON_SUITES
        .iter()
        .find(|(v, _)| Some(*v) == python)
        .map_or(SUITE, |(_, suite)| suite)
}
/// Installed by debootstrap itself.
const DEBOOTSTRAP_PACKAGES: &str = "python3,python3-pip,python3-venv,ca-certificates";
/// Installed with apt afterwards: npm's dependency graph is too much for
/// debootstrap's own resolver.
const APT_PACKAGES: &[&str] = &["nodejs", "npm"];

/// The user instances run as (never root). Added to the image's passwd so
/// tools that look up their user (pip, npm, getpass) work.
pub const RUN_UID: u32 = 10001;
pub const RUN_GID: u32 = 10001;
/// Where the service's files appear inside the sandbox.
pub const APP_PATH: &str = "/app";

#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    #[error(
        "debootstrap is not installed, and skiff needs it once to build its base image; \
         install it with `apt-get install debootstrap`"
    )]
    NoDebootstrap,
    #[error("preparing the base image failed at `{step}` ({status}); the full log is {log}. \
             Check that the Debian mirror {mirror} is reachable (set SKIFF_DEBIAN_MIRROR to use another) \
             and run the command again")]
    StepFailed {
        step: String,
        status: String,
        log: PathBuf,
        mirror: String,
    },
    #[error("base image cache {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// A ready base image.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// The root file system.
    pub root: PathBuf,
    /// How long preparing it took, or `None` when it came from the cache.
    pub built_in: Option<Duration>,
}

/// The directory name of the current recipe, e.g. `base-trixie-1`.
pub fn image_dir_name() -> String {
    image_dir_name_for(SUITE)
}

/// The directory name of the current recipe for Debian `suite`.
pub fn image_dir_name_for(suite: &str) -> String {
    format!("base-{suite}-{RECIPE_VERSION}")
}

/// Returns the cached base image, building it first when needed. Concurrent
/// callers (other skiff processes too) wait for one build through a lock.
/// `progress` receives each line of the build's output.
pub async fn ensure(
    cache: &Path,
    mirror: &str,
    progress: impl Fn(&str) + Send + Sync,
) -> Result<BaseImage, BaseImageError> {
    ensure_suite(cache, mirror, SUITE, progress).await
}

/// [`ensure`] for the base of Debian `suite` (one of [`PYTHON_SUITES`]).
pub async fn ensure_suite(
    cache: &Path,
    mirror: &str,
    suite: &str,
    progress: impl Fn(&str) + Send + Sync,
) -> Result<BaseImage, BaseImageError> {
    let io = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| BaseImageError::Io { dir, source }
    };
    let name = image_dir_name_for(suite);
    let root = cache.join(&name).join("rootfs");
    tokio::fs::create_dir_all(cache).await.map_err(io(cache))?;
    // The image holds root-owned setuid programs (su, mount); like the
    // state directory, the cache is root's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(cache, std::fs::Permissions::from_mode(0o700))
            .map_err(io(cache))?;
    }
    if root.join("app").is_dir() {
        return Ok(BaseImage {
            root,
            built_in: None,
        });
    }
    let lock_path = cache.join(format!("{name}.lock"));
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    progress("waiting for another skiff that is preparing the base image");
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    })
    .await
    .map_err(|e| io(&lock_path)(std::io::Error::other(e)))?
    .map_err(io(&lock_path))?;
    if root.join("app").is_dir() {
        return Ok(BaseImage {
            root,
            built_in: None,
        });
    }

    let started = Instant::now();
    let log = cache.join(format!("{name}.log"));
    let mut logf = tokio::fs::File::create(&log).await.map_err(io(&log))?;
    let fail = |step: &str, status: String| BaseImageError::StepFailed {
        step: step.to_string(),
        status,
        log: log.clone(),
        mirror: mirror.to_string(),
    };
    // debootstrap makes the base image; slirp4netns gives builds their
    // network (skiff_sandbox::outbound); mkfs.ext4 makes the disks of
    // layers (skiff_sandbox::disk).
    let missing: Vec<&str> = [
        ("debootstrap", "debootstrap"),
        ("slirp4netns", "slirp4netns"),
        ("mkfs.ext4", "e2fsprogs"),
    ]
    .into_iter()
    .filter(|(tool, _)| which(tool).is_none())
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() && which("apt-get").is_some() {
        // A fresh Debian host: bring the tools skiff needs from the host's
        // own package sources, as the user would have been told to.
        let missing_list = missing.join(" ");
        progress(&format!("{missing_list} missing; installing with apt-get"));
        let apt = |args: &[&str]| -> Vec<String> {
            std::iter::once("apt-get")
                .chain(args.iter().copied())
                .map(String::from)
                .collect()
        };
        run_step("apt-get update", &apt(&["update"]), &mut logf, &progress)
            .await
            .map_err(|s| fail("apt-get update", s))?;
        let step = format!("apt-get install {missing_list}");
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        run_step(&step, &apt(&args), &mut logf, &progress)
            .await
            .map_err(|s| fail(&step, s))?;
    }
    let debootstrap = which("debootstrap").ok_or(BaseImageError::NoDebootstrap)?;
    let debootstrap = debootstrap.to_string_lossy().into_owned();
    let chroot = which("chroot").map_or_else(
        || "/usr/sbin/chroot".to_string(),
        |p| p.to_string_lossy().into_owned(),
    );
    let work = cache.join(format!("{name}.partial"));
    if work.exists() {
        unmount_under(&work);
        tokio::fs::remove_dir_all(&work).await.map_err(io(&work))?;
    }
    let work_root = work.join("rootfs");
    tokio::fs::create_dir_all(&work_root)
        .await
        .map_err(io(&work))?;

    let root_str = work_root.to_string_lossy().into_owned();
    let include = format!("--include={DEBOOTSTRAP_PACKAGES}");
    let steps: Vec<(String, Vec<String>)> = vec![
        (
            "debootstrap".into(),
            [
                debootstrap.as_str(),
                "--variant=minbase",
                &include,
                suite,
                &root_str,
                mirror,
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "apt-get install".into(),
            [
                chroot.as_str(),
                &root_str,
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(APT_PACKAGES.iter().map(|s| s.to_string()))
            .collect(),
        ),
    ];
    for (step, argv) in steps {
        run_step(&step, &argv, &mut logf, &progress)
            .await
            .map_err(|status| fail(&step, status))?;
    }
    progress("finishing the image");
    finish(&work_root).map_err(io(&work_root))?;
    let final_dir = cache.join(&name);
    if final_dir.exists() {
        tokio::fs::remove_dir_all(&final_dir)
            .await
            .map_err(io(&final_dir))?;
    }
    tokio::fs::rename(&work, &final_dir)
        .await
        .map_err(io(&final_dir))?;
    Ok(BaseImage {
        root,
        built_in: Some(started.elapsed()),
    })
}

/// Runs one preparation command, passing each output line to the log and
/// to `progress`. The error is the command's status in words.
async fn run_step(
    step: &str,
    argv: &[String],
    logf: &mut tokio::fs::File,
    progress: &(impl Fn(&str) + Send + Sync),
) -> Result<(), String> {
    progress(&format!("running {step}"));
    let _ = logf
        .write_all(format!("$ {}\n", argv.join(" ")).as_bytes())
        .await;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    // debootstrap and apt start children of their own (dpkg, maintainer
    // scripts): if skiff is stopped meanwhile, the whole group goes.
    let _group = child.id().map(KillGroupOnDrop);
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("no output pipes".into());
    };
    let (mut out, mut err) = (BufReader::new(out).lines(), BufReader::new(err).lines());
    let (mut out_done, mut err_done) = (false, false);
    while !(out_done && err_done) {
        let line = tokio::select! {
            l = out.next_line(), if !out_done => l.ok().flatten().ok_or(&mut out_done),
            l = err.next_line(), if !err_done => l.ok().flatten().ok_or(&mut err_done),
        };
        match line {
            Ok(line) => {
                let _ = logf.write_all(format!("{line}\n").as_bytes()).await;
                progress(&line);
            }
            Err(done) => *done = true,
        }
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(status.to_string())
    }
}

/// Kills a process group when dropped (a step that was cancelled).
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        // After a step that ended by itself the group is empty: ESRCH.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Unmounts whatever an interrupted debootstrap left mounted under `dir`
/// (it mounts /proc and /sys in the target), deepest first, so the
/// directory can be removed.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The last touches: the run user, `/app`, and no package caches.
fn finish(root: &Path) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(root.join(APP_PATH.trim_start_matches('/')))?;
    let append = |file: &str, line: String| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join(file))?;
        f.write_all(line.as_bytes())
    };
    append(
        "etc/passwd",
        format!("app:x:{RUN_UID}:{RUN_GID}:skiff service:/tmp:/bin/bash\n"),
    )?;
    append("etc/group", format!("app:x:{RUN_GID}:\n"))?;
    std::fs::write(root.join("etc/hostname"), "skiff\n")?;
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = root.join(dir);
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    for file in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = std::fs::remove_file(root.join(file));
    }
    Ok(())
}

pub(crate) fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}
