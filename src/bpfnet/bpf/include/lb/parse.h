// Packet parsing for the load balancer: Ethernet + IPv4/IPv6 + TCP/UDP/ICMP into a struct lb_packet.
// Untagged frames only. IPv4 options are never parsed (such packets are classified, not read).
#ifndef BPFNET_LB_PARSE_H
#define BPFNET_LB_PARSE_H

#include <stdbool.h>
#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb/structs.h"

#define LB_IPV6_FRAGMENT 44
#define LB_ICMP_ECHO_REPLY 0
#define LB_ICMP_DEST_UNREACH 3
#define LB_ICMP_ECHO 8
#define LB_ICMPV6_DEST_UNREACH 1
#define LB_ICMPV6_PKT_TOOBIG 2
#define LB_ICMPV6_ECHO_REQUEST 128
#define LB_ICMPV6_ECHO_REPLY 129

// ICMP and ICMPv6 share this 8-byte header (<linux/icmp.h> drags in libc socket headers).
struct lb_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
};

struct lb_packet {
	struct lb_flow flow;
	__u32 ip_len;	   // bytes of the IP packet (header + payload) that gets encapsulated
	__u8 tos;	   // IPv4 ToS / IPv6 traffic class, copied to the outer header
	__u8 tcp_flags;	   // byte 13 of the TCP header (0 for other protocols)
	bool icmp_error;   // flow comes from the packet embedded in an ICMP error
	bool decapsulated; // inline decap removed an outer header: forwarding it is a router hop
};

// What the parser found. Everything but LB_PARSE_FLOW and LB_PARSE_NOT_OURS is only acted upon when
// the destination address belongs to a VIP; otherwise the packet passes untouched.
enum lb_parse_result {
	LB_PARSE_FLOW,	    // a TCP/UDP flow (or an ICMP error about one) in pkt->flow
	LB_PARSE_NOT_OURS,  // not IP, other L4, unhandled ICMP, unreadable destination: pass
	LB_PARSE_ECHO,	    // ICMP echo request
	LB_PARSE_MALFORMED, // truncated or inconsistent headers
	LB_PARSE_IP_OPTIONS,
	LB_PARSE_FRAGMENT,
};

#define LB_TCP_FLAG_SYN 0x02
#define LB_TCP_FLAG_RST 0x04

// Reads the ports (and TCP flags) of an L4 header at l4.
static __always_inline int lb_parse_ports(void *l4, void *data_end, __u8 proto, struct lb_packet *pkt)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return LB_PARSE_MALFORMED;
		pkt->flow.sport = tcp->source;
		pkt->flow.dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
		return LB_PARSE_FLOW;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return LB_PARSE_MALFORMED;
		pkt->flow.sport = udp->source;
		pkt->flow.dport = udp->dest;
		return LB_PARSE_FLOW;
	}
	return LB_PARSE_NOT_OURS;
}

// The IPv4 packet quoted in an ICMP error, as the flow client -> VIP it answers. The error must be
// addressed to the quoted packet's source (the VIP), as routers send it.
static __always_inline int lb_parse_icmp_error_v4(struct iphdr *inner, void *data_end, struct lb_packet *pkt)
{
	__be16 *ports = (__be16 *)(inner + 1);

	if ((void *)(ports + 2) > data_end || inner->ihl != 5 || inner->saddr != pkt->flow.dst[0])
		return LB_PARSE_NOT_OURS;
	if (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP)
		return LB_PARSE_NOT_OURS;
	pkt->flow.src[0] = inner->daddr;
	pkt->flow.dst[0] = inner->saddr;
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flow.proto = inner->protocol;
	pkt->icmp_error = true;
	return LB_PARSE_FLOW;
}

