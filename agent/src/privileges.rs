//! Least privilege: once start-up is over (eBPF programs loaded, attached
//! and pinned, bpffs mounted, cgroups opened — the first snapshot is out),
//! the agent keeps only the capabilities continued operation needs
//! ([`KEPT`], docs/security.md says why each), drops the rest from the
//! effective, permitted, inheritable, ambient *and bounding* sets, and sets
//! `no_new_privs`, so neither it nor anything it could exec regains them.
//!
//! Capabilities are per thread on Linux, and `capset(2)` changes only the
//! calling thread. The agent already runs several threads when start-up
//! ends (the HTTP runtime's workers, the sampler, one NVML reader per GPU,
//! the XID and kubelet threads), so the drop is broadcast as libpsx and
//! Go's `AllThreadsSyscall` do: each thread is sent a real-time signal
//! whose handler makes the same three async-signal-safe syscalls, and the
//! result is checked in `/proc/self/task/*/status` until every thread
//! shows the reduced sets. Threads created later inherit them.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use nix::libc;
use tracing::{info, warn};

/// A Linux capability number (`linux/capability.h`).
pub type Cap = u32;

pub const CAP_DAC_READ_SEARCH: Cap = 2;
pub const CAP_KILL: Cap = 5;
pub const CAP_SETPCAP: Cap = 8;
pub const CAP_NET_ADMIN: Cap = 12;
pub const CAP_SYS_ADMIN: Cap = 21;
pub const CAP_PERFMON: Cap = 38;
pub const CAP_BPF: Cap = 39;

/// What the agent keeps after start-up, and why (docs/security.md).
pub const KEPT: &[(Cap, &str, &str)] = &[
    (
        CAP_BPF,
        "CAP_BPF",
        "read and update pinned eBPF maps; attach the device and network programs to tenant cgroups made after start-up",
    ),
    (
        CAP_PERFMON,
        "CAP_PERFMON",
        "uprobes on CUDA libraries that appear after start-up (tracing program attach)",
    ),
    (
        CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        "attach cgroup_skb counters and policers to new tenant cgroups",
    ),
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "cgroup v1 and v2 writes (limits, freezer, moving processes), cgroup BPF attach on kernels before 5.8",
    ),
    (
        CAP_KILL,
        "CAP_KILL",
        "the `terminate` enforcement action signals processes of any user",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH",
        "read /proc/<pid> entries, kubelet logs and sockets of other users; open cgroups by id",
    ),
];

/// The [`KEPT`] set as a mask.
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, (c, _, _)| m | (1u64 << c))
}

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    /// The process holds nothing beyond the kept set: nothing to drop.
    #[error("no capability beyond the kept set: nothing to drop")]
    NotPrivileged,
    /// Installing the broadcast signal handler failed.
    #[error("cannot install the capability broadcast handler: {0}")]
    Handler(nix::Error),
    /// Some threads did not reach the reduced sets in time.
    #[error("threads {tids:?} still hold dropped capabilities")]
    Stragglers { tids: Vec<i32> },
    /// A thread's `capset`/`prctl` failed.
    #[error("{failed} thread(s) failed to drop capabilities (errno {errno})")]
    Syscall { failed: usize, errno: i32 },
}

/// What a successful drop left.
#[derive(Debug, Clone)]
pub struct Dropped {
    /// Names of the capabilities kept.
    pub kept: Vec<&'static str>,
    /// How many threads were changed.
    pub threads: usize,
}

// The mask and the highest capability the handler works with, and how it
// went; statics because a signal handler gets no arguments.
static KEEP: AtomicU64 = AtomicU64::new(0);
/// Whether the bounding set can be shrunk (CAP_SETPCAP held at start).
static BOUNDING: AtomicBool = AtomicBool::new(false);
static LAST_CAP: AtomicU64 = AtomicU64::new(40);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static LAST_ERRNO: AtomicUsize = AtomicUsize::new(0);

/// The three things each thread does; async-signal-safe (raw syscalls and
/// atomics only). Returns 0 or an errno.
#[allow(unsafe_code)]
fn drop_this_thread() -> i32 {
    let keep = KEEP.load(Ordering::SeqCst);
    let last = LAST_CAP.load(Ordering::SeqCst);
    // SAFETY: prctl and capset with plain integer arguments and a pointer
    // to stack memory laid out as linux/capability.h says (version 3: one
    // header, two data words for capabilities 0–31 and 32–63).
    unsafe {
        let bounding = BOUNDING.load(Ordering::SeqCst);
        for cap in 0..=last {
            if bounding
                && keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                let e = *libc::__errno_location();
                // EINVAL: the kernel has fewer capabilities than we asked.
                if e != libc::EINVAL {
                    return e;
                }
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return *libc::__errno_location();
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return *libc::__errno_location();
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [
            Data {
                effective: keep as u32,
                permitted: keep as u32,
                inheritable: 0,
            },
            Data {
                effective: (keep >> 32) as u32,
                permitted: (keep >> 32) as u32,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) != 0 {
            return *libc::__errno_location();
        }
    }
    0
}

extern "C" fn on_signal(_: libc::c_int) {
    match drop_this_thread() {
        0 => {}
        e => {
            LAST_ERRNO.store(e as usize, Ordering::SeqCst);
            FAILED.fetch_add(1, Ordering::SeqCst);
        }
    }
    DONE.fetch_add(1, Ordering::SeqCst);
}

/// A mask field (`CapEff`, `CapBnd`, …) of a `/proc` status text.
fn mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// True when a thread's status shows the reduced sets (the bounding set
/// too when `bounding`).
fn reduced(status: &str, keep: u64, bounding: bool) -> bool {
    let within = |f: &str| mask(status, f).is_some_and(|m| m & !keep == 0);
    within("CapEff")
        && within("CapPrm")
        && (!bounding || within("CapBnd"))
        && mask(status, "CapInh") == Some(0)
        && mask(status, "CapAmb").is_none_or(|m| m == 0)
        && status
            .lines()
            .find_map(|l| l.strip_prefix("NoNewPrivs:"))
            .is_some_and(|v| v.trim() == "1")
}

/// Threads of this process that still hold more than `keep`.
fn privileged_threads(keep: u64) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid: i32 = t.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            (!reduced(&status, keep, BOUNDING.load(Ordering::SeqCst))).then_some(tid)
        })
        .collect()
}

