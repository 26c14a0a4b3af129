//! Each service's build cache: what package managers download (pip's and
//! npm's caches, apt's package files and lists), kept from one build to the
//! next outside the image, so that a rebuild after a one-line change does
//! not fetch everything again.
//!
//! The caches are mounted under `/.skiff-cache` in the build sandbox, and
//! the package managers are pointed there (`PIP_CACHE_DIR`,
//! `npm_config_cache`, an apt configuration file that the build's wrapper
//! removes when it is done): not on their usual places, which build
//! commands often delete (`rm -rf ~/.cache`), and a mount point cannot be.
//!
//! The cache is the tenant's (its builds write it), so it lives on a disk
//! of its own of [`CACHE_SIZE`] (`skiff_sandbox::disk`): it cannot take more
//! of the host's disk than that; its whole size is reserved on the host
//! while a build runs, and what it does not use is given back after; when
//! it is more than three quarters
//! full at the start of a build it starts over empty. The platform never
//! reads it; it only makes the top directories, mounts them into the build
//! sandbox and removes the whole disk with the service.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use skiff_sandbox::{disk, Bind};

/// The most a service's build cache holds.
pub const CACHE_SIZE: u64 = 2 << 30;

/// Where the caches are mounted in a build.
const MOUNTED_AT: &str = ".skiff-cache";

/// The caches: directories on the cache disk, each mounted as
/// `/.skiff-cache/<name>` in the build.
const CACHED: &[&str] = &["pip", "npm", "apt-archives", "apt-lists"];

/// The apt configuration that points apt at its caches, written into the
/// build's fresh layer; the build's wrapper removes it when the build is
/// done (see `build::build_argv`).
pub const APT_CONF: &str = "etc/apt/apt.conf.d/99skiff-build-cache";
const APT_CONF_TEXT: &str = "// skiff: the service's build cache (removed after the build)\n\
     Dir::Cache::Archives \"/.skiff-cache/apt-archives/\";\n\
     Dir::State::Lists \"/.skiff-cache/apt-lists/\";\n\
     APT::Keep-Downloaded-Packages \"true\";\n\
     Binary::apt::APT::Keep-Downloaded-Packages \"true\";\n";

/// The environment that points pip and npm at their caches.
pub const ENV: &[(&str, &str)] = &[
    ("PIP_CACHE_DIR", "/.skiff-cache/pip"),
    ("npm_config_cache", "/.skiff-cache/npm"),
];

/// A service's build cache under `dir` (`<state>/build-cache/<service>`).
pub struct BuildCache {
    dir: PathBuf,
}

impl BuildCache {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }

    fn mounted(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Makes the cache ready for a build (made, mounted, started over when
    /// too full) and returns the binds that put it in place.
    pub fn prepare(&self, mkfs: &Path) -> io::Result<Vec<Bind>> {
        let mounted = self.mounted();
        fs::create_dir_all(&mounted)?;
        if self.file().exists() && !disk::is_mount_point(&mounted)? {
            if let Err(e) = disk::mount_disk(&self.file(), &mounted, false) {
                // A cache is worth nothing next to a build: start over.
                tracing::warn!("build cache {}: {e}; starting it over", self.dir.display());
                fs::remove_file(self.file())?;
            }
        }
        if self.file().exists() {
            let usage = disk::usage(&mounted)?;
            if usage.used > CACHE_SIZE / 4 * 3 || usage.is_full() {
                self.remove()?;
                fs::create_dir_all(&mounted)?;
            }
        }
        if !self.file().exists() {
            disk::format(mkfs, &self.file(), CACHE_SIZE, disk::Durability::Scratch)?;
            disk::mount_disk(&self.file(), &mounted, false)?;
        }
        // Room for the whole cache while the build runs (see `release`):
        // without it, the build goes without the cache.
        disk::reserve(&self.file())?;
        let mut binds = Vec::new();
        for name in CACHED {
            let dir = mounted.join(name);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                // The top of the disk is the platform's: builds only see
                // inside these directories.
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is not a directory",
                        dir.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new().mode(0o755).create(&dir)?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
                }
                Err(e) => return Err(e),
            }
            binds.push(Bind {
                source: dir,
                target: format!("/{MOUNTED_AT}/{name}"),
                writable: true,
            });
        }
        Ok(binds)
    }

    /// After a build: the host gets back the blocks the cache does not use.
    pub fn release(&self) {
        let mounted = self.mounted();
        if disk::is_mount_point(&mounted).unwrap_or(false) {
            if let Err(e) = disk::trim(&mounted) {
                tracing::warn!("trimming the build cache {}: {e}", self.dir.display());
            }
        }
    }

    /// Unmounts and removes the cache (the service is removed, or the
    /// cache starts over).
    pub fn remove(&self) -> io::Result<()> {
        disk::unmount(&self.mounted())?;
        skiff_sandbox::beneath::remove_tree(&self.dir)
    }
}

/// Makes what the caches need in a build's fresh, empty layer (the
/// platform's own directory until the build starts): the mount points and
/// the apt configuration. Directories get the base image's modes (0755).
pub fn prepare_layer(upper: &Path) -> io::Result<()> {
    let dirs = std::iter::once(MOUNTED_AT.to_string())
        .chain(CACHED.iter().map(|n| format!("{MOUNTED_AT}/{n}")))
        .chain(["etc", "etc/apt", "etc/apt/apt.conf.d"].map(String::from));
    for rel in dirs {
        let dir = upper.join(rel);
        fs::DirBuilder::new().mode(0o755).create(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(upper.join(APT_CONF), APT_CONF_TEXT)?;
    fs::set_permissions(upper.join(APT_CONF), fs::Permissions::from_mode(0o644))
}
