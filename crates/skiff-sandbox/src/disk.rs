//! Disks of a fixed size for what tenants write: a build's layer, a
//! persistent service's writable layer.
//!
//! Each is an ext4 file system in a sparse file of its own, attached to a
//! loop device and mounted where the layer lives. The kernel enforces the
//! size: past it, writes fail with ENOSPC and nothing else on the host's
//! disk is touched. The file takes only what is written (plus about 2 MiB
//! of metadata), so a generous limit costs nothing until it is used.
//!
//! The loop device is configured with `LO_FLAGS_AUTOCLEAR`: it is freed by
//! the kernel when the file system is unmounted, or when the mount
//! namespace holding the mount goes away with the daemon. The image is only
//! ever written through the kernel's ext4 (a tenant writes files, never the
//! image's blocks), so mounting it is not mounting a crafted file system.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Block size of every disk: 4 KiB, the page size.
const BLOCK: u64 = 4096;
/// Bytes of data per inode: 64 Ki inodes per GiB, more than
/// `node_modules` or a Python virtualenv use.
const BYTES_PER_INODE: u64 = 16 * 1024;
const INODE_SIZE: u64 = 256;

/// What a disk holds besides its files: the inode tables, bitmaps, the
/// clusters ext4 keeps back for its own metadata (2 %, at most 16 MiB), the
/// journal, and some slack. Sized so that at least `usable` bytes of files
/// fit (see the test `a_disk_holds_what_it_promises_and_not_more`).
fn image_size(usable: u64, journal: u64) -> u64 {
    let inodes = usable / BYTES_PER_INODE * INODE_SIZE;
    let groups = usable / (BLOCK * 8 * BLOCK) + 1;
    let bitmaps = groups * 3 * BLOCK + 64 * BLOCK;
    let reserved = (usable / 49).min(16 << 20);
    let total = usable + inodes + bitmaps + reserved + journal + usable / 1024 + (1 << 20);
    total.div_ceil(BLOCK) * BLOCK
}

/// The journal of a disk that keeps data across crashes: 1/64 of it,
/// between 4 and 64 MiB.
fn journal_size(usable: u64) -> u64 {
    (usable / 64).clamp(4 << 20, 64 << 20) / (1 << 20) * (1 << 20)
}

/// Whether a disk's files must survive a crash of the host. A build's
/// layer is thrown away when anything goes wrong, so it needs no journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Scratch,
    Journaled,
}

/// Makes `file` (which must not exist) a new, empty ext4 file system that
/// holds at least `usable` bytes of files, with `mkfs`
/// (`mkfs.ext4` from e2fsprogs). Its root directory belongs to root, 0755.
/// Made under a temporary name and renamed when complete: a `file` that
/// exists is a whole file system, whatever happened before.
pub fn format(mkfs: &Path, file: &Path, usable: u64, durability: Durability) -> io::Result<()> {
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let made = format_at(mkfs, &partial, usable, durability)
        .and_then(|()| std::fs::rename(&partial, file));
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made
}

/// The size of the image file and `mkfs.ext4`'s arguments (all but the
/// file) for a disk that holds `usable` bytes of files.
fn layout(usable: u64, durability: Durability) -> (u64, Vec<String>) {
    let journal = match durability {
        Durability::Scratch => 0,
        Durability::Journaled => journal_size(usable),
    };
    let mut features = String::from("^resize_inode");
    if journal == 0 {
        features.push_str(",^has_journal");
    }
    let mut args: Vec<String> = ["-q", "-F", "-t", "ext4", "-m", "0"]
        .into_iter()
        .map(String::from)
        .collect();
    for (flag, value) in [
        ("-b", BLOCK.to_string()),
        ("-i", BYTES_PER_INODE.to_string()),
        ("-I", INODE_SIZE.to_string()),
        ("-O", features),
        (
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0".to_string(),
        ),
    ] {
        args.extend([flag.to_string(), value]);
    }
    if journal > 0 {
        args.extend(["-J".to_string(), format!("size={}", journal >> 20)]);
    }
    (image_size(usable, journal), args)
}

