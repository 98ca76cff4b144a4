// SPDX-License-Identifier: GPL-2.0
/* GPU device access of one tenant (enforcement, issues 4 and 17).
 *
 * A `cgroup/dev` program, loaded once per tenant that has a `gpus` quota and
 * attached (as a link, beside the owner's own programs) to the tenant's
 * cgroup v2 directory (`<parent>/tally/<tenant>`) and to every cgroup the
 * tenant rules attribute to the tenant, so it governs everything beneath
 * them. Denials are counted in `tally_dev_denied`. The kernel runs it before the v1
 * devices controller, so it works the same on hybrid and pure v2 hosts.
 *
 * Only NVIDIA character devices are judged: major 195 (`/dev/nvidiaN`, minor
 * N = GPU index; `nvidiactl` 195:255 and `nvidia-modeset` 195:254 always
 * allowed) and the `nvidia-caps` major (MIG capability devices) set in
 * `tally_dev_conf`. `nvidia-uvm` has its own dynamic major and is allowed
 * like every other device. An NVIDIA device is allowed only if
 * `tally_dev_allowed` holds `major << 32 | minor`. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define NVIDIA_MAJOR 195
#define NVIDIACTL_MINOR 255
#define NVIDIA_MODESET_MINOR 254

/* Key `0`: the nvidia-caps major (0 when the host has none). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tally_dev_conf SEC(".maps");

/* Allowed NVIDIA devices: key `major << 32 | minor`, value 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} tally_dev_allowed SEC(".maps");

/* Key `0`: opens denied so far (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tally_dev_denied SEC(".maps");

SEC("cgroup/dev")
int tally_dev(struct bpf_cgroup_dev_ctx *ctx)
{
	__u32 type = ctx->access_type & 0xFFFF;
	__u32 major = ctx->major;
	__u32 minor = ctx->minor;
	__u32 zero = 0;
	__u32 *caps_major;
	__u64 key;

	if (type != BPF_DEVCG_DEV_CHAR)
		return 1;
	caps_major = bpf_map_lookup_elem(&tally_dev_conf, &zero);
	if (major == NVIDIA_MAJOR) {
		if (minor == NVIDIACTL_MINOR || minor == NVIDIA_MODESET_MINOR)
			return 1;
	} else if (!caps_major || *caps_major == 0 || major != *caps_major) {
		return 1;
	}
	key = ((__u64)major << 32) | minor;
	if (bpf_map_lookup_elem(&tally_dev_allowed, &key))
		return 1;
	__u64 *denied = bpf_map_lookup_elem(&tally_dev_denied, &zero);
	if (denied)
		*denied += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
