//! The kernel's new mount calls, which `nix` does not wrap: detached mounts
//! held by a descriptor, copied, given attributes and attached where they
//! belong (Linux 5.2; `mount_setattr` 5.12; copying a mount made by
//! `fsmount`, which is in no namespace, 6.15).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// From <linux/mount.h>.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr`.
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

/// The result of a system call that returns a new descriptor.
fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(r).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn done(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A detached copy of the mount at `path`, closed on exec.
pub(crate) fn clone_tree_at(path: &CStr) -> io::Result<OwnedFd> {
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree reads the NUL-terminated path; the result is a new
    // descriptor, owned by `owned`.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })
}

/// A detached copy of the detached mount `fd`, closed on exec. Linux 6.15
/// and later only: before, a mount outside the caller's namespace could
/// not be copied.
pub(crate) fn clone_mount(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: open_tree on a borrowed, open descriptor with an empty path;
    // the result is a new descriptor, owned by `owned`.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) })
}

/// Changes the attributes of the detached mount `tree`.
pub(crate) fn set_attrs(tree: &OwnedFd, attr: &MountAttr) -> io::Result<()> {
    // SAFETY: mount_setattr reads one `struct mount_attr` of the size given;
    // the empty path with AT_EMPTY_PATH names the descriptor.
    done(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
}

/// Attaches the detached mount `tree` on `target`.
pub(crate) fn attach(tree: &OwnedFd, target: &CStr) -> io::Result<()> {
    // SAFETY: move_mount from the detached tree to a NUL-terminated path.
    done(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
}

/// A new overlay of `lowerdir` (paths relative to the working directory
/// are resolved from it, and shown as given) with no upper directory,
/// detached: in no mount namespace's table, alive while a descriptor or a
/// copy attached somewhere holds it.
pub(crate) fn detached_overlay(lowerdir: &CStr, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: fsopen reads the NUL-terminated name; a new descriptor.
    let fs =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?;
    let set = |key: &CStr, value: &CStr| {
        // SAFETY: fsconfig reads the two NUL-terminated strings.
        done(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
    };
    set(c"source", c"overlay")?;
    set(c"lowerdir", lowerdir)?;
    // SAFETY: fsconfig with no key or value.
    done(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    // SAFETY: fsmount on the configured context; a new descriptor.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}
