// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Network bytes and packets per cgroup v2 id.
 *
 * Attached at the root of the cgroup v2 hierarchy, so every socket on the
 * host passes through; the cgroup of the socket's owner is the key. Counting
 * only: both programs always let the packet through. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tally.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, TALLY_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct tally_net_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_net SEC(".maps");

static __always_inline struct tally_net_value *entry(__u64 id)
{
	struct tally_net_value *v = bpf_map_lookup_elem(&tally_net, &id);
	if (v)
		return v;
	struct tally_net_value zero = {};
	/* A full map loses the packet's count, never the packet. */
	bpf_map_update_elem(&tally_net, &id, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&tally_net, &id);
}

SEC("cgroup_skb/ingress")
int tally_net_ingress(struct __sk_buff *skb)
{
	struct tally_net_value *v = entry(bpf_skb_cgroup_id(skb));
	if (v) {
		v->ingress_bytes += skb->len;
		v->ingress_packets += 1;
	}
	return 1;
}

SEC("cgroup_skb/egress")
int tally_net_egress(struct __sk_buff *skb)
{
	struct tally_net_value *v = entry(bpf_skb_cgroup_id(skb));
	if (v) {
		v->egress_bytes += skb->len;
		v->egress_packets += 1;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
