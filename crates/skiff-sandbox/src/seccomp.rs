//! The system-call filter every instance and every build runs under.
//!
//! Default allow, with a deny list in the spirit of Docker's default profile
//! and Firecracker's: the calls behind most local privilege escalations of
//! recent years (user namespaces, io_uring, eBPF, userfaultfd, keyrings,
//! perf), and those only an administrator of the host needs (mounts, module
//! loading, kexec, swap, reboot, the kernel log, accounting, quotas, clock
//! setting, other namespaces). A denied call fails with EPERM, never a
//! kill, so programs take their fallback (libuv without io_uring, Chromium
//! without its own sandbox). SECURITY.md gives the list with the reasons.
//!
//! Two filters are installed, both as the last step before exec:
//! - the deny list, compiled by `seccompiler` (Firecracker's), which also
//!   kills a process that makes a call of another architecture (32-bit
//!   `int 0x80`), whose numbers the list would not match;
//! - a small one answering ENOSYS for `clone3` (its flags are in memory a
//!   filter cannot read, so a new user namespace could not be told apart;
//!   libc then falls back to `clone`, whose flags the deny list checks) and,
//!   on x86-64, for every x32 call (numbers with bit 30 set), which would
//!   otherwise reach the same kernel code under numbers the list does not
//!   name.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// Calls denied whatever their arguments, with why.
pub const DENIED: &[(&str, i64)] = &[
    // Kernel attack surface that services do not need.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("fanotify_init", libc::SYS_fanotify_init),
    // Keyrings are per host user, not per namespace.
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    // Other namespaces and mounts.
    ("setns", libc::SYS_setns),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    // File handles bypass path permissions (the "shocker" escape).
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    // The host's administration.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("syslog", libc::SYS_syslog),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
];

/// Calls denied when their first argument asks for a new user namespace.
pub const DENIED_WITH_NEW_USER_NAMESPACE: &[(&str, i64)] =
    &[("unshare", libc::SYS_unshare), ("clone", libc::SYS_clone)];

/// Calls answered with ENOSYS ("not implemented") instead.
pub const NOT_IMPLEMENTED: &[(&str, i64)] = &[("clone3", libc::SYS_clone3)];

/// The two compiled filters, to install in this order.
#[derive(Debug)]
pub struct Filters {
    deny: BpfProgram,
    nosys: BpfProgram,
}

/// Compiles the filters for the architecture skiff was built for.
pub fn compile() -> Result<Filters, String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    for (_, nr) in DENIED_WITH_NEW_USER_NAMESPACE {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_NEWUSER as u64),
            libc::CLONE_NEWUSER as u64,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        let rule = SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp: {e}"))?;
        rules.insert(*nr, vec![rule]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let deny: BpfProgram = filter.try_into().map_err(|e| format!("seccomp: {e}"))?;
    Ok(Filters {
        deny,
        nosys: nosys_program(),
    })
}

// Classic BPF, as <linux/filter.h> and <linux/seccomp.h> define it
// (BPF_LD | BPF_W | BPF_ABS is 0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
/// On x86-64, calls of the x32 ABI have this bit set in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// ENOSYS for `clone3` and, on x86-64, for any x32 call; everything else
/// goes on to the deny list (a call of another architecture is killed
/// there).
fn nosys_program() -> BpfProgram {
    let nosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut p = vec![
        stmt(BPF_LD_W_ABS, ARCH),
        // Another architecture: left to the deny list, which kills it.
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, allow),
        stmt(BPF_LD_W_ABS, NR),
    ];
    if cfg!(target_arch = "x86_64") {
        p.push(jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(BPF_RET_K, nosys));
    }
    for (_, nr) in NOT_IMPLEMENTED {
        p.push(jump(BPF_JMP_JEQ_K, *nr as u32, 0, 1));
        p.push(stmt(BPF_RET_K, nosys));
    }
    p.push(stmt(BPF_RET_K, allow));
    p
}

impl Filters {
    /// Installs both filters on the calling thread (and so on what it
    /// executes). Needs `no_new_privs` or CAP_SYS_ADMIN.
    pub fn install(&self) -> Result<(), String> {
        for program in [&self.deny, &self.nosys] {
            seccompiler::apply_filter(program).map_err(|e| format!("seccomp: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the filters installed; returns what
    /// it wrote to the pipe. The child is a copy of this test process,
    /// single-threaded after fork, and exits without unwinding.
    fn in_filtered_child(f: fn() -> Vec<i64>) -> Vec<i64> {
        let filters = compile().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes raw system calls and writes to a
        // pipe before `_exit`; it touches no lock the parent may hold.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                drop(r);
                let _ = nix::sys::prctl::set_no_new_privs();
                let out = match filters.install() {
                    Ok(()) => f(),
                    Err(_) => vec![-1000],
                };
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                let _ = nix::unistd::write(&w, &bytes);
                // SAFETY: ends the child without running the parent's
                // destructors or test harness.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(w);
                let mut bytes = Vec::new();
                let mut file = std::fs::File::from(r);
                std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                bytes
                    .chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
        }
    }

    fn errno_of(r: libc::c_long) -> i64 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64
        } else {
            0
        }
    }

    #[test]
    fn denied_calls_fail_with_eperm_and_clone3_with_enosys() {
        let got = in_filtered_child(|| {
            // SAFETY: each call either fails at the filter or is harmless
            // with these arguments (null pointers, zero sizes).
            unsafe {
                vec![
                    errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
                    errno_of(libc::syscall(libc::SYS_io_uring_setup, 1, 0usize)),
                    errno_of(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)),
                    errno_of(libc::syscall(libc::SYS_clone3, 0usize, 0usize)),
                    // Allowed: a plain call, and unshare without a user
                    // namespace (EINVAL for an unknown flag, not EPERM).
                    errno_of(libc::syscall(libc::SYS_getpid)),
                    errno_of(libc::syscall(libc::SYS_unshare, 0x1)),
                ]
            }
        });
        assert_eq!(
            got,
            vec![
                libc::EPERM as i64,
                libc::EPERM as i64,
                libc::EPERM as i64,
                libc::ENOSYS as i64,
                0,
                libc::EINVAL as i64,
            ]
        );
    }

    #[test]
    fn the_lists_name_real_calls_once() {
        let mut seen = std::collections::HashSet::new();
        for (name, nr) in DENIED
            .iter()
            .chain(DENIED_WITH_NEW_USER_NAMESPACE)
            .chain(NOT_IMPLEMENTED)
        {
            assert!(*nr >= 0, "{name}");
            assert!(seen.insert(*nr), "{name} twice");
        }
    }
}
