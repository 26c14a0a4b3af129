//! Per-instance cgroups on this host's hybrid layout: memory, pids and cpu
//! limits in the v1 hierarchies, and a cgroup2 group under
//! `/sys/fs/cgroup/unified` for freezing and killing the whole tree (its
//! `cgroup.freeze` thaws in ~0.2 ms, its `cgroup.kill` is atomic).

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use std::time::{Duration, Instant};

/// Limits written into an instance's cgroups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u32,
    /// CPU time in cores, e.g. 0.5.
    pub cpu: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "this host has no {0} (skiff needs the cgroup v1 memory, pids and cpu controllers \
         and cgroup2 mounted at /sys/fs/cgroup/unified)"
    )]
    Missing(PathBuf),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the processes of cgroup {0} did not all exit")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroups of one instance. Create with [`Cgroups::create`]; remove with
/// [`Cgroups::remove`] once its processes are gone.
#[derive(Debug)]
pub struct Cgroups {
    /// `memory`, `pids`, `cpu` (v1) and `unified` (cgroup2) directories.
    v1: Vec<PathBuf>,
    unified: PathBuf,
}

const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

impl Cgroups {
    /// Creates `<root>/<controller>/skiff/<id>` for each controller and writes the limits.
    pub fn create(root: &Path, id: &str, limits: CgroupLimits) -> Result<Self, CgroupError> {
        let mut v1 = Vec::new();
        for c in V1_CONTROLLERS {
            let top = root.join(c);
            if !top.join("cgroup.procs").exists() {
                return Err(CgroupError::Missing(top));
            }
            v1.push(top.join("skiff").join(id));
        }
        let unified_top = root.join("unified");
        if !unified_top.join("cgroup.procs").exists() {
            return Err(CgroupError::Missing(unified_top));
        }
        let me = Self {
            v1,
            unified: unified_top.join("skiff").join(id),
        };
        for dir in me.dirs() {
            // Another instance's `remove` may take the shared parent away
            // between the two mkdirs of create_dir_all; trying again mends it.
            let mut tries = 0;
            while let Err(e) = fs::create_dir_all(dir) {
                tries += 1;
                if e.kind() != io::ErrorKind::NotFound || tries == 5 {
                    let _ = me.remove(Duration::ZERO);
                    return Err(io_err(dir)(e));
                }
            }
        }
        if let Err(e) = me.write_limits(limits) {
            let _ = me.remove(Duration::ZERO);
            return Err(e);
        }
        Ok(me)
    }