/// Drops every capability but [`KEPT`] in every thread, sets
/// `no_new_privs`, and checks the result.
#[allow(unsafe_code)]
pub fn drop_to_kept() -> Result<Dropped, PrivilegesError> {
    let own = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let keep = kept_mask();
    let permitted = mask(&own, "CapPrm").unwrap_or(0);
    if permitted & !keep == 0 {
        return Err(PrivilegesError::NotPrivileged);
    }
    // Without CAP_SETPCAP (a systemd unit's CapabilityBoundingSet= already
    // bounds the set) the other sets are still lowered; lowering needs no
    // privilege.
    BOUNDING.store(
        mask(&own, "CapEff").is_some_and(|m| m & (1 << CAP_SETPCAP) != 0),
        Ordering::SeqCst,
    );
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40u64)
        .min(63);
    KEEP.store(keep, Ordering::SeqCst);
    LAST_CAP.store(last, Ordering::SeqCst);
    let signal = libc::SIGRTMIN() + 4;
    // SAFETY: a zeroed sigaction is valid; the handler only makes raw
    // syscalls and touches atomics.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        if libc::sigaction(signal, &new, std::ptr::null_mut()) != 0 {
            return Err(PrivilegesError::Handler(nix::Error::last()));
        }
    }
    // This thread last: the others are signalled, each drops its own sets
    // (bounding included, with its own CAP_SETPCAP), then this one.
    let mut threads = 0;
    let pid = std::process::id() as i32;
    let own_tid = nix::unistd::gettid().as_raw();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stragglers;
    loop {
        stragglers = privileged_threads(keep);
        stragglers.retain(|t| *t != own_tid);
        if stragglers.is_empty() || Instant::now() > deadline {
            break;
        }
        let before = DONE.load(Ordering::SeqCst);
        for tid in &stragglers {
            // SAFETY: tgkill with integer arguments.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, signal) } == 0 {
                threads += 1;
            }
        }
        let wait = Instant::now() + Duration::from_secs(2);
        while DONE.load(Ordering::SeqCst) < before + stragglers.len() && Instant::now() < wait {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    match drop_this_thread() {
        0 => threads += 1,
        errno => return Err(PrivilegesError::Syscall { failed: 1, errno }),
    }
    let failed = FAILED.load(Ordering::SeqCst);
    if failed > 0 {
        return Err(PrivilegesError::Syscall {
            failed,
            errno: LAST_ERRNO.load(Ordering::SeqCst) as i32,
        });
    }
    let left = privileged_threads(keep);
    if !left.is_empty() {
        return Err(PrivilegesError::Stragglers { tids: left });
    }
    Ok(Dropped {
        kept: KEPT.iter().map(|(_, n, _)| *n).collect(),
        threads,
    })
}

/// Drops privileges once start-up is over and says so in the log; a
/// failure is logged, not fatal (the agent keeps working with more
/// privilege than it needs, and says which threads).
pub fn drop_after_start_up() {
    match drop_to_kept() {
        Ok(d) => info!(
            kept = ?d.kept,
            threads = d.threads,
            "dropped every other capability (all threads, bounding set too); no_new_privs set"
        ),
        Err(PrivilegesError::NotPrivileged) => {
            info!("no capability beyond the kept set: nothing to drop")
        }
        Err(e) => warn!(error = %e, "could not drop capabilities"),
    }
}

/// Names of the capabilities in `mask` that are not in [`KEPT`].
pub fn beyond_kept(mask: u64) -> BTreeSet<u32> {
    (0..64)
        .filter(|c| mask & (1u64 << c) != 0 && kept_mask() & (1u64 << c) == 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_masks_are_read() {
        let keep = kept_mask();
        let good = format!(
            "Name:\ttally\nCapInh:\t0000000000000000\nCapPrm:\t{keep:016x}\nCapEff:\t{keep:016x}\nCapBnd:\t{keep:016x}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n"
        );
        assert!(reduced(&good, keep, true));
        assert!(!reduced(
            &good.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0"),
            keep,
            true
        ));
        let root = "CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert!(!reduced(root, keep, true));
        // Without CAP_SETPCAP the bounding set is the unit's business.
        let bounded_by_systemd = good.replace(
            &format!("CapBnd:\t{keep:016x}"),
            "CapBnd:\t000001ffffffffff",
        );
        assert!(reduced(&bounded_by_systemd, keep, false));
        assert!(!reduced(&bounded_by_systemd, keep, true));
        assert_eq!(mask(root, "CapEff"), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn kept_set_is_the_documented_one() {
        assert_eq!(
            kept_mask(),
            (1 << CAP_BPF)
                | (1 << CAP_PERFMON)
                | (1 << CAP_NET_ADMIN)
                | (1 << CAP_SYS_ADMIN)
                | (1 << CAP_KILL)
                | (1 << CAP_DAC_READ_SEARCH)
        );
        assert!(beyond_kept(kept_mask()).is_empty());
        assert_eq!(beyond_kept(1 << 16), BTreeSet::from([16]));
    }
}
