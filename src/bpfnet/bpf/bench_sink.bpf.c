// Sinks for benchmarks: the cost of the hook itself, and counting sinks that say how many frames
// a stage really processed.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

// Frames seen by the counting programs, per CPU; slot 0 only.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

static __always_inline void count(void)
{
	__u32 zero = 0;
	__u64 *value = bpf_map_lookup_elem(&seen, &zero);
	if (value)
		(*value)++;
}

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}

SEC("xdp")
int xdp_count_drop(struct xdp_md *ctx)
{
	count();
	return XDP_DROP;
}

SEC("tc")
int tc_count_drop(struct __sk_buff *skb)
{
	count();
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
