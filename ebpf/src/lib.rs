//! Tally's eBPF programs and the Rust mirror of their shared structs.
//!
//! The programs are C (`ebpf/*.bpf.c`), compiled by clang in `build.rs` and
//! embedded here, one static per source (`NET` for `net.bpf.c`, …). The
//! structs mirror `ebpf/include/tally.h`; each is `#[repr(C)]`, has no
//! padding, and a test checks its size against the header. This crate holds
//! the `unsafe` that marking them [`aya::Pod`] needs, so the agent stays safe.

include!(concat!(env!("OUT_DIR"), "/objects.rs"));

/// Name of the per-CPU network counter map (`net.bpf.c`).
pub const MAP_NET: &str = "tally_net";
/// Name of the per-CPU PCIe copy counter map (`pcie.bpf.c`).
pub const MAP_PCIE: &str = "tally_pcie";
/// Name of the recent-process map (`proc.bpf.c`).
pub const MAP_PROCS: &str = "tally_procs";
/// `task.bpf.c`: the task iterator program and the map of thread group ids
/// it reports on (key: pid, value: unused byte).
pub const PROG_TASK_DUMP: &str = "tally_task_dump";
pub const MAP_WATCHED: &str = "tally_watched";
/// `dev.bpf.c` (enforcement): the `cgroup/dev` program, its config array
/// (key 0: the `nvidia-caps` major) and its allow-list (key
/// `major << 32 | minor`, value 1). Keys and values are plain integers.
pub const PROG_DEV: &str = "tally_dev";
pub const MAP_DEV_CONF: &str = "tally_dev_conf";
pub const MAP_DEV_ALLOWED: &str = "tally_dev_allowed";
/// `dev.bpf.c`: per-CPU array, key 0: the opens the program denied.
pub const MAP_DEV_DENIED: &str = "tally_dev_denied";
/// `net.bpf.c` network rate quota (enforcement): key 0 of the config
/// array is the deepest level of a cgroup in `tally_cgroup_tenant` (cgroup
/// v2 id → tenant key); the bucket maps are keyed by tenant key. All four
/// are pinned by name.
pub const MAP_BUCKET_CONF: &str = "tally_bucket_conf";
pub const MAP_CGROUP_TENANT: &str = "tally_cgroup_tenant";
pub const MAP_BUCKET_EGRESS: &str = "tally_bucket_egress";
pub const MAP_BUCKET_INGRESS: &str = "tally_bucket_ingress";
/// `net.bpf.c`: array, key 0: a `u64` the agent bumps after every change
/// to `tally_cgroup_tenant` or the level, so the tenants the program
/// remembers per socket are resolved again. Pinned by name.
pub const MAP_TENANT_GENERATION: &str = "tally_tenant_generation";

/// `struct tally_bucket`: one tenant's token bucket in one direction. The
/// kernel ignores `lock` on updates from user space.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetBucket {
    pub lock: u32,
    pub pad: u32,
    /// Bytes per second.
    pub rate: u64,
    /// Bytes.
    pub burst: u64,
    pub tokens: u64,
    pub last_ns: u64,
}

// SAFETY: `#[repr(C)]`, only integer fields, no padding (4 + 4 + 4 × 8).
unsafe impl aya::Pod for NetBucket {}

/// `struct tally_net_value`: one cgroup's network counters on one CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetValue {
    pub ingress_bytes: u64,
    pub ingress_packets: u64,
    pub ingress_dropped: u64,
    pub egress_bytes: u64,
    pub egress_packets: u64,
    pub egress_dropped: u64,
}

/// `struct tally_pcie_value`: one cgroup's CUDA copy counters on one CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PcieValue {
    pub h2d_bytes: u64,
    pub h2d_calls: u64,
    pub d2h_bytes: u64,
    pub d2h_calls: u64,
    /// Copies whose direction the arguments do not tell.
    pub other_bytes: u64,
    pub other_calls: u64,
}

