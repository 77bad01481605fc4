// In-kernel traffic generator, run through BPF_PROG_TEST_RUN with live frames: each run of the
// program turns the template frame into the next flow's frame and sends it with XDP_TX.
//
// The headers are restored from the template on every run and the flow's fields written absolutely
// (never incrementally): in live-frames mode a page comes back with whatever the last program that
// saw it left there (an encapsulating load balancer moves the headers, for one).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

const volatile __u32 flows = 1;		// distinct flows cycled through
const volatile __u32 src_addr_base = 0; // host order; source address = base + flow % src_addrs
const volatile __u32 src_addrs = 1;
const volatile __u16 src_port_base = 1024; // source port = base + flow % src_ports
const volatile __u16 src_ports = 1;
const volatile __u16 template_l4_csum = 0; // L4 checksum of the template as built in Python
const volatile __u32 template_src_addr = 0;
const volatile __u64 headers[8] = {};  // the template's first 64 bytes (Ethernet, IP, L4)
const volatile __u32 header_words = 0; // how many 8-byte words of `headers` to restore
const volatile __u16 template_src_port = 0;

// Per-CPU count of frames generated: the sequence that picks each frame's flow.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sequence SEC(".maps");

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *words = (__u16 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		if (i != 5)
			sum += words[i];
	return ~fold(sum);
}

SEC("xdp")
int xdp_generate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	__u64 *words = data;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i >= header_words || (void *)(words + i + 1) > data_end)
			break;
		words[i] = headers[i];
	}
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return XDP_ABORTED;
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&sequence, &zero);
	if (!seq)
		return XDP_ABORTED;
	__u32 flow = (*seq)++ % flows;
	__u32 saddr = bpf_htonl(src_addr_base + flow % src_addrs);
	__u16 sport = bpf_htons(src_port_base + (flow / src_addrs) % src_ports);
	ip->saddr = saddr;
	ip->check = 0;
	ip->check = ip_checksum(ip);

	// L4 checksum: template checksum adjusted for the new source address and port (RFC 1624).
	__u64 sum = (__u16)~template_l4_csum;
	sum += (__u16) ~(template_src_addr & 0xffff) + (__u16) ~(template_src_addr >> 16);
	sum += (__u16)~template_src_port;
	sum += (saddr & 0xffff) + (saddr >> 16) + sport;
	__u16 csum = ~fold(sum);
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return XDP_ABORTED;
		udp->source = sport;
		udp->check = template_l4_csum ? (csum ? csum : 0xffff) : 0;
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return XDP_ABORTED;
		tcp->source = sport;
		tcp->check = csum;
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
