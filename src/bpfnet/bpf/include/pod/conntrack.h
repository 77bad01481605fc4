// Pod data plane: connection tracking (Cilium's order: reply, then established, else new).
#ifndef BPFNET_POD_CONNTRACK_H
#define BPFNET_POD_CONNTRACK_H

#include <linux/tcp.h>
#include "pod/maps.h"
#include "pod/parse.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

enum ct_status {
	CT_NEW,
	CT_ESTABLISHED, // the flow's own direction
	CT_REPLY,	// the opposite direction: never re-checked against policy
	CT_RELATED,	// an ICMP error about a tracked flow
};

static __always_inline void pod_ct_reverse(const struct ct_key *in, struct ct_key *out)
{
	out->saddr = in->daddr;
	out->daddr = in->saddr;
	out->sport = in->dport;
	out->dport = in->sport;
	out->protocol = in->protocol;
}

static __always_inline void pod_ct_touch(struct ct_value *entry, const struct pod_packet *pkt, int reply)
{
	entry->last_seen_ns = bpf_ktime_get_ns();
	if (reply)
		entry->packets_reply++;
	else
		entry->packets_forward++;
	if (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		entry->flags |= CT_F_CLOSING;
}

// Look the packet up; *entry is the flow's entry for CT_ESTABLISHED.
static __always_inline enum ct_status pod_ct_lookup(const struct pod_packet *pkt, struct ct_value **entry)
{
	struct ct_key reverse = {};
	struct ct_value *found;

	if (pkt->is_icmp_error) {
		// The quoted packet travelled the other way: it is the flow's own tuple, or its reply's.
		pod_ct_reverse(&pkt->related, &reverse);
		if (bpf_map_lookup_elem(&pod_conntrack, &pkt->related) ||
		    bpf_map_lookup_elem(&pod_conntrack, &reverse))
			return CT_RELATED;
		return CT_NEW;
	}
	pod_ct_reverse(&pkt->tuple, &reverse);
	found = bpf_map_lookup_elem(&pod_conntrack, &reverse);
	if (found) {
		pod_ct_touch(found, pkt, 1);
		return CT_REPLY;
	}
	found = bpf_map_lookup_elem(&pod_conntrack, &pkt->tuple);
	if (!found)
		return CT_NEW;
	// A fresh SYN on a closed connection's tuple starts a new flow (port reuse).
	if ((found->flags & CT_F_CLOSING) &&
	    (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		found->flags = 0;
		found->revision = 0;
	}
	pod_ct_touch(found, pkt, 0);
	*entry = found;
	return CT_ESTABLISHED;
}

// `tunnel_endpoint`: the node a flow from a non-pod sender came through the overlay from, else 0.
static __always_inline int pod_ct_create(const struct pod_packet *pkt, __u32 revision, __be32 tunnel_endpoint)
{
	struct ct_value entry = {
		.last_seen_ns = bpf_ktime_get_ns(),
		.packets_forward = 1,
		.revision = revision,
		.flags = (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) ? CT_F_CLOSING : 0,
		.tunnel_endpoint = tunnel_endpoint,
	};

	return bpf_map_update_elem(&pod_conntrack, &pkt->tuple, &entry, BPF_ANY);
}

// For a reply: the node its flow came through the overlay from (0: none), where it goes back.
static __always_inline __be32 pod_ct_reply_tunnel(const struct pod_packet *pkt)
{
	struct ct_key reverse = {};
	struct ct_value *entry;

	pod_ct_reverse(&pkt->tuple, &reverse);
	entry = bpf_map_lookup_elem(&pod_conntrack, &reverse);
	return entry ? entry->tunnel_endpoint : 0;
}

#endif
