// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* pid -> cgroup of processes at exec and at exit, for processes that end
 * between two samples (raw tracepoints: no tracefs needed). Both fire in the
 * context of the task concerned, so `current` is the process. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tally.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TALLY_MAX_PROCS);
	__type(key, __u32);
	__type(value, struct tally_proc);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_procs SEC(".maps");

SEC("raw_tp/sched_process_exec")
int tally_proc_exec(void *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct tally_proc rec = {
		.cgroup_id = bpf_get_current_cgroup_id(),
		.exec_ns = bpf_ktime_get_ns(),
		.exit_ns = 0,
	};
	bpf_map_update_elem(&tally_procs, &pid, &rec, BPF_ANY);
	return 0;
}

SEC("raw_tp/sched_process_exit")
int tally_proc_exit(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 pid = id >> 32;
	/* Threads exit too; only the group leader's exit ends the process. */
	if ((__u32)id != pid)
		return 0;
	struct tally_proc rec = {
		.cgroup_id = bpf_get_current_cgroup_id(),
		.exec_ns = 0,
		.exit_ns = bpf_ktime_get_ns(),
	};
	struct tally_proc *old = bpf_map_lookup_elem(&tally_procs, &pid);
	if (old)
		rec.exec_ns = old->exec_ns;
	bpf_map_update_elem(&tally_procs, &pid, &rec, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
