// Pod data plane: per-packet service load balancing, the tc fallback of the socket LB (Cilium's
// lb4_local in bpf_lxc and nodeport in bpf_host). A TCP/UDP packet to a service address that no
// socket hook translated (raw sockets, forwarded packets, clients outside the cluster) gets a
// backend chosen from a hash of its 5-tuple, remembered per flow so the flow keeps it when the
// backend set changes (the agent forgets flows whose backend left the set); its destination is rewritten (DNAT) and the reply tuple is recorded so the
// backend's replies get the service address back as their source (reverse NAT). No SNAT: the
// backend sees the real client, and policy runs on the translated tuple.
#ifndef BPFNET_POD_SERVICE_H
#define BPFNET_POD_SERVICE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include "pod/maps.h"
#include "pod/parse.h"
#include "pod/policy.h"
#include "pod/trace.h"
#include "lb/jhash.h"

static __always_inline int pod_is_tcp_or_udp(const struct pod_packet *pkt)
{
	return pkt->tuple.protocol == IPPROTO_TCP || pkt->tuple.protocol == IPPROTO_UDP;
}

// Rewrite one address (at `addr_offset` in the IPv4 header) and one port (at `port_offset` in
// the L4 header) with incremental IP and L4 checksum updates; 0 or -1.
static __always_inline int pod_rewrite_addr_port(struct __sk_buff *skb, const struct pod_packet *pkt,
						 __u32 addr_offset, __be32 old_addr, __be32 new_addr,
						 __u32 port_offset, __be16 old_port, __be16 new_port)
{
	int udp = pkt->tuple.protocol == IPPROTO_UDP;
	__u32 check =
		pkt->l4_offset + (udp ? offsetof(struct udphdr, check) : offsetof(struct tcphdr, check));
	// UDP: a zero checksum means "none" and stays so; a result of zero is sent as 0xffff.
	__u64 mangled = udp ? BPF_F_MARK_MANGLED_0 : 0;

	if (bpf_l4_csum_replace(skb, check, old_addr, new_addr,
				mangled | BPF_F_PSEUDO_HDR | sizeof(new_addr)) < 0 ||
	    bpf_l4_csum_replace(skb, check, old_port, new_port, mangled | sizeof(new_port)) < 0 ||
	    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_addr, new_addr,
				sizeof(new_addr)) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + addr_offset, &new_addr, sizeof(new_addr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, pkt->l4_offset + port_offset, &new_port, sizeof(new_port), 0) < 0)
		return -1;
	return 0;
}

static __always_inline void pod_count_service(__u32 service_id, int new_flow)
{
	struct svc_fallback_counters *counters = bpf_map_lookup_elem(&pod_svc_stats, &service_id);

	if (!counters)
		return;
	counters->packets++;
	if (new_flow)
		counters->flows++;
}

// A new flow's backend: slot hash(5-tuple) % count of the service's current set; 0 or a reason.
static __always_inline int pod_choose_backend(const struct pod_packet *pkt, const struct svc_value *svc,
					      struct svc_flow *chosen)
{
	__u32 words[4] = {
		pkt->tuple.saddr,
		pkt->tuple.daddr,
		((__u32)pkt->tuple.sport << 16) | pkt->tuple.dport,
		pkt->tuple.protocol,
	};
	struct backend_key key = { .revision = svc->revision };
	struct backend *found;

	if (!svc->count)
		return POD_DROP_NO_SERVICE_BACKEND;
	key.slot = lb_jhash_16(words, 0) % svc->count;
	found = bpf_map_lookup_elem(&pod_backends, &key);
	if (!found || found->family != 4)
		return POD_DROP_NO_SERVICE_BACKEND;
	chosen->backend_addr = found->addr[0];
	chosen->backend_port = found->port;
	chosen->service_id = svc->service_id;
	return 0;
}

// The service a TCP/UDP packet is sent to, NULL if its destination is no service address.
static __always_inline struct svc_value *pod_service_of(const struct pod_packet *pkt)
{
	struct svc_key key = {};

	if (!pod_is_tcp_or_udp(pkt) || pkt->is_icmp_error)
		return NULL;
	key.addr[0] = pkt->tuple.daddr;
	key.port = pkt->tuple.dport;
	key.proto = pkt->tuple.protocol;
	key.family = 4;
	return bpf_map_lookup_elem(&pod_services, &key);
}