    /// Removes the cgroups of instances whose platform died without removing
    /// them (it was SIGKILLed), as `is_stale` tells from the instance id.
    /// Their processes died with the platform (parent-death signal); any
    /// left are killed. Returns the ids removed.
    pub fn sweep(root: &Path, is_stale: impl Fn(&str) -> bool) -> Vec<String> {
        let mut ids: Vec<String> = V1_CONTROLLERS
            .iter()
            .chain(std::iter::once(&"unified"))
            .filter_map(|c| fs::read_dir(root.join(c).join("skiff")).ok())
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| is_stale(id))
            .collect();
        ids.sort();
        ids.dedup();
        ids.retain(|id| {
            let stale = Self {
                v1: V1_CONTROLLERS
                    .iter()
                    .map(|c| root.join(c).join("skiff").join(id))
                    .collect(),
                unified: root.join("unified").join("skiff").join(id),
            };
            stale.remove(Duration::from_secs(2)).is_ok()
        });
        ids
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.v1.iter().chain(std::iter::once(&self.unified))
    }

    fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io_err(&path))
    }

    fn write_limits(&self, l: CgroupLimits) -> Result<(), CgroupError> {
        let [memory, pids, cpu] = [&self.v1[0], &self.v1[1], &self.v1[2]];
        Self::write(memory, "memory.limit_in_bytes", &l.memory_bytes.to_string())?;
        // Without swap accounting this file is absent; with it, swap may not
        // be used to exceed the limit.
        if memory.join("memory.memsw.limit_in_bytes").exists() {
            Self::write(
                memory,
                "memory.memsw.limit_in_bytes",
                &l.memory_bytes.to_string(),
            )?;
        }
        Self::write(pids, "pids.max", &l.pids.to_string())?;
        let period = 100_000u64;
        let quota = ((l.cpu * period as f64) as u64).max(1000);
        Self::write(cpu, "cpu.cfs_period_us", &period.to_string())?;
        Self::write(cpu, "cpu.cfs_quota_us", &quota.to_string())?;
        Ok(())
    }

    /// What a process needs to enter these groups by itself, without the
    /// global lock a move by another process takes (whose first use after
    /// a quiet while waits for an RCU grace period, milliseconds): each v1
    /// group's `tasks`, where writing `0` moves the writing thread alone,
    /// and the cgroup2 directory, to clone a child straight into
    /// (`clone3` with `CLONE_INTO_CGROUP`). The descriptors are at 64 or
    /// above and close on exec.
    pub fn entry(&self) -> Result<Entry, CgroupError> {
        let open = |path: &Path, flags: OFlag| {
            let fd = nix::fcntl::open(
                path,
                flags | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| io_err(path)(e.into()))?;
            // Above the numbers a helper puts them at (see `spawn.rs`).
            let high = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64))
                .map_err(|e| io_err(path)(e.into()))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
            Ok::<_, CgroupError>(unsafe { OwnedFd::from_raw_fd(high) })
        };
        let mut tasks = Vec::new();
        for dir in &self.v1 {
            tasks.push(open(&dir.join("tasks"), OFlag::O_WRONLY)?);
        }
        Ok(Entry {
            tasks,
            unified: open(&self.unified, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?,
        })
    }

    /// Process ids currently in the instance.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.unified.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// How many processes the kernel killed for going over the memory
    /// limit (v1 `memory.oom_control`, `oom_kill`; 0 when unknown).
    pub fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.v1[0].join("memory.oom_control"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Whether any process is left (cgroup2 `populated`).
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.unified.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Sends SIGKILL to every process of the instance at once.
    pub fn kill(&self) -> Result<(), CgroupError> {
        Self::write(&self.unified, "cgroup.kill", "1")
    }

    /// Freezes (true) or thaws (false) every process of the instance.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let freezer = self.freezer();
        freezer.set(frozen).map_err(io_err(&freezer.file))
    }

    /// A handle that freezes and thaws this instance, usable from anywhere.
    pub fn freezer(&self) -> Freezer {
        Freezer {
            file: self.unified.join("cgroup.freeze"),
            memory: self.v1.first().map(|m| m.join("memory.usage_in_bytes")),
        }
    }

    /// Removes the groups; kills what is left first. While the kernel still
    /// holds a group (its last tasks exiting) this waits, at least 2 s and up
    /// to `grace`, sleeping in 2 ms steps: call it off the async threads
    /// when processes may be left.
    pub fn remove(&self, grace: Duration) -> Result<(), CgroupError> {
        if self.unified.exists() && self.populated() {
            let _ = self.kill();
        }
        let deadline = Instant::now() + grace.max(Duration::from_secs(2));
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        return Err(CgroupError::Busy(dir.clone()))
                    }
                    Err(e) => return Err(io_err(dir)(e)),
                }
            }
            // The shared `skiff` parent goes too when this was the last
            // instance; another instance's presence makes this fail harmlessly.
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

/// Descriptors to enter an instance's cgroups from inside the process
/// that enters them ([`Cgroups::entry`]).
#[derive(Debug)]
pub struct Entry {
    /// The v1 groups' `tasks` files, in `memory`, `pids`, `cpu` order.
    pub tasks: Vec<OwnedFd>,
    /// The cgroup2 group's directory.
    pub unified: OwnedFd,
}

/// Freezes and thaws one instance's whole process tree (cgroup2
/// `cgroup.freeze`): a frozen instance gets no CPU at all. Writing the file
/// takes effect at once; the kernel finishes stopping tasks shortly after.
/// Also tells what the instance has used (CPU time, memory).
#[derive(Debug, Clone)]
pub struct Freezer {
    file: PathBuf,
    /// The v1 memory group's `memory.usage_in_bytes`.
    memory: Option<PathBuf>,
}

