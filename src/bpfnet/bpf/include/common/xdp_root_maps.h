// The root's own map (xdp_root.bpf.c); the chain's prog array is in common/xdp_chain.h.
#ifndef BPFNET_COMMON_XDP_ROOT_MAPS_H
#define BPFNET_COMMON_XDP_ROOT_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Which apps want the root on an interface: ifindex -> bit mask of holders. Only the control plane
// reads it; it is pinned with the chain so a restarted agent knows who holds what.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xdp_holders SEC(".maps");

#endif
