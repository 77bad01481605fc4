// Root of the XDP chain: attached to every interface bpfnet's XDP apps use, it runs the first stage
// present (see include/xdp_chain.h).
#include "xdp_chain.h"

// Which apps want the root on an interface: ifindex -> bit mask of holders. Only the control plane
// reads it; it is pinned with the chain so a restarted agent knows who holds what.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xdp_holders SEC(".maps");

SEC("xdp")
int xdp_root(struct xdp_md *ctx)
{
	return xdp_chain_from(ctx, 0);
}

// A stage that only passes packets on: fills a slot so later stages still run (tests, and a
// disabled app keeps its place).
SEC("xdp")
int xdp_chain_pass(struct xdp_md *ctx)
{
	return xdp_chain_next(ctx);
}

char LICENSE[] SEC("license") = "GPL";
