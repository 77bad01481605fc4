// Exercises the runtime binding (tests and `bpfnet doctor`): constants, map kinds, ring buffer,
// and one program per hook that bpfnet attaches to.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

const volatile __u32 verdict = XDP_PASS;
const volatile __u64 marker = 0;

// Counts packets per CPU; slot 0 only.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} packets SEC(".maps");

// Arbitrary key -> value store for map API tests.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} table SEC(".maps");

// One record (the marker and the frame length) per packet.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
} events SEC(".maps");

struct event {
	__u64 marker;
	__u32 length;
	__u32 pad;
};

SEC("xdp")
int xdp_check(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&packets, &zero);
	if (count)
		(*count)++;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->marker = marker;
		e->length = ctx->data_end - ctx->data;
		e->pad = 0;
		bpf_ringbuf_submit(e, 0);
	}
	return verdict;
}

SEC("tc")
int tc_check(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&packets, &zero);
	if (count)
		(*count)++;
	return TC_ACT_OK;
}

SEC("cgroup/connect4")
int connect4_check(struct bpf_sock_addr *ctx)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
