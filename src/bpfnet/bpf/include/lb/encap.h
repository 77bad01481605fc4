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
		if (outer->proto == IPPROTO_UDP)
			lb_write_udp((void *)(ip6h + 1), outer);
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
