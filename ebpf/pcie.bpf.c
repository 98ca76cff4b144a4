// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Host<->device copies per cgroup, from uprobes on libcuda's cuMemcpy*.
 *
 * One program per argument shape; user space attaches each to every symbol
 * of that shape (see agent/src/probes/pcie.rs). Counted per cgroup of the
 * calling thread, so a process that exits before the next sample is still
 * counted for its cgroup. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "tally.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, TALLY_MAX_PCIE_CGROUPS);
	__type(key, __u64);
	__type(value, struct tally_pcie_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_pcie SEC(".maps");

enum dir { H2D, D2H, OTHER };

static __always_inline void count(enum dir dir, __u64 bytes)
{
	__u64 id = bpf_get_current_cgroup_id();
	struct tally_pcie_value *v = bpf_map_lookup_elem(&tally_pcie, &id);
	if (!v) {
		struct tally_pcie_value zero = {};
		bpf_map_update_elem(&tally_pcie, &id, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&tally_pcie, &id);
		if (!v)
			return;
	}
	switch (dir) {
	case H2D:
		v->h2d_bytes += bytes;
		v->h2d_calls += 1;
		break;
	case D2H:
		v->d2h_bytes += bytes;
		v->d2h_calls += 1;
		break;
	default:
		v->other_bytes += bytes;
		v->other_calls += 1;
		break;
	}
}

/* cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n[, stream]) and
 * its Async/_ptds/_ptsz forms. */
SEC("uprobe")
int tally_cu_htod(struct pt_regs *ctx)
{
	count(H2D, (__u64)PT_REGS_PARM3(ctx));
	return 0;
}

/* cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n[, stream]) and forms. */
SEC("uprobe")
int tally_cu_dtoh(struct pt_regs *ctx)
{
	count(D2H, (__u64)PT_REGS_PARM3(ctx));
	return 0;
}

/* The pre-_v2 ABI: 32-bit CUdeviceptr and unsigned int ByteCount. */
SEC("uprobe")
int tally_cu_htod_v1(struct pt_regs *ctx)
{
	count(H2D, (__u64)(__u32)PT_REGS_PARM3(ctx));
	return 0;
}

SEC("uprobe")
int tally_cu_dtoh_v1(struct pt_regs *ctx)
{
	count(D2H, (__u64)(__u32)PT_REGS_PARM3(ctx));
	return 0;
}

/* cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n[, stream]): with
 * unified addressing either side may be host memory; the arguments do not
 * say which, so these bytes are counted apart, not guessed. */
SEC("uprobe")
int tally_cu_generic(struct pt_regs *ctx)
{
	count(OTHER, (__u64)PT_REGS_PARM3(ctx));
	return 0;
}

/* cuMemcpy2D_v2(const CUDA_MEMCPY2D *p[, stream]): the descriptor names the
 * memory type of each side; WidthInBytes * Height bytes move. */
SEC("uprobe")
int tally_cu_2d(struct pt_regs *ctx)
{
	const char *p = (const char *)PT_REGS_PARM1(ctx);
	__u32 src = 0, dst = 0;
	__u64 width = 0, height = 0;
	if (bpf_probe_read_user(&src, sizeof(src), p + TALLY_MEMCPY2D_SRC_MEMORY_TYPE) ||
	    bpf_probe_read_user(&dst, sizeof(dst), p + TALLY_MEMCPY2D_DST_MEMORY_TYPE) ||
	    bpf_probe_read_user(&width, sizeof(width), p + TALLY_MEMCPY2D_WIDTH_IN_BYTES) ||
	    bpf_probe_read_user(&height, sizeof(height), p + TALLY_MEMCPY2D_HEIGHT))
		return 0;
	__u64 bytes = width * height;
	int src_dev = src == TALLY_CU_MEMORYTYPE_DEVICE || src == TALLY_CU_MEMORYTYPE_ARRAY;
	int dst_dev = dst == TALLY_CU_MEMORYTYPE_DEVICE || dst == TALLY_CU_MEMORYTYPE_ARRAY;
	if (src == TALLY_CU_MEMORYTYPE_HOST && dst_dev)
		count(H2D, bytes);
	else if (src_dev && dst == TALLY_CU_MEMORYTYPE_HOST)
		count(D2H, bytes);
	else if (src == TALLY_CU_MEMORYTYPE_UNIFIED || dst == TALLY_CU_MEMORYTYPE_UNIFIED)
		count(OTHER, bytes);
	/* device<->device and host<->host do not cross PCIe to the host. */
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
