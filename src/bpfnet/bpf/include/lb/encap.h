// Outer headers: push (load balancer) and pop (decap on the reals).
// Encapsulations: IPIP (4 in 4), IP6IP6 (6 in 6), 4 in 6, and GUE = the same inside UDP (Katran's
// variant without a GUE header: the inner IP header follows the UDP header directly).
#ifndef BPFNET_LB_ENCAP_H
#define BPFNET_LB_ENCAP_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb/csum.h"

#define LB_OUTER_TTL 64
#define LB_CSUM_CHUNK 512 // bytes bpf_csum_diff sums in one call (its limit)
#define LB_MAX_INNER 1536 // inner packets are at most 1500 bytes (the LB drops bigger frames)

// The outer header and what goes in it.
struct lb_outer {
	__u32 src[4];
	__u32 dst[4];
	__u8 family; // of the outer header: LB_FAMILY_V4 / LB_FAMILY_V6
	__u8 proto;  // IPPROTO_IPIP, IPPROTO_IPV6, or IPPROTO_UDP for GUE
	__u8 tos;
	__be16 gue_sport;
	__be16 gue_dport;
	__u32 inner_len; // bytes of the inner IP packet
};

static __always_inline __u32 lb_outer_header_len(const struct lb_outer *outer)
{
	__u32 len = outer->family == LB_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

	return outer->proto == IPPROTO_UDP ? len + sizeof(struct udphdr) : len;
}

static __always_inline void lb_copy_mac(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, ETH_ALEN);
}

static __always_inline void lb_write_udp(struct udphdr *udp, const struct lb_outer *outer)
{
	udp->source = outer->gue_sport;
	udp->dest = outer->gue_dport;
	udp->len = bpf_htons(sizeof(*udp) + outer->inner_len);
	udp->check = 0;
}

// 32-bit partial one's complement sum of the 16-bit words of a 32-bit value (as it lies in memory).
static __always_inline __u32 lb_sum32(__u32 v)
{
	return (v & 0xffff) + (v >> 16);
}

// Adds the sum of the next `size` bytes (a multiple of 4, at most LB_CSUM_CHUNK) at p to sum when
// len holds that size's bit; returns -1 from the caller when they run past data_end.
#define LB_SUM_CHUNK(size)                                    \
	if (len & (size)) {                                   \
		if (p + (size) > data_end)                    \
			return -1;                            \
		sum = bpf_csum_diff(NULL, 0, p, (size), sum); \
		if (sum < 0)                                  \
			return -1;                            \
		p += (size);                                  \
	}

// Partial sum of the `len` bytes at `p` (len < LB_MAX_INNER), an odd last byte padded with zero as
// RFC 1071 says; -1 when the bytes run past data_end. bpf_csum_diff sums at most 512 bytes a call:
// len is taken apart into its bits (1024 = two calls).
static __always_inline __s64 lb_sum_bytes(void *p, void *data_end, __u32 len)
{
	__s64 sum = 0;

	if (len >= LB_MAX_INNER)
		return -1;
	if (len & 1024) {
		if (p + 1024 > data_end)
			return -1;
		sum = bpf_csum_diff(NULL, 0, p, LB_CSUM_CHUNK, sum);
		if (sum < 0)
			return -1;
		sum = bpf_csum_diff(NULL, 0, p + LB_CSUM_CHUNK, LB_CSUM_CHUNK, sum);
		if (sum < 0)
			return -1;
		p += 1024;
	}
	LB_SUM_CHUNK(512)
	LB_SUM_CHUNK(256)
	LB_SUM_CHUNK(128)
	LB_SUM_CHUNK(64)
	LB_SUM_CHUNK(32)
	LB_SUM_CHUNK(16)
	LB_SUM_CHUNK(8)
	LB_SUM_CHUNK(4)
	if (len & 2) {
		if (p + 2 > data_end)
			return -1;
		sum += *(__u16 *)p;
		p += 2;
	}
	if (len & 1) {
		if (p + 1 > data_end)
			return -1;
		sum += bpf_htons((__u16)(*(__u8 *)p) << 8);
	}
	return sum;
}

// Partial sum of an IPv6 pseudo-header's addresses (RFC 8200 8.1) at `addrs` (source then destination).
static __always_inline __u64 lb_sum_addrs6(const __u32 *addrs)
{
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < 8; i++)
		sum += lb_sum32(addrs[i]);
	return sum;
}

