//! Reading trees a tenant could have written — build layers, writable
//! layers, unpacked uploads — without ever following a link they hold.
//!
//! A [`Tree`] is a directory descriptor. Paths inside it are resolved by the
//! kernel beneath it with no symbolic link anywhere on the way
//! (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), and a walk opens each
//! child relative to its parent's descriptor with `O_NOFOLLOW`. A link the
//! tenant made is seen as a link and reported as one, never resolved; a
//! directory swapped for a link half-way through a walk makes the walk fail
//! rather than leave the tree.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, openat2, readlinkat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// How deep a walk goes. A tree nested deeper is refused rather than
/// walked with one open descriptor per level (a build can nest directories
/// as deep as it likes).
pub const MAX_DEPTH: usize = 512;

/// A directory whose contents a tenant may have written.
#[derive(Debug)]
pub struct Tree {
    fd: OwnedFd,
}

/// What a walk found at one place in the tree; links are never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// Devices, sockets, fifos (and overlay whiteouts, which are devices).
    Other,
}

/// One entry of a walk.
#[derive(Debug)]
pub struct Entry<'a> {
    /// The path relative to the tree's root.
    pub rel: &'a Path,
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Size in bytes (regular files).
    pub len: u64,
    parent: BorrowedFd<'a>,
    name: &'a OsStr,
}

impl Entry<'_> {
    /// Gives the entry (itself, not what a link points to) from owner
    /// `from` to `to`: its uid and its gid, each where it is `from`.
    pub fn hand_over(&self, from: u32, to: u32) -> io::Result<()> {
        let st = fstatat(
            self.parent,
            self.name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        let uid = (st.st_uid == from).then(|| nix::unistd::Uid::from_raw(to));
        let gid = (st.st_gid == from).then(|| nix::unistd::Gid::from_raw(to));
        if uid.is_none() && gid.is_none() {
            return Ok(());
        }
        nix::unistd::fchownat(
            self.parent,
            self.name,
            uid,
            gid,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    /// Opens the entry (a regular file) for reading, without following a link.
    pub fn open(&self) -> io::Result<File> {
        let fd = openat(
            self.parent,
            self.name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} changed while it was read",
                self.rel.display()
            )));
        }
        Ok(file)
    }

    /// The target of the entry (a symlink), as written, never resolved.
    pub fn read_link(&self) -> io::Result<OsString> {
        Ok(readlinkat(self.parent, self.name)?)
    }
}

fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Tree {
    /// Opens `root`, a path of the platform's own (e.g. a layer directory
    /// under the state directory). Its last component must be a real
    /// directory, not a link.
    pub fn open(root: &Path) -> io::Result<Self> {
        let fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())?;
        Ok(Self { fd })
    }

    /// Opens the directory at `rel` beneath this one, following no link on
    /// the way: a link anywhere in `rel` fails with `ELOOP` (`ENOTDIR` when
    /// it is the last component), a path that would leave the tree with
    /// `EXDEV`.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Self> {
        let fd = self.open_beneath(rel, DIR_FLAGS)?;
        Ok(Self { fd })
    }

    /// Opens `rel` beneath this tree with `flags`, following no link.
    pub fn open_beneath(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        Ok(openat2(&self.fd, rel, how)?)
    }

    /// Visits every entry in the tree, parents before children, names in
    /// byte order; directories named in `skip` (at any depth) are left out.
    pub fn walk(
        &self,
        skip: &[&str],
        visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        walk_dir(self.fd.as_fd(), &mut PathBuf::new(), 0, skip, visit)
    }
}

impl AsFd for Tree {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let fd = openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    let mut d = Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    names.sort();
    Ok(names)
}

fn walk_dir(
    dir: BorrowedFd<'_>,
    rel: &mut PathBuf,
    depth: usize,
    skip: &[&str],
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!(
            "{} nests directories more than {MAX_DEPTH} deep",
            rel.display()
        )));
    }
    for name in list(dir)? {
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let st = fstatat(
            dir,
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        let kind = kind_of(&st);
        rel.push(&name);
        let entry = Entry {
            rel,
            kind,
            mode: st.st_mode & 0o7777,
            len: st.st_size as u64,
            parent: dir,
            name: &name,
        };
        let result = visit(&entry).and_then(|()| {
            if kind == Kind::Dir {
                let child = openat(dir, name.as_os_str(), DIR_FLAGS, Mode::empty())?;
                walk_dir(child.as_fd(), rel, depth + 1, skip, visit)
            } else {
                Ok(())
            }
        });
        rel.pop();
        result?;
    }
    Ok(())
}

