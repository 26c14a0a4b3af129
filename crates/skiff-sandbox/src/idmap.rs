//! Idmapped layers: a persistent service's image, with what root owns shown
//! as the service's own user, so that the service can change every file of
//! its writable root, those the build made included (overlayfs copies a
//! file up with the owner it shows).
//!
//! The mapping is a user namespace that maps uid and gid 0 to the
//! service's, and 1-65535 to themselves; nothing runs in it. An idmapped
//! mount (`mount_setattr(MOUNT_ATTR_IDMAP)`, Linux 5.12; overlayfs on
//! idmapped layers, 5.19) is made from each layer's bind with the new
//! mount API.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, ForkResult};

use crate::mountapi::{self, MountAttr, MOUNT_ATTR_IDMAP};

type Res<T> = Result<T, String>;

/// Ids 1-65535 keep their number; 0 becomes the service's.
const KEPT: u32 = 65535;

/// A user namespace that maps root to one user, held open.
pub struct RootAs {
    ns: OwnedFd,
}

impl RootAs {
    /// Makes the namespace. Must run in a single-threaded process, in the
    /// pid namespace whose `/proc` is mounted (it reaches a child through
    /// `/proc/<pid>`), as root.
    pub fn new(uid: u32) -> Res<Self> {
        let map = id_map(uid)?;
        let (ready_r, ready_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        let (done_r, done_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        // SAFETY: the caller is single-threaded; the child only makes
        // system calls and leaves with _exit.
        match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => {
                drop((ready_r, done_w));
                let ok = unshare(CloneFlags::CLONE_NEWUSER).is_ok();
                let _ = File::from(ready_w).write_all(if ok { b"y" } else { b"n" });
                let _ = File::from(done_r).read(&mut [0u8; 1]);
                // SAFETY: leaves the forked child without running anything
                // of the parent's.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop((ready_w, done_r));
                let mut answer = [0u8; 1];
                let made = File::from(ready_r).read_exact(&mut answer).is_ok() && answer == *b"y";
                let result = if made {
                    let proc = format!("/proc/{}", child.as_raw());
                    std::fs::write(format!("{proc}/uid_map"), &map)
                        .and_then(|()| std::fs::write(format!("{proc}/gid_map"), &map))
                        .and_then(|()| File::open(format!("{proc}/ns/user")))
                        .map(|ns| Self { ns: ns.into() })
                        .map_err(|e| format!("mapping root to uid {uid}: {e}"))
                } else {
                    Err("cannot make a user namespace for the idmapped layers".into())
                };
                drop(done_w);
                let _ = waitpid(child, None);
                result
            }
        }
    }

    /// Mounts `source` on `target` (an existing directory) as a bind that
    /// shows root's files as the mapped user's.
    pub fn bind(&self, source: &Path, target: &Path) -> Res<()> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} contains a NUL byte", p.display()))
        };
        let (source_c, target_c) = (c(source)?, c(target)?);
        let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", source.display());
        let tree =
            mountapi::clone_tree_at(&source_c).map_err(|e| fail("cloning the mount of", e))?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: self.ns.as_raw_fd() as u64,
        };
        mountapi::set_attrs(&tree, &attr).map_err(|e| fail("idmapping", e))?;
        mountapi::attach(&tree, &target_c).map_err(|e| fail("mounting the idmapped", e))?;
        Ok(())
    }
}

/// The `uid_map` and `gid_map` of the namespace: 0 is `uid`, 1-65535
/// stay themselves.
fn id_map(uid: u32) -> Res<String> {
    if uid <= KEPT {
        return Err(format!("uid {uid} is among the ids an idmap keeps"));
    }
    Ok(format!("0 {uid} 1\n1 1 {KEPT}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_maps_to_the_service_and_the_rest_to_themselves() {
        assert_eq!(
            id_map(1_800_000_123).unwrap(),
            "0 1800000123 1\n1 1 65535\n"
        );
    }

    #[test]
    fn a_uid_the_map_keeps_cannot_stand_for_root() {
        for uid in [0, 1, 1000, 65535] {
            let err = id_map(uid).unwrap_err();
            assert_eq!(err, format!("uid {uid} is among the ids an idmap keeps"));
        }
        assert!(id_map(65536).is_ok());
    }
}
