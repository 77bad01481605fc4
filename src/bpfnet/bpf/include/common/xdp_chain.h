// The XDP chain: bpfnet's XDP apps compose on one interface as stages of one root program
// (Katran's xdp_root, Cloudflare's xdpd chain). The root runs the first stage present; a stage that
// lets a packet through runs the next one present, and when none is left the packet passes.
#ifndef BPFNET_COMMON_XDP_CHAIN_H
#define BPFNET_COMMON_XDP_CHAIN_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define XDP_CHAIN_SLOTS 8
#define XDP_CHAIN_DDOS 0
#define XDP_CHAIN_LB 1

// Stage programs by slot, shared by the root and every stage (bpfnet/ebpf/chain.py).
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, XDP_CHAIN_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} xdp_chain SEC(".maps");

// This stage's slot, set at load time; a stage attached alone has no next stage.
const volatile __u32 chain_slot = XDP_CHAIN_SLOTS;

// Hands the packet to the next stage that is present (a tail call to an empty slot falls through
// to the following one); XDP_PASS when there is none.
static __always_inline int xdp_chain_from(struct xdp_md *ctx, __u32 first)
{
	for (__u32 slot = first; slot < XDP_CHAIN_SLOTS; slot++) // a bounded loop
		bpf_tail_call(ctx, &xdp_chain, slot);
	return XDP_PASS;
}

static __always_inline int xdp_chain_next(struct xdp_md *ctx)
{
	return xdp_chain_from(ctx, chain_slot + 1);
}

#endif
