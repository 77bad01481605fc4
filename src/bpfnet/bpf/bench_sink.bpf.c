// Trivial programs used as reference points: the cost of the hook itself.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }

SEC("xdp")
int xdp_drop(struct xdp_md *ctx) { return XDP_DROP; }

SEC("xdp")
int xdp_tx(struct xdp_md *ctx) { return XDP_TX; }

char LICENSE[] SEC("license") = "GPL";
