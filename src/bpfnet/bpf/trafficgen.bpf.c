// In-kernel traffic generator, run through BPF_PROG_TEST_RUN with live frames: each run of the
// program turns the template frame into the next flow's frame and sends it with XDP_TX.
//
// The headers are restored from the template on every run and the flow's fields written absolutely
// (never incrementally): in live-frames mode a page comes back with whatever the last program that
// saw it left there (an encapsulating load balancer moves the headers, for one).
//
// IPv4 (TCP, UDP, ICMP) or IPv6 (TCP, UDP, ICMPv6 right after the fixed header): an IPv4 source
// is base + flow % src_addrs; an IPv6 source keeps the template's top 64 bits (the flows' /64,
// written into the template in Python) and takes that as its low 64 bits.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define HEADER_WORDS 10 // Ethernet + IPv6 + TCP: 74 bytes

const volatile __u32 flows = 1; // distinct flows cycled through
// Host order; the source address (IPv6: its low 64 bits) = base + flow % src_addrs.
const volatile __u64 src_addr_base = 0;
const volatile __u32 src_addrs = 1;
const volatile __u16 src_port_base = 1024; // source port = base + flow % src_ports
const volatile __u16 src_ports = 1;
const volatile __u16 template_l4_csum = 0; // L4 checksum of the template as built in Python
// The template's source address (IPv6: its low 64 bits) as it lies in memory.
const volatile __u64 template_src_addr = 0;
const volatile __u64 headers[HEADER_WORDS] = {}; // the template's first bytes (Ethernet, IP, L4)
const volatile __u32 header_words = 0;		 // how many 8-byte words of `headers` to restore
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

// Sum of the one's complements of the low `words` 16-bit words of `value`.
static __always_inline __u64 complements(__u64 value, int words)
{
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i < words)
			sum += (__u16) ~(value >> (16 * i));
	return sum;
}

// The template's L4 checksum adjusted for the new source address and port (RFC 1624): `old` is
// the sum of the complemented template words replaced (address, port), `new` the sum of the new
// words, both as they lie in memory.
static __always_inline __u16 adjusted(__u64 old, __u64 new)
{
	return ~fold((__u16)~template_l4_csum + old + new);
}

// Writes the flow's source port and the adjusted checksum into a UDP or TCP header at `l4`.
static __always_inline int write_ports(void *l4, void *data_end, __u8 protocol, __u16 sport, __u64 old,
				       __u64 new)
{
	old += (__u16)~template_src_port;
	new += sport;
	__u16 csum = adjusted(old, new);
	if (protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return -1;
		udp->source = sport;
		udp->check = template_l4_csum ? (csum ? csum : 0xffff) : 0;
	} else if (protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		tcp->source = sport;
		tcp->check = csum;
	}
	return 0;
}

SEC("xdp")
int xdp_generate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	__u64 *words = data;
#pragma unroll
	for (int i = 0; i < HEADER_WORDS; i++) {
		if (i >= header_words || (void *)(words + i + 1) > data_end)
			break;
		words[i] = headers[i];
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&sequence, &zero);
	if (!seq)
		return XDP_ABORTED;
	__u32 flow = (*seq)++ % flows;
	__u64 address = src_addr_base + flow % src_addrs;
	__u16 sport = bpf_htons(src_port_base + (flow / src_addrs) % src_ports);

	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return XDP_ABORTED;
		__u32 high = bpf_htonl(address >> 32), low = bpf_htonl((__u32)address);
		ip6->saddr.in6_u.u6_addr32[2] = high;
		ip6->saddr.in6_u.u6_addr32[3] = low;
		// IPv6 has no header checksum; every L4 checksum covers the source address.
		__u64 old = complements(template_src_addr, 4);
		__u64 new = (high & 0xffff) + (high >> 16) + (low & 0xffff) + (low >> 16);
		void *l4 = ip6 + 1;
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			__u16 *check = l4 + 2;
			if ((void *)(check + 1) > data_end)
				return XDP_ABORTED;
			*check = adjusted(old, new);
		} else if (write_ports(l4, data_end, ip6->nexthdr, sport, old, new)) {
			return XDP_ABORTED;
		}
		return XDP_TX;
	}

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return XDP_ABORTED;
	__u32 saddr = bpf_htonl((__u32)address);
	ip->saddr = saddr;
	ip->check = 0;
	ip->check = ip_checksum(ip);
	// ICMP's checksum does not cover the addresses: nothing more to do.
	if (write_ports(ip + 1, data_end, ip->protocol, sport, complements(template_src_addr, 2),
			(saddr & 0xffff) + (saddr >> 16)))
		return XDP_ABORTED;
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
