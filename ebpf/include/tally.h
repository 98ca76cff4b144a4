/* Structs shared by Tally's eBPF programs and the agent.
 *
 * Every struct here is mirrored in ebpf/src/lib.rs with #[repr(C)] and a
 * size test: change both together. Only fixed-size __u64/__u32 fields, no
 * implicit padding, so the layout is the same for clang -target bpf and
 * rustc x86_64. */
#ifndef TALLY_H
#define TALLY_H

#include <linux/types.h>

/* Entries of the cgroup → tenant map of the network policer. */
#define TALLY_MAX_CGROUPS 65536
/* Entries of the per-cgroup counter maps. User space folds the counters of
 * vanished cgroups into their tenant and deletes the entry, so these bound
 * the number of cgroups alive (with traffic, with CUDA copies) at once.
 * The sampler reads every entry each cycle, and the kernel walks every
 * bucket of a hash map (one per entry it can hold) to find them, so they
 * are no larger than a node needs. A per-CPU hash also preallocates one
 * value per entry per CPU unless BPF_F_NO_PREALLOC: 65,536 entries were
 * 600 MB of kernel memory per map on a 192-CPU node. The network map
 * allocates per entry; the PCIe map, read by uprobes, stays preallocated
 * (before 6.1 the kernel warns about tracing programs with run-time
 * allocated maps) and holds the cgroups of CUDA callers, a few per job. */
#define TALLY_MAX_NET_CGROUPS 16384
#define TALLY_MAX_PCIE_CGROUPS 4096
/* Deepest cgroup v2 level the network policer looks at for a packet's
 * tenant (the kernel's own nesting limit is far above real trees). */
#define TALLY_MAX_CGROUP_LEVEL 32
/* Recently exec'd / exited processes remembered (LRU). */
#define TALLY_MAX_PROCS 32768
/* Words of the task iterator's pid bitmap (`tally_watched`): one bit per
 * pid up to the kernel's PID_MAX_LIMIT (4,194,304), 512 KiB. */
#define TALLY_WATCHED_WORDS (4194304 / 64)

/* Value of map `tally_net` (per-CPU hash, key: __u64 cgroup v2 id).
 * Bytes are skb->len: IP header + L4 header + payload. The dropped counters
 * are for a rate policer (enforcement); the counting programs never drop. */
struct tally_net_value {
	__u64 ingress_bytes;
	__u64 ingress_packets;
	__u64 ingress_dropped;
	__u64 egress_bytes;
	__u64 egress_packets;
	__u64 egress_dropped;
};

/* Value of map `tally_pcie` (per-CPU hash, key: __u64 cgroup v2 id of the
 * calling thread). `other_*`: copies whose direction the arguments do not
 * tell (generic cuMemcpy with unified addressing). */
struct tally_pcie_value {
	__u64 h2d_bytes;
	__u64 h2d_calls;
	__u64 d2h_bytes;
	__u64 d2h_calls;
	__u64 other_bytes;
	__u64 other_calls;
};

/* Value of map `tally_procs` (LRU hash, key: __u32 pid = thread group id).
 * Written at exec and at exit of the group leader. */
struct tally_proc {
	__u64 cgroup_id;
	/* bpf_ktime_get_ns() at exec (0 if exec was not seen). */
	__u64 exec_ns;
	/* bpf_ktime_get_ns() at exit, 0 while running. */
	__u64 exit_ns;
};

/* Record `task.bpf.c` writes, one per thread of a watched process (map
 * `tally_watched`, key: __u32 thread group id), from the task iterator.
 * User space sums a process's threads as /proc/<pid>/stat does. */
struct tally_task {
	__u64 tgid;
	/* Thread id; == tgid for the group leader, whose state is the
	 * process's. */
	__u64 tid;
	/* task->__state and task->exit_state, mapped to the /proc letter in
	 * user space. */
	__u64 state;
	__u64 exit_state;
	/* Nanoseconds after boot (suspend included) the thread started:
	 * /proc/<pid>/stat field 22 before the conversion to clock ticks. */
	__u64 start_boottime;
	/* CPU time the thread ran, in ns; the leader's record adds what the
	 * process's exited threads ran (signal->sum_sched_runtime). */
	__u64 runtime_ns;
	/* The thread's cgroup v2 id (task->cgroups->dfl_cgrp->kn->id, the
	 * inode of the directory /proc/<pid>/cgroup's `0::` line names) and
	 * effective uid as the kernel holds it: user space only compares
	 * them from cycle to cycle, to see a process move or change user. */
	__u64 cgroup_id;
	__u64 euid;
};

/* Value of maps `tally_bucket_egress` / `tally_bucket_ingress` (hash, key:
 * __u64 tenant key, the value of `tally_cgroup_tenant` for every cgroup the
 * agent attributes to the tenant): the tenant's token bucket (enforcement, network rate). Written by the agent
 * when the quota changes; refilled and spent by net.bpf.c
 * under `lock`. `tokens` and `last_ns` start at burst and 0. */
struct tally_bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 rate;    /* bytes per second */
	__u64 burst;   /* bytes */
	__u64 tokens;  /* bytes */
	__u64 last_ns; /* bpf_ktime_get_coarse_ns() of the last refill */
};

/* Largest rate a bucket takes (bytes/s): keeps elapsed_ns * rate in 64 bits
 * for elapsed < 1 s. */
#define TALLY_BUCKET_MAX_RATE 10000000000ULL

/* CUmemorytype values used in CUDA_MEMCPY2D. */
#define TALLY_CU_MEMORYTYPE_HOST 1
#define TALLY_CU_MEMORYTYPE_DEVICE 2
#define TALLY_CU_MEMORYTYPE_ARRAY 3
#define TALLY_CU_MEMORYTYPE_UNIFIED 4

/* Offsets in CUDA_MEMCPY2D (_v2, 64-bit: size_t fields, enum padded to 8). */
#define TALLY_MEMCPY2D_SRC_MEMORY_TYPE 16
#define TALLY_MEMCPY2D_DST_MEMORY_TYPE 72
#define TALLY_MEMCPY2D_WIDTH_IN_BYTES 112
#define TALLY_MEMCPY2D_HEIGHT 120

#endif
