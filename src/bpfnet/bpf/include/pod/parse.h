// Pod data plane: parsing an IPv4 packet into the tuple that conntrack and policy need.
#ifndef BPFNET_POD_PARSE_H
#define BPFNET_POD_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "pod/maps.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// <linux/icmp.h> drags in libc headers; the few ICMP facts needed here.
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

struct icmp_echo_header {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

struct pod_packet {
	struct ct_key tuple;   // this packet's 5-tuple (ports 0 for other protocols)
	struct ct_key related; // ICMP errors: the tuple of the packet the error is about
	__u8 is_icmp_error;
	__u8 tcp_flags;
	__u8 ttl;
	__u8 pad;
	__be16 ttl_protocol; // the IPv4 header's ttl+protocol word, for the checksum update
	__u16 l4_offset;     // where the transport header starts
};

struct l4_ports {
	__be16 sport;
	__be16 dport;
};

// Ports of a TCP/UDP/SCTP header (all start with them) at `offset`; 0 on success.
static __always_inline int pod_load_ports(struct __sk_buff *skb, __u32 offset, struct ct_key *tuple)
{
	struct l4_ports ports;

	if (bpf_skb_load_bytes(skb, offset, &ports, sizeof(ports)) < 0)
		return -1;
	tuple->sport = ports.sport;
	tuple->dport = ports.dport;
	return 0;
}

static __always_inline int pod_is_icmp_error_type(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

// The header quoted by an ICMP error at `offset`: its addresses, protocol and ports.
static __always_inline int pod_parse_quoted(struct __sk_buff *skb, __u32 offset, struct ct_key *tuple)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, offset, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
		return -1;
	tuple->saddr = ip.saddr;
	tuple->daddr = ip.daddr;
	tuple->protocol = ip.protocol;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP || ip.protocol == IPPROTO_SCTP)
		return pod_load_ports(skb, offset + ip.ihl * 4, tuple);
	return 0;
}

// Parse the IPv4 packet behind the Ethernet header; returns 0 or a POD_DROP_* reason.
static __always_inline int pod_parse_ipv4(struct __sk_buff *skb, struct pod_packet *pkt)
{
	struct iphdr ip;
	__u32 l4;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return POD_DROP_INVALID_PACKET;
	if (ip.version != 4 || ip.ihl < 5)
		return POD_DROP_INVALID_PACKET;
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return POD_DROP_FRAGMENT;
	l4 = ETH_HLEN + ip.ihl * 4;
	pkt->tuple.saddr = ip.saddr;
	pkt->tuple.daddr = ip.daddr;
	pkt->tuple.protocol = ip.protocol;
	pkt->ttl = ip.ttl;
	pkt->ttl_protocol = *((__be16 *)&ip + 4);
	pkt->l4_offset = l4;

	switch (ip.protocol) {
	case IPPROTO_TCP: {
		__u8 flags;

		if (pod_load_ports(skb, l4, &pkt->tuple) < 0 ||
		    bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) < 0)
			return POD_DROP_INVALID_PACKET;
		pkt->tcp_flags = flags;
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (pod_load_ports(skb, l4, &pkt->tuple) < 0)
			return POD_DROP_INVALID_PACKET;
		break;
	case IPPROTO_ICMP: {
		struct icmp_echo_header icmp;

		if (bpf_skb_load_bytes(skb, l4, &icmp, sizeof(icmp)) < 0)
			return POD_DROP_INVALID_PACKET;
		if (icmp.type == ICMP_ECHO) {
			pkt->tuple.sport = icmp.id;
		} else if (icmp.type == ICMP_ECHOREPLY) {
			pkt->tuple.dport = icmp.id;
		} else if (pod_is_icmp_error_type(icmp.type)) {
			if (pod_parse_quoted(skb, l4 + sizeof(icmp), &pkt->related) < 0)
				return POD_DROP_INVALID_PACKET;
			pkt->is_icmp_error = 1;
		}
		break;
	}
	default:
		break;
	}
	return 0;
}

#endif