fn format_at(mkfs: &Path, file: &Path, usable: u64, durability: Durability) -> io::Result<()> {
    let (size, args) = layout(usable, durability);
    let image = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)?;
    image.set_len(size)?;
    drop(image);
    let out = Command::new(mkfs).args(&args).arg(file).output()?;
    if !out.status.success() {
        let _ = std::fs::remove_file(file);
        return Err(io::Error::other(format!(
            "{} failed ({}): {}",
            mkfs.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

// From <linux/loop.h>.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A loop device bound to `image`, open. It frees itself once nothing
/// holds it (autoclear): keep it open until the file system is mounted.
fn attach_loop(image: &File, read_only: bool) -> io::Result<File> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    // Another process may take the free device between the two calls.
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let device = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/loop{n}"))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        // Direct I/O keeps the image's blocks out of the host's page cache:
        // the mounted file system caches them once already. Not every
        // backing file system takes it; then the loop device runs without.
        for direct in [true, false] {
            let config = LoopConfig {
                fd: image.as_raw_fd() as u32,
                block_size: if direct { BLOCK as u32 } else { 0 },
                info: LoopInfo64 {
                    device: 0,
                    inode: 0,
                    rdevice: 0,
                    offset: 0,
                    size_limit: 0,
                    number: 0,
                    encrypt_type: 0,
                    encrypt_key_size: 0,
                    flags: if direct {
                        flags | LO_FLAGS_DIRECT_IO
                    } else {
                        flags
                    },
                    file_name: [0; 64],
                    crypt_name: [0; 64],
                    encrypt_key: [0; 32],
                    init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
            // `LoopConfig` lays out; it lives across the call.
            let r = unsafe {
                libc::ioctl(
                    device.as_raw_fd(),
                    LOOP_CONFIGURE,
                    &config as *const LoopConfig,
                )
            };
            if r == 0 {
                return Ok(device);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) if direct => continue,
                Some(libc::EBUSY) => break,
                _ => return Err(e),
            }
        }
    }
    Err(io::Error::other(
        "no free loop device: others kept taking the free one",
    ))
}

/// Mounts the disk in `file` on `target` (an empty directory), without
/// set-user-id programs or device files.
pub fn mount_disk(file: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    let image = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)?;
    let device = attach_loop(&image, read_only)?;
    let source = format!("/proc/self/fd/{}", device.as_raw_fd());
    let source = std::fs::read_link(&source)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    // noinit_itable: the inode tables were left unwritten by `format` and
    // stay so (ext4 would otherwise zero them in the background, filling
    // the sparse file).
    let data = if read_only {
        "noinit_itable,noload"
    } else {
        "noinit_itable"
    };
    mount(
        Some(source.as_path()),
        target,
        Some("ext4"),
        flags,
        Some(data),
    )
    .map_err(io::Error::from)
    // `device` closes here; the mount holds the loop device from now on.
}

/// Makes the disk mounted on `target` read-only (what is written is final).
pub fn remount_read_only(target: &Path) -> io::Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("noinit_itable"),
    )
    .map_err(io::Error::from)
}

/// Unmounts what is mounted on `target`, if anything. Instances that still
/// run on it keep it until they end; the loop device goes with the last.
pub fn unmount(target: &Path) -> io::Result<()> {
    loop {
        if !is_mount_point(target)? {
            return Ok(());
        }
        umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
}

/// Whether something is mounted on `dir` (its device differs from its
/// parent's). A missing directory is not.
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let here = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let parent = std::fs::metadata(dir.join(".."))?;
    Ok(here.dev() != parent.dev() || here.ino() == parent.ino())
}

/// Allocates every block of the disk in `file` on the host (the file keeps
/// its content; what was not written reads as zeros): from now on the disk
/// can fill up to its size whatever else fills the host. Fails with ENOSPC,
/// and allocates nothing more, when the host's file system has no room.
/// A sparse disk whose host file system fills up would fail its writes
/// with I/O errors instead of ENOSPC, and a journaled one would stop.
pub fn reserve(file: &Path) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)?;
    let len = f.metadata()?.len();
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::empty(),
        0,
        len as libc::off_t,
    )
    .map_err(io::Error::from)
}