/// `struct tally_proc`: a process's cgroup at exec and exit.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcRecord {
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` at exec, 0 if not seen.
    pub exec_ns: u64,
    /// `bpf_ktime_get_ns()` at exit, 0 while running.
    pub exit_ns: u64,
}

/// `struct tally_task`: one thread of a watched process, as the task
/// iterator writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskRecord {
    pub tgid: u64,
    /// Thread id; equal to `tgid` for the group leader.
    pub tid: u64,
    /// `task->__state`.
    pub state: u64,
    /// `task->exit_state`.
    pub exit_state: u64,
    /// Nanoseconds after boot the thread started.
    pub start_boottime: u64,
    /// CPU time the thread ran, in ns; the leader's adds the exited
    /// threads'.
    pub runtime_ns: u64,
    /// The leader's cgroup v2 id (0 in other threads' records).
    pub cgroup_id: u64,
    /// The leader's effective uid, as the kernel holds it (0 in other
    /// threads' records).
    pub euid: u64,
}

impl TaskRecord {
    /// Size of one record in the iterator's output.
    pub const SIZE: usize = 64;

    /// The record at the start of `bytes` (native byte order, as the
    /// kernel wrote it); `None` when fewer than [`Self::SIZE`] bytes remain.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let field = |i: usize| {
            let b = bytes.get(i * 8..i * 8 + 8)?;
            Some(u64::from_ne_bytes(b.try_into().ok()?))
        };
        Some(Self {
            tgid: field(0)?,
            tid: field(1)?,
            state: field(2)?,
            exit_state: field(3)?,
            start_boottime: field(4)?,
            runtime_ns: field(5)?,
            cgroup_id: field(6)?,
            euid: field(7)?,
        })
    }
}

// SAFETY: plain `#[repr(C)]` structs of u64 fields: no padding, no pointers,
// every bit pattern is a valid value.
unsafe impl aya::Pod for NetValue {}
// SAFETY: as above.
unsafe impl aya::Pod for PcieValue {}
// SAFETY: as above.
unsafe impl aya::Pod for ProcRecord {}

impl NetValue {
    /// Adds another CPU's (or cgroup's) counters.
    pub fn add(&mut self, o: &Self) {
        self.ingress_bytes += o.ingress_bytes;
        self.ingress_packets += o.ingress_packets;
        self.ingress_dropped += o.ingress_dropped;
        self.egress_bytes += o.egress_bytes;
        self.egress_packets += o.egress_packets;
        self.egress_dropped += o.egress_dropped;
    }
}

impl PcieValue {
    /// Adds another CPU's (or cgroup's) counters.
    pub fn add(&mut self, o: &Self) {
        self.h2d_bytes += o.h2d_bytes;
        self.h2d_calls += o.h2d_calls;
        self.d2h_bytes += o.d2h_bytes;
        self.d2h_calls += o.d2h_calls;
        self.other_bytes += o.other_bytes;
        self.other_calls += o.other_calls;
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    fn header() -> &'static str {
        include_str!("../include/tally.h")
    }

    /// Number of `__u64` fields of `struct NAME` in the header.
    fn u64_fields(name: &str) -> usize {
        let text = header();
        let start = text
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("struct {name} not in tally.h"));
        let body = &text[start..];
        let body = &body[..body.find("};").expect("struct ends")];
        assert!(
            !body.contains("__u32"),
            "{name}: only __u64 fields expected"
        );
        body.matches("__u64 ").count()
    }

    #[test]
    fn sizes_match_the_header() {
        assert_eq!(size_of::<NetValue>(), 8 * u64_fields("tally_net_value"));
        assert_eq!(size_of::<PcieValue>(), 8 * u64_fields("tally_pcie_value"));
        assert_eq!(size_of::<ProcRecord>(), 8 * u64_fields("tally_proc"));
        assert_eq!(size_of::<NetValue>(), 48);
        assert_eq!(size_of::<PcieValue>(), 48);
        assert_eq!(size_of::<ProcRecord>(), 24);
        assert_eq!(size_of::<TaskRecord>(), 8 * u64_fields("tally_task"));
        assert_eq!(size_of::<TaskRecord>(), TaskRecord::SIZE);
    }

    #[test]
    fn a_task_record_reads_back_in_field_order() {
        let bytes: Vec<u8> = (1..=8u64).flat_map(u64::to_ne_bytes).collect();
        let r = TaskRecord::read(&bytes).unwrap();
        assert_eq!((r.tgid, r.tid, r.runtime_ns), (1, 2, 6));
        assert_eq!((r.cgroup_id, r.euid), (7, 8));
        assert_eq!(TaskRecord::read(&bytes[..TaskRecord::SIZE - 1]), None);
    }

    #[test]
    fn bucket_matches_the_header() {
        let text = header();
        let start = text.find("struct tally_bucket {").expect("in tally.h");
        let body = &text[start..start + text[start..].find("};").unwrap()];
        assert!(body.contains("struct bpf_spin_lock lock;") && body.contains("__u32 pad;"));
        assert_eq!(body.matches("__u64 ").count(), 4);
        assert_eq!(size_of::<NetBucket>(), 4 + 4 + 4 * 8);
    }

    #[test]
    fn every_source_is_embedded() {
        let names: Vec<_> = OBJECTS.iter().map(|(n, _)| *n).collect();
        for want in ["net", "pcie", "proc", "task"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for (name, bytes) in OBJECTS {
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is not an ELF object");
            assert_eq!(
                bytes.as_ptr() as usize % 8,
                0,
                "{name} is not 8-byte aligned"
            );
        }
    }
}
