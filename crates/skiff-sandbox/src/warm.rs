//! An image's read-only root, stacked once and shared by its instances.
//!
//! Without it, each instance stacks the image's layers with an overlay of
//! its own: a new file system whose lookups start cold, so every start
//! pays again for what the last one already looked up (Python's start,
//! which looks up hundreds of files, takes about 3 ms longer on a fresh
//! overlay). A [`WarmRoot`] is one overlay per image, made with the new
//! mount API and held by its descriptor only: it is in no mount
//! namespace's table (the host's and the platform's stay as they are,
//! and a new sandbox's copy of the platform's table is no larger for it),
//! and it goes when the descriptor closes, however the platform ends.
//! Each instance attaches a copy of that mount (`open_tree` with
//! `OPEN_TREE_CLONE`): the same file system, its caches warm.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::beneath::remove_tree;
use crate::mountapi::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// An image's layers stacked into one read-only overlay, held by a
/// descriptor (see the module's documentation).
#[derive(Debug)]
pub struct WarmRoot {
    mount: OwnedFd,
    layers: Vec<PathBuf>,
}

impl WarmRoot {
    /// Stacks `layers` (top first, at least two) into a read-only overlay,
    /// without set-user-id programs or device files. `staging` is a
    /// directory of the platform's own, made and removed here, where the
    /// layers are named `l0`, `l1`... for the overlay's options: an
    /// instance's `/proc/self/mountinfo` then shows `lowerdir=l0:l1`, no
    /// host path.
    pub fn mount(layers: &[PathBuf], staging: &Path) -> io::Result<Self> {
        if layers.len() < 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a warm root stacks two layers or more; one is bound as it is",
            ));
        }
        if let Some(parent) = staging.parent() {
            std::fs::create_dir_all(parent).map_err(|e| with_path(e, "creating", parent))?;
        }
        // Left over if the platform was killed while stacking.
        remove_tree(staging).map_err(|e| with_path(e, "removing", staging))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(staging)
            .map_err(|e| with_path(e, "creating", staging))?;
        let made = Self::stack(layers, staging);
        let removed = remove_tree(staging);
        let root = made?;
        removed.map_err(|e| with_path(e, "removing", staging))?;
        Ok(root)
    }

    fn stack(layers: &[PathBuf], staging: &Path) -> io::Result<Self> {
        // Links the platform makes in its own directory, followed once by
        // the kernel while the overlay is made.
        let mut names = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let name = format!("l{i}");
            std::os::unix::fs::symlink(layer, staging.join(&name))
                .map_err(|e| with_path(e, "naming a layer in", staging))?;
            names.push(name);
        }
        let lowerdir = CString::new(names.join(":")).map_err(io::Error::other)?;
        let staging = staging.to_path_buf();
        // The names are resolved from the working directory, which the
        // platform's threads share: a thread of its own gets one of its own.
        let stacking = std::thread::Builder::new()
            .name("skiff-stack".into())
            .spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
                std::env::set_current_dir(&staging)?;
                mountapi::detached_overlay(
                    &lowerdir,
                    MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                )
            })?;
        let mount = stacking
            .join()
            .map_err(|_| io::Error::other("the thread stacking the layers panicked"))?
            .map_err(|e| io::Error::new(e.kind(), format!("stacking the image's layers: {e}")))?;
        // What each instance's pid 1 will do, tried once here: a kernel
        // that cannot copy a mount made this way (before Linux 6.15) gets
        // no warm root, and its instances stack their layers each.
        mountapi::clone_mount(mount.as_fd())
            .map_err(|e| io::Error::new(e.kind(), format!("copying the stacked layers: {e}")))?;
        Ok(Self {
            mount,
            layers: layers.to_vec(),
        })
    }

    /// The layers it stacks, top first.
    pub fn layers(&self) -> &[PathBuf] {
        &self.layers
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.mount.as_fd()
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
