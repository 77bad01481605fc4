// SPDX-License-Identifier: GPL-2.0
// XDP decapsulation for the reals behind bpfnet's load balancer: strips IPIP, IP6IP6, 4in6 and GUE
// (UDP to gue_port, inner IP right after the UDP header) and passes the inner packet to the stack,
// which owns the VIP on a local interface and answers the client directly. Replaces the ipip/ip6tnl/fou
// devices this kernel does not have. Everything else passes untouched.
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb/structs.h"
#include "lb/encap.h"
#include "lb/decap_maps.h"

const volatile __u16 gue_port = 6080; // 0 = no GUE

static __always_inline void decap_count(__u32 index, __u32 bytes)
{
	struct lb_counter *counter = bpf_map_lookup_elem(&decap_stats, &index);

	if (counter) {
		counter->packets++;
		counter->bytes += bytes;
	}
}

// EtherType of the IP packet starting at inner, 0 when it is neither IPv4 nor IPv6.
static __always_inline __be16 decap_inner_ethertype(void *inner, void *data_end)
{
	__u8 *version = inner;

	if ((void *)(version + 1) > data_end)
		return 0;
	if (*version >> 4 == 4)
		return bpf_htons(ETH_P_IP);
	if (*version >> 4 == 6)
		return bpf_htons(ETH_P_IPV6);
	return 0;
}

// Outer header length and inner EtherType of an encapsulated packet, or 0 when it is not one.
static __always_inline __u32 decap_outer_header(void *data, void *data_end, __be16 *inner_proto, __u32 *kind)
{
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u8 proto;
	__u32 ip_len;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end || iph->ihl != 5 || iph->frag_off & bpf_htons(0x3fff))
			return 0;
		proto = iph->protocol;
		ip_len = sizeof(*iph);
		udp = (void *)(iph + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end)
			return 0;
		proto = ip6h->nexthdr;
		ip_len = sizeof(*ip6h);
		udp = (void *)(ip6h + 1);
	} else {
		return 0;
	}

	if (proto == IPPROTO_IPIP) {
		*inner_proto = bpf_htons(ETH_P_IP);
		*kind = ip_len == sizeof(struct iphdr) ? LB_DECAP_IPIP : LB_DECAP_4IN6;
		return ip_len;
	}
	if (proto == IPPROTO_IPV6) {
		*inner_proto = bpf_htons(ETH_P_IPV6);
		*kind = LB_DECAP_IP6IP6;
		return ip_len;
	}
	if (proto == IPPROTO_UDP && gue_port) {
		if ((void *)(udp + 1) > data_end || udp->dest != bpf_htons(gue_port))
			return 0;
		*inner_proto = decap_inner_ethertype(udp + 1, data_end);
		*kind = LB_DECAP_GUE;
		return *inner_proto ? ip_len + sizeof(*udp) : 0;
	}
	return 0;
}

SEC("xdp")
int xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;
	__be16 inner_proto = 0;
	__u32 kind = LB_DECAP_PASS;
	__u32 header_len = decap_outer_header(data, data_end, &inner_proto, &kind);

	decap_count(LB_DECAP_RX, frame_len);
	if (!header_len || lb_pop_outer(ctx, header_len, inner_proto)) {
		decap_count(LB_DECAP_PASS, frame_len);
		return XDP_PASS;
	}
	decap_count(kind, frame_len);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
