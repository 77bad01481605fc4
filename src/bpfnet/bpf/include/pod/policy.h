// Pod data plane: ipcache and policy lookups (Cilium's order: the remote identity with exact
// port, port block, any port, any protocol by LPM; then the L3 wildcard; then the local identity
// of the remote address's ipcache entry, which ipBlock rules are keyed by).
#ifndef BPFNET_POD_POLICY_H
#define BPFNET_POD_POLICY_H

#include "pod/maps.h"

static __always_inline struct ipcache_value pod_ipcache_lookup(__be32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *found = bpf_map_lookup_elem(&pod_ipcache, &key);
	struct ipcache_value world = { .identity = IDENTITY_WORLD };

	return found ? *found : world;
}

static __always_inline int pod_policy_hit(struct policy_key *key, __u32 identity)
{
	struct policy_value *hit;

	key->identity = identity;
	hit = bpf_map_lookup_elem(&pod_policy, key);
	if (!hit)
		return 0;
	__sync_fetch_and_add(&hit->packets, 1);
	return 1;
}

static __always_inline int pod_policy_allows(__be32 endpoint, __u8 direction,
					     const struct ipcache_value *remote, const struct ct_key *tuple)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.endpoint = endpoint,
		.direction = direction,
		.protocol = tuple->protocol,
		// ICMP carries no port; its echo identifier must not look like one.
		.dport = tuple->protocol == IPPROTO_ICMP ? 0 : tuple->dport,
	};

	if (pod_policy_hit(&key, remote->identity) || pod_policy_hit(&key, IDENTITY_ANY))
		return 1;
	return remote->local_identity && pod_policy_hit(&key, remote->local_identity);
}

#endif
