//! What only root can check: real disks (mkfs, loop devices, mounts) and
//! changing owners. Run as root by `cargo test -p skiff-sandbox` (and the
//! workspace's tests); as anyone else these fail saying so, rather than
//! pass having checked nothing. The library's own unit tests need no root
//! (`.ci/unprivileged-unit-tests`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use skiff_sandbox::beneath::Tree;
use skiff_sandbox::disk::{
    format, is_mount_point, mount_disk, remount_read_only, reserve, trim, unmount, usage,
    Durability,
};

fn as_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount disks and change owners: run them as root"
    );
}

fn mkfs() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("mkfs.ext4 (e2fsprogs) is installed")
}

/// Unmounts the test's disk even when an assertion fails.
struct Mounted<'a>(&'a Path);
impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = unmount(self.0);
    }
}

/// A new disk of `usable` bytes in a directory of the test's own, and an
/// empty directory to mount it on.
fn made(usable: u64, durability: Durability) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.ext4");
    let target = dir.path().join("disk");
    std::fs::create_dir(&target).unwrap();
    format(&mkfs(), &file, usable, durability).unwrap();
    (dir, file, target)
}

#[test]
fn a_disk_holds_what_it_promises_and_not_more() {
    as_root();
    for (usable, durability) in [
        (16u64 << 20, Durability::Journaled),
        (40 << 20, Durability::Scratch),
        (1 << 30, Durability::Journaled),
        (4 << 30, Durability::Scratch),
    ] {
        let (_dir, file, target) = made(usable, durability);
        // Sparse: the file takes a few MiB whatever its size.
        let taken = std::fs::metadata(&file).unwrap().blocks() * 512;
        assert!(taken < 4 << 20, "{usable}: the image takes {taken}");
        mount_disk(&file, &target, false).unwrap();
        let _m = Mounted(&target);
        assert!(is_mount_point(&target).unwrap());
        let u = usage(&target).unwrap();
        assert!(u.free >= usable, "{usable}: only {} free", u.free);
        assert!(u.free < usable + usable / 50 + (2 << 20), "{usable}: {u:?}");
        assert!(!u.is_full());
        let root = std::fs::metadata(&target).unwrap();
        assert_eq!((root.uid(), root.mode() & 0o7777), (0, 0o755));
    }
}

#[test]
fn a_reserved_disk_takes_its_size_and_trimming_gives_back_the_rest() {
    as_root();
    let (_dir, file, target) = made(64 << 20, Durability::Scratch);
    let taken = || std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(taken() < 8 << 20, "sparse when made: {}", taken());
    reserve(&file).unwrap();
    assert!(taken() >= 64 << 20, "reserved: {}", taken());
    mount_disk(&file, &target, false).unwrap();
    let _m = Mounted(&target);
    std::fs::write(target.join("kept"), vec![1u8; 4 << 20]).unwrap();
    nix::unistd::sync();
    trim(&target).unwrap();
    assert!(taken() < 16 << 20, "after trimming: {}", taken());
    assert!(taken() >= 4 << 20, "the file's blocks stay: {}", taken());
    assert_eq!(std::fs::read(target.join("kept")).unwrap().len(), 4 << 20);
}

#[test]
fn writes_past_the_size_fail_with_enospc() {
    as_root();
    let (_dir, file, target) = made(16 << 20, Durability::Journaled);
    mount_disk(&file, &target, false).unwrap();
    let m = Mounted(&target);
    let mut f = File::create(target.join("big")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match io::Write::write_all(&mut f, &chunk).and_then(|_| f.sync_data()) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "wrote {written} on a 16 MiB disk");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 15 << 20, "only {written} fit");
    drop(f);
    assert!(usage(&target).unwrap().is_full());
    // Read-only from now on; unmounting frees the loop device.
    remount_read_only(&target).unwrap();
    assert!(File::create(target.join("more")).is_err());
    drop(m);
    assert!(!is_mount_point(&target).unwrap());
    // Mounted again read-only, the files are there.
    mount_disk(&file, &target, true).unwrap();
    let _m = Mounted(&target);
    assert!(std::fs::metadata(target.join("big")).unwrap().len() >= 15 << 20);
}

#[test]
fn hand_over_changes_owners_and_never_follows_a_link() {
    as_root();
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), "v").unwrap();
    std::os::unix::fs::chown(outside.path().join("victim"), Some(10001), Some(10001)).unwrap();
    std::fs::write(d.path().join("mine"), "m").unwrap();
    std::os::unix::fs::chown(d.path().join("mine"), Some(10001), Some(10001)).unwrap();
    std::fs::write(d.path().join("roots"), "r").unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), d.path().join("link")).unwrap();
    std::os::unix::fs::lchown(d.path().join("link"), Some(10001), Some(10001)).unwrap();
    Tree::open(d.path())
        .unwrap()
        .walk(&[], &mut |e| e.hand_over(10001, 1_800_000_009))
        .unwrap();
    let owner = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(
        owner(&d.path().join("mine")),
        (1_800_000_009, 1_800_000_009)
    );
    assert_eq!(owner(&d.path().join("roots")), (0, 0));
    assert_eq!(
        owner(&d.path().join("link")),
        (1_800_000_009, 1_800_000_009)
    );
    assert_eq!(
        owner(&outside.path().join("victim")),
        (10001, 10001),
        "the link was followed"
    );
}

/// A socket listening on `[::]:port` for IPv6 only.
fn ipv6_only_listener(port: u16) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn6,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
    let addr = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(addr)).unwrap();
    listen(&fd, Backlog::new(8).unwrap()).unwrap();
    fd
}

/// The listen watch asks a network namespace's kernel whether a port is
/// listened on where the health probe connects (`127.0.0.1`): a port is
/// seen once a socket in that namespace listens on it (IPv4, or IPv6
/// taking IPv4 too), and not in the host's namespace, nor before, nor on
/// an IPv6-only socket the probe could not reach.
#[test]
fn listeners_are_seen_in_their_own_network_namespace_only() {
    as_root();
    use std::sync::mpsc;
    let (to_main, from_thread) = mpsc::channel();
    let (to_thread, from_main) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // A namespace of this thread's own (loopback down: any address).
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        to_main.send(nix::unistd::gettid().as_raw()).unwrap();
        from_main.recv().unwrap();
        let listener = std::net::TcpListener::bind("0.0.0.0:4321").unwrap();
        let dual = std::net::TcpListener::bind("[::]:4323").unwrap();
        let v6only = ipv6_only_listener(4324);
        to_main.send(0).unwrap();
        from_main.recv().unwrap();
        drop((listener, dual, v6only));
    });
    let tid = from_thread.recv().unwrap();
    let netns = skiff_sandbox::NetNs::of_pid(tid as u32).unwrap();
    let mut listeners = netns.listeners().unwrap();
    assert!(
        !listeners.listening_on(4321).unwrap(),
        "nothing listens yet"
    );
    to_thread.send(()).unwrap();
    from_thread.recv().unwrap();
    assert!(listeners.listening_on(4321).unwrap());
    assert!(!listeners.listening_on(4322).unwrap());
    assert!(listeners.listening_on(4323).unwrap(), "[::] takes IPv4 too");
    assert!(!listeners.listening_on(4324).unwrap(), "IPv6 only");
    // The host's namespace has no such listener (nor sees the instance's).
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    assert!(!listeners.listening_on(host_port).unwrap());
    to_thread.send(()).unwrap();
    thread.join().unwrap();
}
