// Root of the XDP chain: attached to the interface, it runs stage 0 (see include/xdp_chain.h).
#include "xdp_chain.h"

SEC("xdp")
int xdp_root(struct xdp_md *ctx)
{
    bpf_tail_call(ctx, &xdp_chain, 0);
    return XDP_PASS;
}

// A stage that only passes packets on: fills a slot so later stages still run (tests, and a
// disabled app keeps its place).
SEC("xdp")
int xdp_chain_pass(struct xdp_md *ctx)
{
    return xdp_chain_next(ctx);
}

char LICENSE[] SEC("license") = "GPL";
