// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* The state, CPU time and start time of every watched process in one read:
 * a task iterator (`iter/task`) writes a `struct tally_task` for each thread
 * whose thread group is in `tally_watched`. The sampler reads it once per
 * cycle instead of one /proc/<pid>/stat per GPU process, where the kernel
 * looked up the pid, checked ptrace access and printed 52 fields each time.
 *
 * Kernel types are declared with only the fields read: clang's
 * preserve_access_index makes each access a CO-RE relocation, which the
 * loader resolves against the running kernel's BTF. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tally.h"

struct seq_file;

struct sched_entity {
	__u64 sum_exec_runtime;
} __attribute__((preserve_access_index));

struct signal_struct {
	__u64 sum_sched_runtime;
} __attribute__((preserve_access_index));

struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct cred {
	struct {
		__u32 val;
	} euid;
} __attribute__((preserve_access_index));

struct task_struct {
	unsigned int __state;
	int exit_state;
	int pid;
	int tgid;
	__u64 start_boottime;
	struct sched_entity se;
	struct signal_struct *signal;
	struct css_set *cgroups;
	const struct cred *cred;
} __attribute__((preserve_access_index));

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__task {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
} __attribute__((preserve_access_index));

/* Thread group ids the sampler asks about, one bit each: pid / 64 is the
 * word, pid % 64 the bit. An array, not a hash: the program asks once per
 * task on the node, and an array lookup is an index the verifier inlines,
 * where the hash's was a third of the program's cost. Not pinned: the
 * agent fills it afresh at each start. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TALLY_WATCHED_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} tally_watched SEC(".maps");

SEC("iter/task")
int tally_task_dump(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	if (!task)
		return 0;
	__u32 tgid = task->tgid;
	__u32 word = tgid / 64;
	__u64 *bits = bpf_map_lookup_elem(&tally_watched, &word);
	if (!bits || !(*bits & (1ULL << (tgid % 64))))
		return 0;
	struct tally_task rec = {
		.tgid = tgid,
		.tid = (__u32)task->pid,
		.state = task->__state,
		.exit_state = (__u32)task->exit_state,
		.start_boottime = task->start_boottime,
		.runtime_ns = task->se.sum_exec_runtime,
	};
	if (rec.tid == rec.tgid) {
		struct signal_struct *signal = task->signal;
		if (signal)
			rec.runtime_ns += signal->sum_sched_runtime;
		/* Only the leader's: /proc/<pid>/cgroup and /proc/<pid>'s
		 * owner are the leader's too. The iterator runs under RCU,
		 * which keeps css_set and cred alive while read. */
		struct css_set *cgroups = task->cgroups;
		if (cgroups && cgroups->dfl_cgrp && cgroups->dfl_cgrp->kn)
			rec.cgroup_id = cgroups->dfl_cgrp->kn->id;
		const struct cred *cred = task->cred;
		if (cred)
			rec.euid = cred->euid.val;
	}
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
