//! The system calls that building a sandbox makes, behind one small trait:
//! [`Kernel`] makes them, and in tests a recording double stands in (see
//! `plan.rs` for what decides which calls are made, and in what order).

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::resource::Resource;
use nix::sys::stat::{makedev, Mode, SFlag};
use nix::unistd::{Gid, Uid};

use crate::beneath::Tree;
use crate::idmap::RootAs;
use crate::mountapi::{self, MountAttr, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::seccomp::Filters;

/// What executing a plan asks of the kernel. Each method is one system
/// call, or one small group of them with a single purpose.
pub(crate) trait Syscalls {
    /// Keeps a place resolved in the image valid until it is dropped.
    type Held;

    fn set_parent_death_signal(&mut self) -> io::Result<()>;
    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    /// Mounts `source` on `target` idmapped (a persistent instance's layer).
    fn bind_idmapped(&mut self, source: &Path, target: &Path) -> io::Result<()>;
    /// Mounts a copy of the detached mount `fd` on `target` (read-only,
    /// nosuid, nodev), then closes `fd`.
    fn attach_warm_root(&mut self, fd: RawFd, target: &Path) -> io::Result<()>;
    fn exists(&mut self, path: &Path) -> bool;
    fn create_dir(&mut self, path: &Path) -> io::Result<()>;
    fn copy_file(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    fn chdir(&mut self, dir: &Path) -> io::Result<()>;
    /// Opens the root file system to resolve places in it.
    fn open_image(&mut self, root: &Path) -> io::Result<()>;
    /// Resolves `rel` beneath the opened image with no link on the way;
    /// returns a path that names what was resolved while `Held` lives.
    fn resolve_in_image(&mut self, rel: &Path) -> io::Result<(PathBuf, Self::Held)>;
    fn mknod_char(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()>;
    fn chmod(&mut self, path: &Path, mode: u32) -> io::Result<()>;
    fn symlink(&mut self, target: &Path, link: &Path) -> io::Result<()>;
    /// `pivot_root(".", ".")`.
    fn pivot_root_here(&mut self) -> io::Result<()>;
    /// `umount2(".", MNT_DETACH)`.
    fn detach_here(&mut self) -> io::Result<()>;
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    fn loopback_up(&mut self) -> io::Result<()>;
    fn wait_for_outbound(&mut self) -> io::Result<()>;
    fn stdin_from_dev_null(&mut self) -> io::Result<()>;
    /// Sets the soft and the hard limit to `value`.
    fn setrlimit(&mut self, resource: Resource, value: u64) -> io::Result<()>;
    fn clear_caps(&mut self, set: caps::CapSet) -> io::Result<()>;
    fn drop_bounding_cap(&mut self, cap: caps::Capability) -> io::Result<()>;
    fn set_caps(&mut self, set: caps::CapSet, caps: &caps::CapsHashSet) -> io::Result<()>;
    fn setgroups(&mut self, gids: &[u32]) -> io::Result<()>;
    fn setresgid(&mut self, gid: u32) -> io::Result<()>;
    fn setresuid(&mut self, uid: u32) -> io::Result<()>;
    fn set_no_new_privs(&mut self) -> io::Result<()>;
    /// Tells the platform everything is built, and waits for its go.
    fn hold(&mut self) -> io::Result<()>;
    /// Tells the platform the command is about to be executed.
    fn announce_exec(&mut self) -> io::Result<()>;
    fn install_filters(&mut self, filters: &Filters) -> io::Result<()>;
    /// Replaces the process; returns only when that failed (or, for a
    /// double, with `Ok`).
    fn execvpe(&mut self, argv: &[CString], env: &[CString]) -> io::Result<()>;
}

/// The real system calls, for the sandbox's pid 1 and its command.
pub(crate) struct Kernel<'a> {
    /// The root file system, once opened.
    image: Option<Tree>,
    root_as: Option<&'a RootAs>,
    control: Option<&'a mut UnixStream>,
}

impl<'a> Kernel<'a> {
    pub fn new(root_as: Option<&'a RootAs>, control: Option<&'a mut UnixStream>) -> Self {
        Self {
            image: None,
            root_as,
            control,
        }
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Syscalls for Kernel<'_> {
    type Held = OwnedFd;

    fn set_parent_death_signal(&mut self) -> io::Result<()> {
        Ok(nix::sys::prctl::set_pdeathsig(
            nix::sys::signal::Signal::SIGKILL,
        )?)
    }

    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        Ok(nix::mount::mount(source, target, fstype, flags, data)?)
    }

    fn bind_idmapped(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        match self.root_as {
            Some(map) => map.bind(source, target).map_err(io::Error::other),
            None => Err(other("no user namespace was made for idmapped layers")),
        }
    }

    fn attach_warm_root(&mut self, fd: RawFd, target: &Path) -> io::Result<()> {
        // SAFETY: the helper gave up its ownership of this descriptor for
        // this step (`init.rs`); it is closed when this returns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let target = CString::new(target.as_os_str().as_encoded_bytes()).map_err(other)?;
        let copy = mountapi::clone_mount(fd.as_fd())?;
        // The source was made so; said again for this copy, which is what
        // the instance sees.
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        mountapi::set_attrs(&copy, &attr)?;
        mountapi::attach(&copy, &target)
    }

    fn exists(&mut self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn copy_file(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::copy(from, to).map(drop)
    }

    fn chdir(&mut self, dir: &Path) -> io::Result<()> {
        Ok(nix::unistd::chdir(dir)?)
    }

    fn open_image(&mut self, root: &Path) -> io::Result<()> {
        self.image = Some(Tree::open(root)?);
        Ok(())
    }

    fn resolve_in_image(&mut self, rel: &Path) -> io::Result<(PathBuf, OwnedFd)> {
        let image = self
            .image
            .as_ref()
            .ok_or_else(|| other("the root file system is not open"))?;
        let fd = image.open_beneath(rel, OFlag::O_PATH)?;
        // Mounting on /proc/self/fd/N mounts on what the descriptor holds,
        // whatever the path would resolve to now.
        Ok((
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            fd,
        ))
    }

    fn mknod_char(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()> {
        Ok(nix::sys::stat::mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(major, minor),
        )?)
    }

    fn chmod(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
    }

    fn symlink(&mut self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn pivot_root_here(&mut self) -> io::Result<()> {
        Ok(nix::unistd::pivot_root(".", ".")?)
    }

    fn detach_here(&mut self) -> io::Result<()> {
        Ok(nix::mount::umount2(".", MntFlags::MNT_DETACH)?)
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        Ok(nix::unistd::sethostname(name)?)
    }

    fn loopback_up(&mut self) -> io::Result<()> {
        loopback_up().map_err(io::Error::other)
    }

    fn wait_for_outbound(&mut self) -> io::Result<()> {
        crate::outbound::wait_until_configured().map_err(io::Error::other)
    }

    fn stdin_from_dev_null(&mut self) -> io::Result<()> {
        let null = std::fs::File::open("/dev/null")?;
        Ok(nix::unistd::dup2_stdin(&null)?)
    }

    fn setrlimit(&mut self, resource: Resource, value: u64) -> io::Result<()> {
        Ok(nix::sys::resource::setrlimit(resource, value, value)?)
    }

    fn clear_caps(&mut self, set: caps::CapSet) -> io::Result<()> {
        caps::clear(None, set).map_err(other)
    }

    fn drop_bounding_cap(&mut self, cap: caps::Capability) -> io::Result<()> {
        caps::drop(None, caps::CapSet::Bounding, cap).map_err(other)
    }

    fn set_caps(&mut self, set: caps::CapSet, caps: &caps::CapsHashSet) -> io::Result<()> {
        caps::set(None, set, caps).map_err(other)
    }

    fn setgroups(&mut self, gids: &[u32]) -> io::Result<()> {
        let gids: Vec<Gid> = gids.iter().map(|&g| Gid::from_raw(g)).collect();
        Ok(nix::unistd::setgroups(&gids)?)
    }

    fn setresgid(&mut self, gid: u32) -> io::Result<()> {
        let gid = Gid::from_raw(gid);
        Ok(nix::unistd::setresgid(gid, gid, gid)?)
    }

    fn setresuid(&mut self, uid: u32) -> io::Result<()> {
        let uid = Uid::from_raw(uid);
        Ok(nix::unistd::setresuid(uid, uid, uid)?)
    }

    fn set_no_new_privs(&mut self) -> io::Result<()> {
        Ok(nix::sys::prctl::set_no_new_privs()?)
    }

    fn hold(&mut self) -> io::Result<()> {
        let control = self
            .control
            .as_mut()
            .ok_or_else(|| other("no control socket to hold on"))?;
        control.write_all(b"held\n")?;
        let mut go = [0u8; 1];
        match control.read(&mut go)? {
            1 if go[0] == b'g' => Ok(()),
            // The platform went away (or discarded the sandbox): no exec.
            _ => Err(other("the platform gave no go")),
        }
    }

    fn announce_exec(&mut self) -> io::Result<()> {
        match self.control.as_mut() {
            Some(control) => control.write_all(b"exec\n"),
            None => Err(other("no control socket to announce the exec on")),
        }
    }

    fn install_filters(&mut self, filters: &Filters) -> io::Result<()> {
        filters.install().map_err(io::Error::other)
    }

    fn execvpe(&mut self, argv: &[CString], env: &[CString]) -> io::Result<()> {
        let program = argv.first().ok_or_else(|| other("empty command"))?;
        // skiff (Rust) ignores SIGPIPE, and an ignored signal stays ignored
        // across exec: the command starts with the default, as from a
        // shell, so `yes | head -1` ends quietly.
        // SAFETY: setting a signal's disposition to SIG_DFL installs no
        // handler; nothing in this single-threaded process relies on it.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        }
        .map_err(io::Error::from)?;
        // The program is looked up in the command's own PATH (glibc's
        // execvpe would use this process's, which is skiff's).
        let mut denied = false;
        for path in candidates(program, env) {
            match nix::unistd::execve(&path, argv, env) {
                Ok(never) => match never {},
                // Not there (or not a directory on the way): the next.
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
                Err(nix::errno::Errno::EACCES) => denied = true,
                Err(e) => return Err(e.into()),
            }
        }
        Err(if denied {
            io::Error::from_raw_os_error(libc::EACCES)
        } else {
            io::Error::from_raw_os_error(libc::ENOENT)
        })
    }
}

/// Where `program` is looked for: itself when it names a path, else in
/// each directory of the `PATH` in `env` (the last one set wins, as in a
/// shell; an empty entry is the working directory), or a standard one.
pub(crate) fn candidates(program: &CStr, env: &[CString]) -> Vec<CString> {
    let name = program.to_bytes();
    if name.contains(&b'/') {
        return vec![program.to_owned()];
    }
    if name.is_empty() {
        return Vec::new();
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.to_bytes().strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    path.split(|b| *b == b':')
        .filter_map(|dir| {
            let mut full = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.to_vec()
            };
            full.push(b'/');
            full.extend_from_slice(name);
            CString::new(full).ok()
        })
        .collect()
}

/// A new network namespace starts with `lo` down; the service and the
/// platform's health checks both need it up.
fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq
    // whose name is a NUL-terminated "lo"; the socket is closed by OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", io::Error::last_os_error()));
        }
        let _guard = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(format!("reading lo flags: {}", io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(format!("bringing lo up: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A test double that records the calls it is asked to make and makes
/// none; it fails the calls a test chooses.
#[cfg(test)]
pub(crate) mod recording {
    use super::*;

    /// One recorded call, with its arguments.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        ParentDeathSignal,
        Mount {
            source: Option<PathBuf>,
            target: PathBuf,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        BindIdmapped(PathBuf, PathBuf),
        AttachWarmRoot(RawFd, PathBuf),
        Exists(PathBuf),
        CreateDir(PathBuf),
        CopyFile(PathBuf, PathBuf),
        Chdir(PathBuf),
        OpenImage(PathBuf),
        ResolveInImage(PathBuf),
        Mknod(PathBuf, u32, u64, u64),
        Chmod(PathBuf, u32),
        Symlink(PathBuf, PathBuf),
        PivotRoot,
        DetachOldRoot,
        SetHostname(String),
        LoopbackUp,
        WaitForOutbound,
        StdinFromDevNull,
        SetRlimit(Resource, u64),
        /// The set by name (`caps::CapSet` cannot be compared).
        ClearCaps(String),
        DropBoundingCap(caps::Capability),
        SetCaps(String, Vec<caps::Capability>),
        SetGroups(Vec<u32>),
        SetResGid(u32),
        SetResUid(u32),
        NoNewPrivs,
        Hold,
        AnnounceExec,
        InstallFilters,
        Execvpe(Vec<String>, Vec<String>),
    }

    /// Which calls fail: given the call's number (from 0) and the call.
    pub type FailWhen = Box<dyn Fn(usize, &Call) -> bool>;

    /// Records every call; answers `exists` with false for `missing`, and
    /// fails the calls `fail` picks with EPERM.
    #[derive(Default)]
    pub struct Recorder {
        pub calls: Vec<Call>,
        pub missing: Vec<PathBuf>,
        pub fail: Option<FailWhen>,
    }

    /// Where a place in the image is said to be while it is "held".
    pub const HELD_PREFIX: &str = "/held";

    impl Recorder {
        fn record(&mut self, call: Call) -> io::Result<()> {
            let fails = self
                .fail
                .as_ref()
                .is_some_and(|f| f(self.calls.len(), &call));
            self.calls.push(call);
            if fails {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            } else {
                Ok(())
            }
        }
    }

    fn text(c: &CString) -> String {
        c.to_string_lossy().into_owned()
    }

    impl Syscalls for Recorder {
        type Held = ();

        fn set_parent_death_signal(&mut self) -> io::Result<()> {
            self.record(Call::ParentDeathSignal)
        }
        fn mount(
            &mut self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> io::Result<()> {
            self.record(Call::Mount {
                source: source.map(Path::to_path_buf),
                target: target.to_path_buf(),
                fstype: fstype.map(str::to_string),
                flags,
                data: data.map(str::to_string),
            })
        }
        fn bind_idmapped(&mut self, source: &Path, target: &Path) -> io::Result<()> {
            self.record(Call::BindIdmapped(source.into(), target.into()))
        }
        fn attach_warm_root(&mut self, fd: RawFd, target: &Path) -> io::Result<()> {
            self.record(Call::AttachWarmRoot(fd, target.into()))
        }
        fn exists(&mut self, path: &Path) -> bool {
            let _ = self.record(Call::Exists(path.into()));
            !self.missing.iter().any(|m| m == path)
        }
        fn create_dir(&mut self, path: &Path) -> io::Result<()> {
            self.record(Call::CreateDir(path.into()))
        }
        fn copy_file(&mut self, from: &Path, to: &Path) -> io::Result<()> {
            self.record(Call::CopyFile(from.into(), to.into()))
        }
        fn chdir(&mut self, dir: &Path) -> io::Result<()> {
            self.record(Call::Chdir(dir.into()))
        }
        fn open_image(&mut self, root: &Path) -> io::Result<()> {
            self.record(Call::OpenImage(root.into()))
        }
        fn resolve_in_image(&mut self, rel: &Path) -> io::Result<(PathBuf, ())> {
            self.record(Call::ResolveInImage(rel.into()))?;
            Ok((Path::new(HELD_PREFIX).join(rel), ()))
        }
        fn mknod_char(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()> {
            self.record(Call::Mknod(path.into(), mode, major, minor))
        }
        fn chmod(&mut self, path: &Path, mode: u32) -> io::Result<()> {
            self.record(Call::Chmod(path.into(), mode))
        }
        fn symlink(&mut self, target: &Path, link: &Path) -> io::Result<()> {
            self.record(Call::Symlink(target.into(), link.into()))
        }
        fn pivot_root_here(&mut self) -> io::Result<()> {
            self.record(Call::PivotRoot)
        }
        fn detach_here(&mut self) -> io::Result<()> {
            self.record(Call::DetachOldRoot)
        }
        fn sethostname(&mut self, name: &str) -> io::Result<()> {
            self.record(Call::SetHostname(name.into()))
        }
        fn loopback_up(&mut self) -> io::Result<()> {
            self.record(Call::LoopbackUp)
        }
        fn wait_for_outbound(&mut self) -> io::Result<()> {
            self.record(Call::WaitForOutbound)
        }
        fn stdin_from_dev_null(&mut self) -> io::Result<()> {
            self.record(Call::StdinFromDevNull)
        }
        fn setrlimit(&mut self, resource: Resource, value: u64) -> io::Result<()> {
            self.record(Call::SetRlimit(resource, value))
        }
        fn clear_caps(&mut self, set: caps::CapSet) -> io::Result<()> {
            self.record(Call::ClearCaps(format!("{set:?}")))
        }
        fn drop_bounding_cap(&mut self, cap: caps::Capability) -> io::Result<()> {
            self.record(Call::DropBoundingCap(cap))
        }
        fn set_caps(&mut self, set: caps::CapSet, caps: &caps::CapsHashSet) -> io::Result<()> {
            let mut caps: Vec<_> = caps.iter().copied().collect();
            caps.sort_by_key(|c| c.index());
            self.record(Call::SetCaps(format!("{set:?}"), caps))
        }
        fn setgroups(&mut self, gids: &[u32]) -> io::Result<()> {
            self.record(Call::SetGroups(gids.to_vec()))
        }
        fn setresgid(&mut self, gid: u32) -> io::Result<()> {
            self.record(Call::SetResGid(gid))
        }
        fn setresuid(&mut self, uid: u32) -> io::Result<()> {
            self.record(Call::SetResUid(uid))
        }
        fn set_no_new_privs(&mut self) -> io::Result<()> {
            self.record(Call::NoNewPrivs)
        }
        fn hold(&mut self) -> io::Result<()> {
            self.record(Call::Hold)
        }
        fn announce_exec(&mut self) -> io::Result<()> {
            self.record(Call::AnnounceExec)
        }
        fn install_filters(&mut self, _: &Filters) -> io::Result<()> {
            self.record(Call::InstallFilters)
        }
        fn execvpe(&mut self, argv: &[CString], env: &[CString]) -> io::Result<()> {
            self.record(Call::Execvpe(
                argv.iter().map(text).collect(),
                env.iter().map(text).collect(),
            ))
        }
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn texts(v: Vec<CString>) -> Vec<String> {
        v.into_iter().map(|c| c.into_string().unwrap()).collect()
    }

    /// The command's PATH decides, not the platform's; a path is used as
    /// it is.
    #[test]
    fn a_program_is_looked_up_in_the_commands_own_path() {
        let env = [c("LANG=C.UTF-8"), c("PATH=/app/bin::/usr/bin")];
        assert_eq!(
            texts(candidates(&c("bash"), &env)),
            ["/app/bin/bash", "./bash", "/usr/bin/bash"]
        );
        assert_eq!(texts(candidates(&c("./server"), &env)), ["./server"]);
        assert_eq!(texts(candidates(&c("/bin/sh"), &env)), ["/bin/sh"]);
        // Set twice (the manifest's [env] after the platform's): the last.
        let twice = [c("PATH=/usr/bin"), c("PATH=/opt/x/bin")];
        assert_eq!(texts(candidates(&c("x"), &twice)), ["/opt/x/bin/x"]);
        // None set: a standard one.
        assert_eq!(
            texts(candidates(&c("env"), &[])),
            ["/usr/local/bin/env", "/usr/bin/env", "/bin/env"]
        );
        assert!(candidates(&c(""), &env).is_empty());
    }
}