/// Gives the host back the blocks of the disk mounted on `dir` that hold
/// no file (FITRIM: the loop device punches holes in its file).
pub fn trim(dir: &Path) -> io::Result<()> {
    #[repr(C)]
    struct FstrimRange {
        start: u64,
        len: u64,
        minlen: u64,
    }
    // _IOWR('X', 121, struct fstrim_range), <linux/fs.h>.
    const FITRIM: libc::c_ulong = 0xC018_5879;
    let d = File::open(dir)?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes one `struct fstrim_range`, which
    // `FstrimRange` lays out; it lives across the call.
    let r = unsafe { libc::ioctl(d.as_raw_fd(), FITRIM, &mut range as *mut FstrimRange) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How full a mounted disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in files and directories.
    pub used: u64,
    /// Bytes that can still be written.
    pub free: u64,
    /// Files that can still be made.
    pub free_files: u64,
}

impl Usage {
    /// Whether a write has (almost certainly) failed for want of space: less
    /// than 1 MiB or no inode left.
    pub fn is_full(&self) -> bool {
        self.free < (1 << 20) || self.free_files == 0
    }
}

/// How full the file system mounted on `dir` is.
pub fn usage(dir: &Path) -> io::Result<Usage> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let s = nix::sys::statvfs::statvfs(path.as_c_str()).map_err(io::Error::from)?;
    let unit = s.fragment_size();
    Ok(Usage {
        used: (s.blocks() - s.blocks_free()) * unit,
        free: s.blocks_available() * unit,
        free_files: s.files_free(),
    })
}

/// Bytes the unprivileged may still write on the file system of `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    usage(dir).map(|u| u.free)
}

#[cfg(test)]
mod tests {
    //! What needs no root; mounting real disks is in `tests/privileged.rs`.
    use super::*;

    #[test]
    fn image_sizes_grow_with_what_they_hold() {
        for usable in [16 << 20, 1 << 30, 4 << 30, 64 << 30] {
            let size = image_size(usable, journal_size(usable));
            assert!(size > usable && size.is_multiple_of(BLOCK));
            assert!(size < usable + usable / 16 + (80 << 20), "{usable}: {size}");
        }
    }

    #[test]
    fn journals_are_a_64th_between_4_and_64_mib() {
        assert_eq!(journal_size(16 << 20), 4 << 20);
        assert_eq!(journal_size(1 << 30), 16 << 20);
        assert_eq!(journal_size(4 << 30), 64 << 20);
        assert_eq!(journal_size(1 << 40), 64 << 20);
        // Whole MiB, as mkfs.ext4's -J size= takes.
        assert_eq!(journal_size((1 << 30) + 12345) % (1 << 20), 0);
    }

    #[test]
    fn a_scratch_disk_has_no_journal_and_a_journaled_one_has_its_size() {
        let (scratch_size, scratch) = layout(1 << 30, Durability::Scratch);
        let (journaled_size, journaled) = layout(1 << 30, Durability::Journaled);
        let joined = |a: &[String]| a.join(" ");
        assert_eq!(
            joined(&scratch),
            "-q -F -t ext4 -m 0 -b 4096 -i 16384 -I 256 -O ^resize_inode,^has_journal \
             -E lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"
        );
        assert_eq!(
            joined(&journaled),
            "-q -F -t ext4 -m 0 -b 4096 -i 16384 -I 256 -O ^resize_inode \
             -E lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0 -J size=16"
        );
        // The journal is on top of what the files get.
        assert_eq!(journaled_size - scratch_size, 16 << 20);
        assert_eq!(scratch_size, image_size(1 << 30, 0));
    }

    #[test]
    fn a_disk_is_full_below_a_mib_or_without_inodes() {
        let u = |free, free_files| Usage {
            used: 0,
            free,
            free_files,
        };
        assert!(u(0, 100).is_full());
        assert!(u((1 << 20) - 1, 100).is_full());
        assert!(u(1 << 30, 0).is_full());
        assert!(!u(1 << 20, 1).is_full());
    }

    #[test]
    fn a_missing_directory_is_no_mount_point_and_a_plain_one_neither() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(&d.path().join("absent")).unwrap());
        std::fs::create_dir(d.path().join("plain")).unwrap();
        assert!(!is_mount_point(&d.path().join("plain")).unwrap());
        // The root of the file system is one.
        assert!(is_mount_point(Path::new("/")).unwrap());
        // Unmounting what is not mounted does nothing.
        unmount(&d.path().join("plain")).unwrap();
    }

    #[test]
    fn format_refuses_to_follow_a_link_and_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        let file = d.path().join("disk.ext4");
        std::os::unix::fs::symlink(&outside, format!("{}.partial", file.display())).unwrap();
        // The link in the way is removed, never written through; a mkfs
        // that fails leaves no partial file.
        let err = format(
            Path::new("/bin/false"),
            &file,
            16 << 20,
            Durability::Scratch,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/bin/false failed"), "{err}");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert!(!file.exists());
        assert!(std::fs::symlink_metadata(format!("{}.partial", file.display())).is_err());
    }
}
