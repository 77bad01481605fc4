// The XDP chain: bpfnet's XDP apps compose on one interface as stages of one root program
// (Katran's xdp_root, Cloudflare's xdpd chain). The root tail-calls slot 0; a stage that lets a
// packet through tail-calls the next slot, and an empty slot means XDP_PASS.
#pragma once
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

// Hands the packet to the next stage; XDP_PASS when there is none.
static __always_inline int xdp_chain_next(struct xdp_md *ctx)
{
    if (chain_slot + 1 < XDP_CHAIN_SLOTS)
        bpf_tail_call(ctx, &xdp_chain, chain_slot + 1);
    return XDP_PASS;
}