// DNAT a packet to service `svc`: 0 when done (pkt's tuple and the trace now name the backend),
// else a drop reason. A new flow reports a TRANSLATED flow event.
static __always_inline int pod_service_dnat(struct __sk_buff *skb, struct pod_packet *pkt,
					    const struct svc_value *svc, struct flow_trace *trace)
{
	struct svc_flow chosen = {}, *known;
	struct svc_origin origin = {};
	struct ct_key reply = {};
	__u8 header[sizeof(struct tcphdr)];
	int new_flow = 0, reason;

	// The whole L4 header must be there before any state is written (the checksum is in it).
	if (bpf_skb_load_bytes(skb, pkt->l4_offset, header,
			       pkt->tuple.protocol == IPPROTO_TCP ? sizeof(struct tcphdr)
								  : sizeof(struct udphdr)) < 0)
		return POD_DROP_INVALID_PACKET;

	// A TCP SYN starts a connection: it picks from the current set (a reused port must not
	// stick to a backend that has gone); every other packet keeps its flow's backend.
	known = bpf_map_lookup_elem(&pod_svc_flows, &pkt->tuple);
	if (known && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
		chosen = *known;
	} else {
		reason = pod_choose_backend(pkt, svc, &chosen);
		if (reason)
			return reason;
		// A retransmitted SYN that lands on the same backend is not another flow.
		new_flow = !known || known->backend_addr != chosen.backend_addr ||
			   known->backend_port != chosen.backend_port;
		if (new_flow && bpf_map_update_elem(&pod_svc_flows, &pkt->tuple, &chosen, BPF_ANY) < 0)
			return POD_DROP_CT_INSERT_FAILED;
	}
	// Written on every packet: the reply's entry must outlive LRU eviction as long as the flow.
	reply.saddr = chosen.backend_addr;
	reply.daddr = pkt->tuple.saddr;
	reply.sport = chosen.backend_port;
	reply.dport = pkt->tuple.sport;
	reply.protocol = pkt->tuple.protocol;
	origin.addr = pkt->tuple.daddr;
	origin.port = pkt->tuple.dport;
	if (bpf_map_update_elem(&pod_svc_rnat, &reply, &origin, BPF_ANY) < 0)
		return POD_DROP_CT_INSERT_FAILED;
	if (pod_rewrite_addr_port(skb, pkt, offsetof(struct iphdr, daddr), pkt->tuple.daddr,
				  chosen.backend_addr, offsetof(struct tcphdr, dest), pkt->tuple.dport,
				  chosen.backend_port) < 0)
		return POD_DROP_WRITE_ERROR;

	pkt->tuple.daddr = chosen.backend_addr;
	pkt->tuple.dport = chosen.backend_port;
	trace->tuple = pkt->tuple;
	trace->dst_identity = pod_ipcache_lookup(chosen.backend_addr).identity;
	pod_count_service(chosen.service_id, new_flow);
	if (new_flow)
		pod_emit_flow(skb, trace, FLOW_TRANSLATED, DROP_NONE, trace->direction, bpf_ktime_get_ns(), 1,
			      skb->len, trace->tcp_flags);
	return 0;
}

// Reverse NAT of a backend's reply: its source becomes the service address again. Returns 1
// when rewritten, 0 when the packet is no such reply, -1 when the rewrite failed.
static __always_inline int pod_service_rnat(struct __sk_buff *skb, struct pod_packet *pkt)
{
	struct svc_origin *found, origin;

	if (!pod_is_tcp_or_udp(pkt) || pkt->is_icmp_error)
		return 0;
	found = bpf_map_lookup_elem(&pod_svc_rnat, &pkt->tuple);
	if (!found)
		return 0;
	origin = *found;
	if (pod_rewrite_addr_port(skb, pkt, offsetof(struct iphdr, saddr), pkt->tuple.saddr, origin.addr,
				  offsetof(struct tcphdr, source), pkt->tuple.sport, origin.port) < 0)
		return -1;
	pkt->tuple.saddr = origin.addr;
	pkt->tuple.sport = origin.port;
	return 1;
}

#endif
