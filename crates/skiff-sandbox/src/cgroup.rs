//! Per-instance cgroups on this host's hybrid layout: memory, pids and cpu
//! limits in the v1 hierarchies, and a cgroup2 group under
//! `/sys/fs/cgroup/unified` for freezing and killing the whole tree (its
//! `cgroup.freeze` thaws in ~0.2 ms, its `cgroup.kill` is atomic).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
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

    /// Moves process `pid` (and so everything it starts later) into every group.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            Self::write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
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

/// Freezes and thaws one instance's whole process tree (cgroup2
/// `cgroup.freeze`): a frozen instance gets no CPU at all. Writing the file
/// takes effect at once; the kernel finishes stopping tasks shortly after.
#[derive(Debug, Clone)]
pub struct Freezer {
    file: PathBuf,
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

/// `usage_usec` of a cgroup2 `cpu.stat`.
fn cpu_usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_usage_is_read_from_its_line() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(cpu_usage_usec(stat), Some(1_234_567));
        assert_eq!(cpu_usage_usec("user_usec 5\n"), None);
        assert_eq!(cpu_usage_usec("usage_usec x\n"), None);
    }

    #[test]
    fn a_freezer_reads_the_cpu_stat_beside_its_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cpu.stat"), "usage_usec 42\n").unwrap();
        let fz = Freezer {
            file: dir.path().join("cgroup.freeze"),
        };
        assert_eq!(fz.cpu_used().unwrap(), Duration::from_micros(42));
        fz.set(true).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        fs::remove_file(dir.path().join("cpu.stat")).unwrap();
        assert!(fz.cpu_used().is_err());
    }
}