impl Freezer {
    pub fn set(&self, frozen: bool) -> io::Result<()> {
        fs::write(&self.file, if frozen { "1" } else { "0" })
    }

    /// The CPU time the instance's processes have used so far (the group's
    /// `cpu.stat`, which cgroup2 keeps without any controller enabled).
    pub fn cpu_used(&self) -> io::Result<Duration> {
        let stat = fs::read_to_string(self.file.with_file_name("cpu.stat"))?;
        cpu_usage_usec(&stat)
            .map(Duration::from_micros)
            .ok_or_else(|| io::Error::other("cpu.stat has no usage_usec line"))
    }
}

impl Freezer {
    /// The memory the instance's processes use now, the files of its
    /// `/tmp` included (the v1 memory group's `memory.usage_in_bytes`).
    pub fn memory_used(&self) -> io::Result<u64> {
        let file = self
            .memory
            .as_ref()
            .ok_or_else(|| io::Error::other("the instance has no memory group"))?;
        fs::read_to_string(file)?
            .trim()
            .parse()
            .map_err(io::Error::other)
    }
}

/// `usage_usec` of a cgroup2 `cpu.stat`.
fn cpu_usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    //! The cgroup code against a directory that looks like this host's
    //! hierarchies (each controller's top with its `cgroup.procs`): what is
    //! written where, what is read, and how failures read. The kernel's own
    //! behaviour (limits enforced, groups removed while files remain) is the
    //! end-to-end tests' part.
    use super::*;

    const LIMITS: CgroupLimits = CgroupLimits {
        memory_bytes: 256 << 20,
        pids: 64,
        cpu: 0.5,
    };

    fn hierarchies() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS.iter().chain(&["unified"]) {
            fs::create_dir(root.path().join(c)).unwrap();
            fs::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        root
    }

    fn read(root: &Path, rel: &str) -> String {
        fs::read_to_string(root.join(rel)).unwrap()
    }

    #[test]
    fn create_makes_a_group_per_controller_and_writes_the_limits() {
        let root = hierarchies();
        let r = root.path();
        let cg = Cgroups::create(r, "svc-1", LIMITS).unwrap();
        for c in ["memory", "pids", "cpu", "unified"] {
            assert!(r.join(c).join("skiff/svc-1").is_dir(), "{c}");
        }
        assert_eq!(
            read(r, "memory/skiff/svc-1/memory.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
        // No swap accounting here: the file is not made up.
        assert!(!r
            .join("memory/skiff/svc-1/memory.memsw.limit_in_bytes")
            .exists());
        assert_eq!(read(r, "pids/skiff/svc-1/pids.max"), "64");
        assert_eq!(read(r, "cpu/skiff/svc-1/cpu.cfs_period_us"), "100000");
        assert_eq!(read(r, "cpu/skiff/svc-1/cpu.cfs_quota_us"), "50000");
        assert_eq!(cg.unified, r.join("unified/skiff/svc-1"));
    }

    #[test]
    fn swap_is_limited_too_where_it_is_accounted() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        let memsw = cg.v1[0].join("memory.memsw.limit_in_bytes");
        fs::write(&memsw, "9223372036854771712").unwrap();
        cg.write_limits(CgroupLimits {
            memory_bytes: 128 << 20,
            ..LIMITS
        })
        .unwrap();
        assert_eq!(
            fs::read_to_string(memsw).unwrap(),
            (128u64 << 20).to_string()
        );
    }

    #[test]
    fn cpu_quota_follows_the_cores_with_a_floor() {
        let root = hierarchies();
        for (cpu, quota) in [
            (2.0, "200000"),
            (1.0, "100000"),
            (0.25, "25000"),
            (0.001, "1000"),
        ] {
            let id = format!("cpu-{quota}");
            let cg = Cgroups::create(root.path(), &id, CgroupLimits { cpu, ..LIMITS }).unwrap();
            assert_eq!(
                fs::read_to_string(cg.v1[2].join("cpu.cfs_quota_us")).unwrap(),
                quota,
                "{cpu}"
            );
        }
    }

    #[test]
    fn a_missing_controller_is_named_with_what_skiff_needs() {
        let root = hierarchies();
        fs::remove_file(root.path().join("pids/cgroup.procs")).unwrap();
        let err = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap_err();
        assert!(matches!(&err, CgroupError::Missing(p) if *p == root.path().join("pids")));
        let text = err.to_string();
        assert!(text.contains("this host has no "), "{text}");
        assert!(text.contains("cgroup v1 memory, pids and cpu"), "{text}");
        // Nothing was made.
        assert!(!root.path().join("memory/skiff").exists());

        let root = hierarchies();
        fs::remove_file(root.path().join("unified/cgroup.procs")).unwrap();
        let err = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap_err();
        assert!(matches!(&err, CgroupError::Missing(p) if *p == root.path().join("unified")));
    }

    #[test]
    fn a_group_that_cannot_be_made_is_reported_with_its_path_and_undone() {
        let root = hierarchies();
        // A file where the `skiff` directory of the cpu hierarchy goes.
        fs::write(root.path().join("cpu/skiff"), "").unwrap();
        let err = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap_err();
        let CgroupError::Io { path, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*path, root.path().join("cpu/skiff/svc-1"));
        assert!(err
            .to_string()
            .starts_with(&format!("cgroup {}: ", path.display())));
        // The groups made before it are removed again.
        assert!(!root.path().join("memory/skiff/svc-1").exists());
        assert!(!root.path().join("pids/skiff/svc-1").exists());
    }

    #[test]
    fn entry_opens_each_v1_tasks_file_and_the_cgroup2_directory_high_and_cloexec() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        for c in ["memory", "pids", "cpu"] {
            fs::write(root.path().join(c).join("skiff/svc-1/tasks"), "").unwrap();
        }
        let entry = cg.entry().unwrap();
        use std::os::fd::AsRawFd;
        for (fd, c) in entry.tasks.iter().zip(["memory", "pids", "cpu"]) {
            assert!(fd.as_raw_fd() >= 64);
            let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            assert_eq!(link, root.path().join(c).join("skiff/svc-1/tasks"));
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "{c}");
        }
        let link = fs::read_link(format!("/proc/self/fd/{}", entry.unified.as_raw_fd())).unwrap();
        assert_eq!(link, root.path().join("unified/skiff/svc-1"));
    }

    #[test]
    fn writing_to_a_group_that_is_gone_names_the_file() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        fs::write(root.path().join("memory/skiff/svc-1/tasks"), "").unwrap();
        fs::remove_dir_all(root.path().join("pids/skiff")).unwrap();
        let err = cg.entry().unwrap_err();
        let file = root.path().join("pids/skiff/svc-1/tasks");
        assert!(matches!(&err, CgroupError::Io { path, source }
            if *path == file && source.kind() == io::ErrorKind::NotFound));
        assert!(err.to_string().contains("pids/skiff/svc-1/tasks: "));
    }

    #[test]
    fn freeze_thaw_and_kill_write_the_cgroup2_files() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        let unified = root.path().join("unified/skiff/svc-1");
        cg.freeze(true).unwrap();
        assert_eq!(
            fs::read_to_string(unified.join("cgroup.freeze")).unwrap(),
            "1"
        );
        let freezer = cg.freezer();
        freezer.set(false).unwrap();
        assert_eq!(
            fs::read_to_string(unified.join("cgroup.freeze")).unwrap(),
            "0"
        );
        cg.kill().unwrap();
        assert_eq!(
            fs::read_to_string(unified.join("cgroup.kill")).unwrap(),
            "1"
        );
        // A freezer of a removed group says so.
        fs::remove_dir_all(root.path().join("unified/skiff")).unwrap();
        assert_eq!(
            freezer.set(true).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let err = cg.freeze(true).unwrap_err();
        assert!(matches!(&err, CgroupError::Io { path, .. }
            if *path == unified.join("cgroup.freeze")));
    }

    #[test]
    fn processes_populated_and_oom_kills_are_read_from_the_kernels_files() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        let unified = root.path().join("unified/skiff/svc-1");
        // Nothing to read yet: no process, none killed.
        assert_eq!(cg.pids(), Vec::<i32>::new());
        assert!(!cg.populated());
        assert_eq!(cg.oom_kills(), 0);
        fs::write(unified.join("cgroup.procs"), "12\n345\n\n").unwrap();
        fs::write(unified.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        fs::write(
            cg.v1[0].join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(cg.pids(), vec![12, 345]);
        assert!(cg.populated());
        assert_eq!(cg.oom_kills(), 3);
        fs::write(unified.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(!cg.populated());
    }

    #[test]
    fn remove_takes_the_groups_and_the_shared_parent_once_empty() {
        let root = hierarchies();
        let r = root.path();
        // The kernel's groups are empty directories to rmdir; here, ones
        // made without limit files.
        let bare = |id: &str| Cgroups {
            v1: V1_CONTROLLERS
                .iter()
                .map(|c| r.join(c).join("skiff").join(id))
                .collect(),
            unified: r.join("unified/skiff").join(id),
        };
        let (a, b) = (bare("a"), bare("b"));
        for dir in a.dirs().chain(b.dirs()) {
            fs::create_dir_all(dir).unwrap();
        }
        a.remove(Duration::ZERO).unwrap();
        assert!(!r.join("memory/skiff/a").exists());
        // Another instance's group keeps the shared parent.
        assert!(r.join("memory/skiff/b").exists());
        b.remove(Duration::ZERO).unwrap();
        assert!(!r.join("memory/skiff").exists());
        // Removing again is not an error.
        b.remove(Duration::ZERO).unwrap();
    }

    #[test]
    fn remove_reports_a_group_it_cannot_take() {
        let root = hierarchies();
        let cg = Cgroups::create(root.path(), "svc-1", LIMITS).unwrap();
        // A real group's files vanish with it; a plain directory's do not.
        let err = cg.remove(Duration::ZERO).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Io { path, .. }
            if *path == root.path().join("memory/skiff/svc-1")),
            "{err:?}"
        );
    }

    #[test]
    fn sweep_removes_only_the_stale_groups() {
        let root = hierarchies();
        let r = root.path();
        for id in ["inst-100-1", "inst-100-2", "inst-200-1"] {
            for c in ["memory", "pids", "cpu", "unified"] {
                fs::create_dir_all(r.join(c).join("skiff").join(id)).unwrap();
            }
        }
        // A group left in one hierarchy only is found too.
        fs::create_dir_all(r.join("unified/skiff/inst-100-3")).unwrap();
        let swept = Cgroups::sweep(r, |id| id.starts_with("inst-100-"));
        assert_eq!(swept, ["inst-100-1", "inst-100-2", "inst-100-3"]);
        for c in ["memory", "pids", "cpu", "unified"] {
            let left: Vec<_> = fs::read_dir(r.join(c).join("skiff"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(left, ["inst-200-1"], "{c}");
        }
        // A host without the hierarchies has nothing to sweep.
        let empty = tempfile::tempdir().unwrap();
        assert!(Cgroups::sweep(empty.path(), |_| true).is_empty());
    }

    #[test]
    fn cpu_usage_is_read_from_its_line() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(cpu_usage_usec(stat), Some(1_234_567));
        assert_eq!(cpu_usage_usec("user_usec 5\n"), None);
        assert_eq!(cpu_usage_usec("usage_usec x\n"), None);
    }

    #[test]
    fn a_freezer_reads_the_cpu_stat_beside_its_file_and_the_memory_group() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cpu.stat"), "usage_usec 42\n").unwrap();
        fs::write(dir.path().join("memory.usage_in_bytes"), "1048576\n").unwrap();
        let fz = Freezer {
            file: dir.path().join("cgroup.freeze"),
            memory: Some(dir.path().join("memory.usage_in_bytes")),
        };
        assert_eq!(fz.cpu_used().unwrap(), Duration::from_micros(42));
        assert_eq!(fz.memory_used().unwrap(), 1 << 20);
        let none = Freezer {
            memory: None,
            ..fz.clone()
        };
        assert!(none.memory_used().is_err());
        fz.set(true).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        fs::remove_file(dir.path().join("cpu.stat")).unwrap();
        assert!(fz.cpu_used().is_err());
    }
}