static __always_inline int lb_parse_v4(void *data, void *data_end, __u32 frame_len, struct lb_packet *pkt)
{
	struct iphdr *iph = data + sizeof(struct ethhdr);
	__u32 tot_len;

	if ((void *)(iph + 1) > data_end)
		return LB_PARSE_NOT_OURS;
	pkt->flow.family = LB_FAMILY_V4;
	pkt->flow.src[0] = iph->saddr;
	pkt->flow.dst[0] = iph->daddr;
	pkt->flow.proto = iph->protocol;
	pkt->tos = iph->tos;
	tot_len = bpf_ntohs(iph->tot_len);
	pkt->ip_len = tot_len;
	if (iph->version != 4 || iph->ihl < 5)
		return LB_PARSE_MALFORMED;
	if (iph->ihl != 5)
		return LB_PARSE_IP_OPTIONS;
	if (iph->frag_off & bpf_htons(0x3fff)) // MF set or a non-zero offset
		return LB_PARSE_FRAGMENT;
	if (tot_len < sizeof(*iph) || sizeof(struct ethhdr) + tot_len > frame_len)
		return LB_PARSE_MALFORMED;

	if (iph->protocol == IPPROTO_ICMP) {
		struct lb_icmphdr *icmp = (void *)(iph + 1);

		if ((void *)(icmp + 1) > data_end)
			return LB_PARSE_MALFORMED;
		if (icmp->type == LB_ICMP_ECHO)
			return LB_PARSE_ECHO;
		if (icmp->type == LB_ICMP_DEST_UNREACH)
			return lb_parse_icmp_error_v4((struct iphdr *)(icmp + 1), data_end, pkt);
		return LB_PARSE_NOT_OURS;
	}
	return lb_parse_ports(iph + 1, data_end, iph->protocol, pkt);
}

static __always_inline void lb_copy_v6(__u32 *dst, const struct in6_addr *src)
{
	dst[0] = src->in6_u.u6_addr32[0];
	dst[1] = src->in6_u.u6_addr32[1];
	dst[2] = src->in6_u.u6_addr32[2];
	dst[3] = src->in6_u.u6_addr32[3];
}

static __always_inline int lb_parse_icmp_error_v6(struct ipv6hdr *inner, void *data_end,
						  struct lb_packet *pkt)
{
	__be16 *ports = (__be16 *)(inner + 1);

	__u32 *quoted_src = inner->saddr.in6_u.u6_addr32;

	if ((void *)(ports + 2) > data_end)
		return LB_PARSE_NOT_OURS;
	if (inner->nexthdr != IPPROTO_TCP && inner->nexthdr != IPPROTO_UDP)
		return LB_PARSE_NOT_OURS;
	if ((quoted_src[0] ^ pkt->flow.dst[0]) | (quoted_src[1] ^ pkt->flow.dst[1]) |
	    (quoted_src[2] ^ pkt->flow.dst[2]) | (quoted_src[3] ^ pkt->flow.dst[3]))
		return LB_PARSE_NOT_OURS; // addressed elsewhere than the quoted source
	lb_copy_v6(pkt->flow.src, &inner->daddr);
	lb_copy_v6(pkt->flow.dst, &inner->saddr);
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flow.proto = inner->nexthdr;
	pkt->icmp_error = true;
	return LB_PARSE_FLOW;
}

static __always_inline int lb_parse_v6(void *data, void *data_end, __u32 frame_len, struct lb_packet *pkt)
{
	struct ipv6hdr *ip6h = data + sizeof(struct ethhdr);
	__u32 ip_len;

	if ((void *)(ip6h + 1) > data_end)
		return LB_PARSE_NOT_OURS;
	pkt->flow.family = LB_FAMILY_V6;
	lb_copy_v6(pkt->flow.src, &ip6h->saddr);
	lb_copy_v6(pkt->flow.dst, &ip6h->daddr);
	pkt->flow.proto = ip6h->nexthdr;
	pkt->tos = (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
	ip_len = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
	pkt->ip_len = ip_len;
	if (ip6h->version != 6 || sizeof(struct ethhdr) + ip_len > frame_len)
		return LB_PARSE_MALFORMED;
	if (ip6h->nexthdr == LB_IPV6_FRAGMENT)
		return LB_PARSE_FRAGMENT;

	if (ip6h->nexthdr == IPPROTO_ICMPV6) {
		struct lb_icmphdr *icmp = (void *)(ip6h + 1);

		if ((void *)(icmp + 1) > data_end)
			return LB_PARSE_MALFORMED;
		if (icmp->type == LB_ICMPV6_ECHO_REQUEST)
			return LB_PARSE_ECHO;
		if (icmp->type == LB_ICMPV6_PKT_TOOBIG || icmp->type == LB_ICMPV6_DEST_UNREACH)
			return lb_parse_icmp_error_v6((struct ipv6hdr *)(icmp + 1), data_end, pkt);
		return LB_PARSE_NOT_OURS;
	}
	return lb_parse_ports(ip6h + 1, data_end, ip6h->nexthdr, pkt);
}

#endif