/// Removes `path` (the platform's own name for a tree a tenant wrote, such
/// as a layer directory) and everything under it, following no link. It is
/// not a link itself, or nothing is removed.
///
/// Unlike `std::fs::remove_dir_all`, which recurses once per level and
/// aborts the whole process when a tenant nests directories some ten
/// thousand deep (stack overflow), this keeps its own stack of names and
/// holds two descriptors at most. It climbs back with `..` and checks that
/// it arrived where it came from (device and inode), so a directory moved
/// away meanwhile fails the removal instead of leading out of the tree.
/// A missing `path` is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other(format!(
            "{} is not a directory to remove",
            path.display()
        )));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent = nix::fcntl::open(parent, DIR_FLAGS, Mode::empty())?;
    match fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
        Ok(st) if kind_of(&st) != Kind::Dir => {
            unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir)?;
            return Ok(());
        }
        Ok(_) => {}
    }
    empty_dir(openat(&parent, name, DIR_FLAGS, Mode::empty())?)?;
    match unlinkat(&parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One directory on the way down: its name in its parent, what it is, and
/// the subdirectories still to remove.
struct Level {
    name: OsString,
    id: (u64, u64),
    pending: Vec<OsString>,
}

/// Removes everything in `top`, depth first, without recursion.
fn empty_dir(top: OwnedFd) -> io::Result<()> {
    let id = |fd: BorrowedFd<'_>| -> io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(fd)?;
        Ok((st.st_dev, st.st_ino))
    };
    let mut cur = top;
    let mut stack = vec![Level {
        name: OsString::new(),
        id: id(cur.as_fd())?,
        pending: clear_files(cur.as_fd())?,
    }];
    while let Some(level) = stack.last_mut() {
        if let Some(child) = level.pending.pop() {
            // A subdirectory: go down and clear its files.
            let fd = match openat(&cur, child.as_os_str(), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            stack.push(Level {
                name: child,
                id: id(fd.as_fd())?,
                pending: clear_files(fd.as_fd())?,
            });
            cur = fd;
            continue;
        }
        // Everything below is gone: climb back and remove this directory
        // (the top one is the caller's to remove).
        let Some(done) = stack.pop() else { break };
        let Some(parent) = stack.last() else { break };
        let up = openat(&cur, "..", DIR_FLAGS, Mode::empty())?;
        if id(up.as_fd())? != parent.id {
            return Err(io::Error::other(
                "a directory was moved while it was being removed",
            ));
        }
        match unlinkat(&up, done.name.as_os_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        cur = up;
    }
    Ok(())
}

/// Unlinks everything in `dir` that is not a directory and returns the
/// names of the subdirectories.
fn clear_files(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut dirs = Vec::new();
    for name in list(dir)? {
        let st = match fstatat(
            dir,
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if kind_of(&st) == Kind::Dir {
            dirs.push(name);
        } else {
            match unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn walked(tree: &Tree) -> Vec<(String, Kind)> {
        let mut out = Vec::new();
        tree.walk(&[".git"], &mut |e| {
            out.push((e.rel.display().to_string(), e.kind));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn a_walk_sees_links_as_links_and_never_leaves_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("a/b/f"), "x").unwrap();
        std::fs::create_dir_all(t.path().join(".git")).unwrap();
        std::fs::write(t.path().join(".git/HEAD"), "x").unwrap();
        symlink(outside.path(), t.path().join("a/out")).unwrap();
        let tree = Tree::open(t.path()).unwrap();
        assert_eq!(
            walked(&tree),
            vec![
                ("a".to_string(), Kind::Dir),
                ("a/b".to_string(), Kind::Dir),
                ("a/b/f".to_string(), Kind::File),
                ("a/out".to_string(), Kind::Symlink),
            ]
        );
        let mut target = None;
        tree.walk(&[], &mut |e| {
            if e.kind == Kind::Symlink {
                target = Some(e.read_link()?);
                // Opening a link as a file is refused, not followed.
                assert!(e.open().is_err());
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(target.as_deref(), Some(outside.path().as_os_str()));
    }

    #[test]
    fn paths_resolve_beneath_the_tree_without_links() {
        let outside = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("real/dir")).unwrap();
        symlink(outside.path(), t.path().join("abs")).unwrap();
        symlink("real", t.path().join("rel")).unwrap();
        let tree = Tree::open(t.path()).unwrap();
        assert!(tree.open_dir(Path::new("real/dir")).is_ok());
        for bad in ["abs", "rel/dir", "../", "real/../../x"] {
            let err = tree.open_dir(Path::new(bad)).unwrap_err();
            assert!(
                matches!(
                    err.raw_os_error(),
                    Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR)
                ),
                "{bad}: {err}"
            );
        }
        // The root itself must not be a link either.
        assert!(Tree::open(&t.path().join("abs")).is_err());
    }

    #[test]
    fn a_tree_nested_too_deep_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut p = t.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 1 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let tree = Tree::open(t.path()).unwrap();
        let err = tree.walk(&[], &mut |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
    #[test]
    fn remove_tree_removes_what_is_beneath_and_nothing_a_link_points_at() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "k").unwrap();
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("layer");
        std::fs::create_dir_all(victim.join("a/b/c")).unwrap();
        std::fs::write(victim.join("a/b/c/f"), "x").unwrap();
        std::fs::write(victim.join("a/f"), "x").unwrap();
        symlink(outside.path(), victim.join("a/b/link")).unwrap();
        symlink(outside.path().join("keep"), victim.join("file-link")).unwrap();
        remove_tree(&victim).unwrap();
        assert!(!victim.exists());
        assert!(outside.path().join("keep").exists());
        // Gone already: fine.
        remove_tree(&victim).unwrap();
        // A link given as the tree is removed as a link, not followed.
        symlink(outside.path(), t.path().join("l")).unwrap();
        remove_tree(&t.path().join("l")).unwrap();
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn remove_tree_survives_a_tree_nested_far_deeper_than_a_stack() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("deep");
        std::fs::create_dir(&top).unwrap();
        // 20 000 levels: std::fs::remove_dir_all overflows its stack here.
        let mut fd = nix::fcntl::open(&top, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..20_000 {
            nix::sys::stat::mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        nix::fcntl::openat(
            &fd,
            "f",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        drop(fd);
        // On a small stack, as a tokio worker has.
        let path = top.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || remove_tree(&path))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!top.exists());
    }
}
