// Root of the XDP chain: attached to every interface bpfnet's XDP apps use, it runs the first stage
// present (see common/xdp_chain.h).
#include "common/xdp_chain.h"
#include "common/xdp_root_maps.h"

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
