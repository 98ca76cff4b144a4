// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* Network bytes and packets per cgroup v2 id.
 *
 * Attached at the root of the cgroup v2 hierarchy, so every socket on the
 * host passes through; the cgroup of the socket's owner is the key. They
 * drop packets only for a tenant's network rate quota (below), and count
 * those drops. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tally.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, TALLY_MAX_NET_CGROUPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
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

/* Network rate quota (enforcement): one token bucket per tenant and
 * direction, whatever cgroup the packet comes from. `tally_cgroup_tenant`
 * maps the cgroups the tenant rules attribute to a tenant (and Tally's own
 * `<parent>/tally/<tenant>`) to the tenant's key; a packet's tenant is the
 * entry of its deepest ancestor (itself included) found there, so a pod's
 * containers and a job's steps share their tenant's bucket. It spends
 * skb->len tokens; without enough it is dropped (return 0) and counted as
 * dropped. Key 0 of `tally_bucket_conf`: the deepest level of a cgroup in
 * `tally_cgroup_tenant` (0 = no quota anywhere: nothing is looked up). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_bucket_conf SEC(".maps");

/* Key: cgroup v2 id; value: the tenant key of the bucket maps. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TALLY_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_cgroup_tenant SEC(".maps");

/* Key: tenant key (from `tally_cgroup_tenant`). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct tally_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_bucket_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct tally_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_bucket_ingress SEC(".maps");

/* The tenant key of the packet's cgroup, 0 when it has none. */
static __always_inline __u64 tenant_of(struct __sk_buff *skb, __u32 deepest)
{
	__u64 tenant = 0;
	for (int l = 1; l <= TALLY_MAX_CGROUP_LEVEL; l++) {
		if (l > (int)deepest)
			break;
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, l);
		/* Past the packet's own cgroup. */
		if (id == 0)
			break;
		__u64 *t = bpf_map_lookup_elem(&tally_cgroup_tenant, &id);
		if (t)
			tenant = *t;
	}
	return tenant;
}

/* Bumped by the agent after every change to `tally_cgroup_tenant` or to
 * the level in `tally_bucket_conf`: tenants resolved before it are stale. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tally_tenant_generation SEC(".maps");

/* A socket's tenant, resolved once: a socket keeps the cgroup it was made
 * in, so the walk of `tenant_of` (a hash lookup per level, most of the
 * policer's cost) is done again only when the generation moves. One word,
 * stored whole, so a reader on another CPU never pairs one walk's tenant
 * with another's generation: the tenant key (< 2^32) in the low half, the
 * generation's low 31 bits and a set top bit in the high half (so 0, a new
 * socket's value, is never a resolved tenant).
 * The kernel frees it with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} tally_socket_tenant SEC(".maps");

/* `tenant_of`, remembered per socket where the packet has a full one. */
static __always_inline __u64 tenant_of_socket(struct __sk_buff *skb, __u32 deepest)
{
	__u32 zero = 0;
	__u64 *generation = bpf_map_lookup_elem(&tally_tenant_generation, &zero);
	struct bpf_sock *sk = skb->sk;
	if (!generation || !sk)
		return tenant_of(skb, deepest);
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return tenant_of(skb, deepest);
	__u64 *memo = bpf_sk_storage_get(&tally_socket_tenant, sk, 0,
					 BPF_SK_STORAGE_GET_F_CREATE);
	if (!memo)
		return tenant_of(skb, deepest);
	/* Read before the walk: a bump during it makes the next packet walk
	 * again. */
	__u64 stamp = (0x80000000ULL | (*(volatile __u64 *)generation & 0x7fffffffULL)) << 32;
	__u64 seen = *(volatile __u64 *)memo;
	if ((seen & ~0xffffffffULL) == stamp)
		return seen & 0xffffffffULL;
	__u64 tenant = tenant_of(skb, deepest);
	if (tenant <= 0xffffffffULL)
		*(volatile __u64 *)memo = stamp | tenant;
	return tenant;
}

/* 1 to pass the packet, 0 to drop it. */
static __always_inline int police(struct __sk_buff *skb, void *buckets)
{
	__u32 zero = 0;
	__u32 *level = bpf_map_lookup_elem(&tally_bucket_conf, &zero);
	if (!level || *level == 0)
		return 1;
	__u64 tenant = tenant_of_socket(skb, *level);
	if (tenant == 0)
		return 1;
	struct tally_bucket *b = bpf_map_lookup_elem(buckets, &tenant);
	if (!b)
		return 1;
	/* A tick's resolution is plenty for a bucket holding 100 ms of its
	 * rate, and the coarse clock costs a fraction of the precise one. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 len = skb->len;
	int pass;
	bpf_spin_lock(&b->lock);
	__u64 elapsed = now - b->last_ns;
	/* The coarse clock moves once a tick: most packets find the bucket
	 * refilled already and skip the division. */
	if (elapsed) {
		b->last_ns = now;
		if (elapsed >= 1000000000ULL || b->rate > TALLY_BUCKET_MAX_RATE)
			b->tokens = b->burst;
		else
			b->tokens += elapsed * b->rate / 1000000000ULL;
		if (b->tokens > b->burst)
			b->tokens = b->burst;
	}
	pass = b->tokens >= len;
	if (pass)
		b->tokens -= len;
	bpf_spin_unlock(&b->lock);
	return pass;
}

SEC("cgroup_skb/ingress")
int tally_net_ingress(struct __sk_buff *skb)
{
	struct tally_net_value *v = entry(bpf_skb_cgroup_id(skb));
	if (!police(skb, &tally_bucket_ingress)) {
		if (v)
			__sync_fetch_and_add(&v->ingress_dropped, 1);
		return 0;
	}
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
	if (!police(skb, &tally_bucket_egress)) {
		if (v)
			__sync_fetch_and_add(&v->egress_dropped, 1);
		return 0;
	}
	if (v) {
		v->egress_bytes += skb->len;
		v->egress_packets += 1;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