// The UDP checksum of a GUE packet over IPv6 (a zero one is accepted only by endpoints configured
// for it, RFC 6935/6936). It covers the inner IP packet, summed the cheap way where the inner
// packet's own checksum already covers its payload (Linux's local checksum offload): a valid
// TCP, UDP or ICMPv6 checksum makes the segment sum to the complement of its pseudo-header, a
// valid ICMP one to zero; only the inner header is summed. An inner IPv4 UDP datagram without a
// checksum, or another protocol, is summed whole. A corrupt inner checksum makes the outer one
// wrong too: such a packet is dropped at the real either way. Returns 0, or -1 when the inner
// packet is not all in the frame.
static __always_inline int lb_gue_csum6(struct ipv6hdr *ip6h, struct udphdr *udp, void *data_end)
{
	void *inner = udp + 1;
	__u32 udp_len = bpf_ntohs(udp->len);
	__u64 sum = lb_sum_addrs6((const __u32 *)&ip6h->saddr) + bpf_htons(IPPROTO_UDP) + udp->len;
	__u32 seg_len, head_len;
	__u32 pseudo; // the inner segment's pseudo-header, 0: it has none (ICMP)
	__u8 proto;
	__s64 rest;

	sum += udp->source + udp->dest + udp->len; // the UDP header, its checksum 0
	if (udp_len < sizeof(*udp) + sizeof(struct iphdr) || inner + 1 > data_end)
		return -1;
	if ((*(__u8 *)inner >> 4) == 4) {
		struct iphdr *iph = inner;
		const __u16 *words = inner;

		if ((void *)(iph + 1) > data_end)
			return -1;
#pragma unroll
		for (int i = 0; i < (int)sizeof(*iph) / 2; i++)
			sum += words[i];
		head_len = sizeof(*iph);
		proto = iph->protocol;
		seg_len = udp_len - sizeof(*udp) - head_len;
		pseudo = lb_sum32(iph->saddr) + lb_sum32(iph->daddr) + bpf_htons(proto) + bpf_htons(seg_len);
		if (proto == IPPROTO_ICMP)
			pseudo = 0;
		else if (proto == IPPROTO_UDP) {
			struct udphdr *iudp = (void *)(iph + 1);

			if ((void *)(iudp + 1) > data_end)
				return -1;
			if (!iudp->check)
				proto = 0; // no checksum: sum it whole
		}
	} else {
		struct ipv6hdr *i6 = inner;
		const __u16 *words = inner;

		if ((void *)(i6 + 1) > data_end)
			return -1;
#pragma unroll
		for (int i = 0; i < (int)sizeof(*i6) / 2; i++)
			sum += words[i];
		head_len = sizeof(*i6);
		proto = i6->nexthdr;
		seg_len = bpf_ntohs(i6->payload_len);
		pseudo = lb_sum_addrs6((const __u32 *)&i6->saddr) + bpf_htons(proto) + i6->payload_len;
		if (proto == IPPROTO_ICMP)
			proto = 0; // ICMPv4 after IPv6: not a checksum this shortcut knows
	}
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_ICMPV6 ||
	    proto == IPPROTO_ICMP) {
		// the segment sums to -pseudo (the complement of the folded pseudo-header), -0 for ICMP
		sum += lb_csum_fold(pseudo);
	} else {
		rest = lb_sum_bytes(inner + head_len, data_end, seg_len);
		if (rest < 0)
			return -1;
		sum += rest;
	}
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	udp->check = lb_csum_fold((__u32)sum);
	if (!udp->check)
		udp->check = 0xffff; // 0 would say "no checksum"
	return 0;
}

// Grows the frame at its head by the outer header and writes Ethernet + outer headers.
// smac == NULL keeps the input frame's destination MAC as the new source (Katran's choice).
// Returns 0, or -1 when the frame cannot grow.
static __always_inline int lb_push_outer(struct xdp_md *ctx, const struct lb_outer *outer, const __u8 *dmac,
					 const __u8 *smac)
{
	__u32 header_len = lb_outer_header_len(outer);
	struct ethhdr *eth, *old_eth;
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, -(int)header_len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	old_eth = data + header_len;
	if ((void *)(old_eth + 1) > data_end)
		return -1;
	if (smac)
		lb_copy_mac(eth->h_source, smac);
	else
		lb_copy_mac(eth->h_source, old_eth->h_dest);
	lb_copy_mac(eth->h_dest, dmac);

	if (outer->family == LB_FAMILY_V4) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) + sizeof(struct udphdr) > data_end)
			return -1;
		eth->h_proto = bpf_htons(ETH_P_IP);
		*(__u8 *)iph = 0x45; // version 4, 5 words: no options
		iph->tos = outer->tos;
		iph->tot_len = bpf_htons(header_len + outer->inner_len);
		iph->id = 0;
		iph->frag_off = 0;
		iph->ttl = LB_OUTER_TTL;
		iph->protocol = outer->proto;
		iph->check = 0;
		iph->saddr = outer->src[0];
		iph->daddr = outer->dst[0];
		iph->check = lb_ipv4_csum(iph);
		if (outer->proto == IPPROTO_UDP)
			lb_write_udp((void *)(iph + 1), outer);
	} else {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		__u8 *first = (__u8 *)ip6h;

		if ((void *)(ip6h + 1) + sizeof(struct udphdr) > data_end)
			return -1;
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		// version 6, traffic class = the inner one, flow label 0
		first[0] = 0x60 | (outer->tos >> 4);
		first[1] = (outer->tos & 0x0f) << 4;
		first[2] = 0;
		first[3] = 0;
		ip6h->payload_len = bpf_htons(header_len - sizeof(*ip6h) + outer->inner_len);
		ip6h->nexthdr = outer->proto;
		ip6h->hop_limit = LB_OUTER_TTL;
		__builtin_memcpy(&ip6h->saddr, outer->src, 16);
		__builtin_memcpy(&ip6h->daddr, outer->dst, 16);
		if (outer->proto == IPPROTO_UDP) {
			lb_write_udp((void *)(ip6h + 1), outer);
			if (lb_gue_csum6(ip6h, (void *)(ip6h + 1), data_end))
				return -1;
		}
	}
	return 0;
}

// Removes header_len bytes after the Ethernet header, keeping the MACs; the new EtherType follows
// the inner IP version. Returns 0, or -1 when the head cannot move.
static __always_inline int lb_pop_outer(struct xdp_md *ctx, __u32 header_len, __be16 inner_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *old_eth = data, *eth;
	__u8 macs[2 * ETH_ALEN];

	if (header_len < sizeof(struct iphdr) || header_len > sizeof(struct ipv6hdr) + sizeof(struct udphdr))
		return -1;
	eth = data + header_len;
	if ((void *)(old_eth + 1) > data_end || (void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(macs, old_eth, sizeof(macs));
	__builtin_memcpy(eth, macs, sizeof(macs));
	eth->h_proto = inner_proto;
	return bpf_xdp_adjust_head(ctx, header_len) ? -1 : 0;
}

#endif
