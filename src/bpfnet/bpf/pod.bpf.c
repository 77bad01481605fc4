// Pod network data plane (Cilium's bpf_lxc.c in spirit), attached with tcx on the host side of
// every pod's veth:
//   pod_from_container (ingress of the host veth: packets leaving the pod) answers the pod's ARP
//     for its gateway, applies the pod's egress policy and, for a pod on this node, the
//     destination's ingress policy, then redirects straight into the destination pod
//     (bpf_redirect_peer) or hands the packet to the node's stack;
//   pod_to_container (egress of the host veth: packets the node's stack sends to the pod)
//     applies the pod's ingress policy;
//   pod_from_overlay (ingress of the node's VXLAN device: packets from pods of other nodes)
//     takes the sender's identity from the tunnel key, never from its address, applies the
//     destination's ingress policy and redirects into the pod;
//   pod_from_netdev (ingress of the node's underlay device: packets from outside the cluster)
//     serves service addresses for clients that are no pod (pod/service.h, Cilium's nodeport).
// A packet to a service address that the socket LB did not translate is DNATed to a backend
// first (pod/service.h); CT and policy see the backend; replies get the service address back
// as source after their CT/policy step, on whichever path delivers them.
// A packet for a pod of another node leaves after the sender's egress policy with the tunnel key
// set (remote = that node's underlay address, tunnel id = the sending pod's identity) and is
// redirected to the VXLAN device, as Cilium's bpf_lxc.c / bpf_overlay.c do.
// Every packet these programs decide on is reported to the ring buffer pod_flows (pod/trace.h):
// drops one by one with their reason, forwarded packets aggregated per connection.
// Replies of tracked flows pass without a policy lookup; a flow's own direction is re-checked
// once after each policy change (revision), so changes apply to established flows that are no
// longer allowed and leave the others alone.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "pod/maps.h"
#include "pod/parse.h"
#include "pod/conntrack.h"
#include "pod/policy.h"
#include "pod/trace.h"
#include "pod/service.h"

// skb->cb slot holding the ifindex a packet was redirected to (Cilium's CB_IFINDEX): later stages
// and BPF_PROG_TEST_RUN's ctx_out can read the forwarding decision.
#define CB_IFINDEX 0
// For a packet sent into the overlay: the tunnel key's remote address (network order) and id.
#define CB_TUNNEL_ENDPOINT 1
#define CB_TUNNEL_ID 2
#define TUNNEL_TTL 64

#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

struct arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

struct arp_frame {
	struct ethhdr eth;
	struct arp_ipv4 arp;
} __attribute__((packed));

static __always_inline void pod_count(struct __sk_buff *skb, __u32 outcome, __u32 direction)
{
	__u32 slot = (outcome << 1) | direction;
	struct pod_counter *counter = bpf_map_lookup_elem(&pod_metrics, &slot);

	if (counter) {
		counter->packets++;
		counter->bytes += skb->len;
	}
}

static __always_inline int pod_drop(struct __sk_buff *skb, const struct flow_trace *trace, __u32 reason,
				    __u32 direction)
{
	pod_count(skb, reason, direction);
	pod_trace_drop(skb, trace, reason, direction);
	return TC_ACT_SHOT;
}

// Report a packet the program lets through (aggregated per flow); returns `action`.
static __always_inline int pod_forwarded(struct __sk_buff *skb, const struct flow_trace *trace, int action)
{
	if (action != TC_ACT_SHOT)
		pod_trace_forwarded(skb, trace);
	return action;
}

// What the flow events of a parsed packet say: its tuple, flags and the identities of both ends
// (the sender's from the tunnel key for packets from the overlay, else from the ipcache).
static __always_inline void pod_trace_packet(struct flow_trace *trace, const struct pod_packet *pkt,
					     __u32 src_identity)
{
	trace->tuple = pkt->tuple;
	trace->tcp_flags = pkt->tcp_flags;
	trace->src_identity = src_identity ? src_identity : pod_ipcache_lookup(pkt->tuple.saddr).identity;
	trace->dst_identity = pod_ipcache_lookup(pkt->tuple.daddr).identity;
}

static __always_inline __u32 pod_current_revision(void)
{
	__u32 zero = 0;
	__u32 *revision = bpf_map_lookup_elem(&pod_revision, &zero);

	return revision ? *revision : 0;
}

// Answer a pod's ARP request for any address but its own with the host veth's MAC, so the pod's
// default route via a link-local gateway works without a bridge (Cilium's ARP responder).
static __always_inline int pod_answer_arp(struct __sk_buff *skb, const struct flow_trace *trace)
{
	struct arp_frame frame;
	struct pod_endpoint *ep;
	__be32 target;

	if (bpf_skb_load_bytes(skb, 0, &frame, sizeof(frame)) < 0)
		return pod_drop(skb, trace, POD_DROP_INVALID_PACKET, POD_EGRESS);
	if (frame.arp.htype != bpf_htons(ARPHRD_ETHER) || frame.arp.ptype != bpf_htons(ETH_P_IP) ||
	    frame.arp.hlen != ETH_ALEN || frame.arp.plen != 4)
		return pod_drop(skb, trace, POD_DROP_INVALID_PACKET, POD_EGRESS);
	if (frame.arp.op != bpf_htons(ARPOP_REQUEST) || frame.arp.tpa == frame.arp.spa)
		return TC_ACT_OK; // replies to the node's own requests, gratuitous ARP
	ep = bpf_map_lookup_elem(&pod_endpoints, &frame.arp.spa);
	if (!ep || ep->ifindex != skb->ifindex)
		return pod_drop(skb, trace, POD_DROP_INVALID_SOURCE, POD_EGRESS);

	target = frame.arp.tpa;
	__builtin_memcpy(frame.eth.h_dest, frame.arp.sha, ETH_ALEN);
	__builtin_memcpy(frame.eth.h_source, ep->node_mac, ETH_ALEN);
	frame.arp.op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(frame.arp.tha, frame.arp.sha, ETH_ALEN);
	frame.arp.tpa = frame.arp.spa;
	__builtin_memcpy(frame.arp.sha, ep->node_mac, ETH_ALEN);
	frame.arp.spa = target;
	if (bpf_skb_store_bytes(skb, 0, &frame, sizeof(frame), 0) < 0)
		return pod_drop(skb, trace, POD_DROP_WRITE_ERROR, POD_EGRESS);
	pod_count(skb, POD_ARP_REPLIED, POD_EGRESS);
	skb->cb[CB_IFINDEX] = skb->ifindex;
	return bpf_redirect(skb->ifindex, 0);
}

// Route into a pod of this node: decrement the TTL, rewrite the MACs as the gateway would, and
// enter the pod's namespace directly from here.
static __always_inline int pod_redirect_to_pod(struct __sk_buff *skb, const struct pod_packet *pkt,
					       const struct pod_endpoint *dst, __u32 direction,
					       const struct flow_trace *trace)
{
	struct ethhdr eth;
	__u8 ttl = pkt->ttl - 1;
	__be16 new_word;

	if (pkt->ttl <= 1)
		return pod_drop(skb, trace, POD_DROP_TTL_EXCEEDED, direction);
	new_word = pkt->ttl_protocol;
	*(__u8 *)&new_word = ttl; // the ttl is the word's first byte in network order
	__builtin_memcpy(eth.h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, dst->node_mac, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), pkt->ttl_protocol, new_word,
				sizeof(new_word)) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &ttl, 1, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0)
		return pod_drop(skb, trace, POD_DROP_WRITE_ERROR, direction);
	pod_count(skb, POD_FORWARDED, direction);
	skb->cb[CB_IFINDEX] = dst->ifindex;
	return bpf_redirect_peer(dst->ifindex, 0);
}

// Send to a pod of another node: the VXLAN device (external mode) encapsulates with this key.
// The TTL is left alone: the receiving node decrements it once, as for a pod of the same node.
static __always_inline int pod_redirect_to_tunnel(struct __sk_buff *skb, __be32 endpoint, __u32 identity,
						  const struct flow_trace *trace)
{
	__u32 zero = 0;
	struct pod_node_config *node = bpf_map_lookup_elem(&pod_node, &zero);
	struct bpf_tunnel_key key = {
		.tunnel_id = identity,
		.remote_ipv4 = bpf_ntohl(endpoint), // the helper takes host order
		.tunnel_ttl = TUNNEL_TTL,
	};

	if (!node || !node->tunnel_ifindex)
		return pod_drop(skb, trace, POD_DROP_NO_TUNNEL_ENDPOINT, POD_EGRESS);
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return pod_drop(skb, trace, POD_DROP_WRITE_ERROR, POD_EGRESS);
	pod_count(skb, POD_TUNNELED, POD_EGRESS);
	skb->cb[CB_IFINDEX] = node->tunnel_ifindex;
	skb->cb[CB_TUNNEL_ENDPOINT] = endpoint;
	skb->cb[CB_TUNNEL_ID] = identity;
	return bpf_redirect(node->tunnel_ifindex, 0);
}

// Conntrack and policy for a packet `src` -> `dst` (either may be NULL: not a local endpoint).
// `sender` is who dst's ingress policy sees; NULL: the ipcache entry of the source address.
// `tunnel_origin`: the node a new flow from a non-pod sender came through the overlay from (its
// replies go back there), else 0. Returns 0 to let it pass, else the drop reason; *direction says
// which side refused. Sets trace->is_reply.
static __always_inline int pod_admit(const struct pod_packet *pkt, const struct pod_endpoint *src,
				     const struct pod_endpoint *dst, const struct ipcache_value *sender,
				     __be32 tunnel_origin, __u32 *direction, struct flow_trace *trace)
{
	struct ct_value *entry = NULL;
	enum ct_status status = pod_ct_lookup(pkt, &entry);
	__u32 revision;

	trace->is_reply = status == CT_REPLY;
	if (status == CT_REPLY || status == CT_RELATED)
		return 0;
	revision = pod_current_revision();
	if (status == CT_ESTABLISHED && entry->revision == revision)
		return 0;

	if (src && (src->flags & EP_F_EGRESS_ISOLATED)) {
		struct ipcache_value remote = pod_ipcache_lookup(pkt->tuple.daddr);

		if (!pod_policy_allows(pkt->tuple.saddr, POD_EGRESS, &remote, &pkt->tuple)) {
			*direction = POD_EGRESS;
			return POD_DROP_POLICY_DENIED;
		}
	}
	if (dst && (dst->flags & EP_F_INGRESS_ISOLATED)) {
		struct ipcache_value remote = sender ? *sender : pod_ipcache_lookup(pkt->tuple.saddr);

		// The node itself may always reach its pods (health checks), as Cilium's default.
		if (remote.identity != IDENTITY_HOST &&
		    !pod_policy_allows(pkt->tuple.daddr, POD_INGRESS, &remote, &pkt->tuple)) {
			*direction = POD_INGRESS;
			return POD_DROP_POLICY_DENIED;
		}
	}

	if (status == CT_ESTABLISHED) {
		entry->revision = revision;
		return 0;
	}
	if (pod_ct_create(pkt, revision, tunnel_origin) < 0) {
		*direction = dst ? POD_INGRESS : POD_EGRESS;
		return POD_DROP_CT_INSERT_FAILED;
	}
	return 0;
}

// A reply of a flow the tc fallback translated gets the service address back as its source
// (after CT and policy, which saw the backend); 0 or a drop reason.
static __always_inline int pod_reverse_nat(struct __sk_buff *skb, struct pod_packet *pkt,
					   const struct flow_trace *trace, __u32 direction)
{
	int rewritten;

	if (!trace->is_reply) // the reply of a translated flow is one of its conntrack entry
		return 0;
	rewritten = pod_service_rnat(skb, pkt);
	if (rewritten < 0)
		return POD_DROP_WRITE_ERROR;
	if (rewritten)
		pod_count(skb, POD_SERVICE_REPLIED, direction);
	return 0;
}

SEC("tc")
int pod_from_container(struct __sk_buff *skb)
{
	struct pod_packet pkt = {};
	struct pod_endpoint *src, *dst;
	struct svc_value *svc;
	struct flow_trace trace = { .direction = FLOW_EGRESS };
	struct ipcache_value remote = {};
	struct ethhdr eth;
	__u32 direction = POD_EGRESS;
	__be32 reply_tunnel = 0;
	int reason;

	skb->cb[CB_IFINDEX] = 0;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return pod_drop(skb, &trace, POD_DROP_INVALID_PACKET, POD_EGRESS);
	if (eth.h_proto == bpf_htons(ETH_P_ARP))
		return pod_answer_arp(skb, &trace);
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return pod_drop(skb, &trace, POD_DROP_UNKNOWN_L3, POD_EGRESS);
	reason = pod_parse_ipv4(skb, &pkt);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_EGRESS);
	pod_trace_packet(&trace, &pkt, 0);

	src = bpf_map_lookup_elem(&pod_endpoints, &pkt.tuple.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return pod_drop(skb, &trace, POD_DROP_INVALID_SOURCE, POD_EGRESS);
	// A service address the socket LB did not translate (raw socket, forwarded packet).
	svc = pod_service_of(&pkt);
	if (svc) {
		reason = pod_service_dnat(skb, &pkt, svc, &trace);
		if (reason)
			return pod_drop(skb, &trace, reason, POD_EGRESS);
		pod_count(skb, POD_SERVICE_TRANSLATED, POD_EGRESS);
	}
	dst = bpf_map_lookup_elem(&pod_endpoints, &pkt.tuple.daddr);

	reason = pod_admit(&pkt, src, dst, NULL, 0, &direction, &trace);
	if (reason)
		return pod_drop(skb, &trace, reason, direction);
	if (!dst) {
		remote = pod_ipcache_lookup(pkt.tuple.daddr);
		if (!remote.tunnel_endpoint && trace.is_reply)
			reply_tunnel = pod_ct_reply_tunnel(&pkt);
	}
	reason = pod_reverse_nat(skb, &pkt, &trace, POD_EGRESS);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_EGRESS);
	if (dst)
		return pod_forwarded(skb, &trace, pod_redirect_to_pod(skb, &pkt, dst, POD_EGRESS, &trace));
	if (remote.tunnel_endpoint)
		return pod_forwarded(
			skb, &trace,
			pod_redirect_to_tunnel(skb, remote.tunnel_endpoint, trace.src_identity, &trace));
	// A reply to a client outside the cluster whose flow another node translated: back to it.
	if (reply_tunnel)
		return pod_forwarded(skb, &trace,
				     pod_redirect_to_tunnel(skb, reply_tunnel, trace.src_identity, &trace));
	pod_count(skb, POD_TO_STACK, POD_EGRESS);
	return pod_forwarded(skb, &trace, TC_ACT_OK);
}

SEC("tc")
int pod_to_container(struct __sk_buff *skb)
{
	struct pod_packet pkt = {};
	struct flow_trace trace = { .direction = FLOW_INGRESS };
	struct pod_endpoint *dst;
	struct ethhdr eth;
	__u32 direction = POD_INGRESS;
	int reason;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return pod_drop(skb, &trace, POD_DROP_INVALID_PACKET, POD_INGRESS);
	if (eth.h_proto != bpf_htons(ETH_P_IP)) {
		pod_count(skb, POD_PASSED, POD_INGRESS);
		return TC_ACT_OK;
	}
	reason = pod_parse_ipv4(skb, &pkt);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_INGRESS);
	dst = bpf_map_lookup_elem(&pod_endpoints, &pkt.tuple.daddr);
	if (!dst || dst->ifindex != skb->ifindex) {
		pod_count(skb, POD_PASSED, POD_INGRESS);
		return TC_ACT_OK;
	}
	pod_trace_packet(&trace, &pkt, 0);
	reason = pod_admit(&pkt, NULL, dst, NULL, 0, &direction, &trace);
	if (reason)
		return pod_drop(skb, &trace, reason, direction);
	reason = pod_reverse_nat(skb, &pkt, &trace, POD_INGRESS);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_INGRESS);
	pod_count(skb, POD_DELIVERED, POD_INGRESS);
	return pod_forwarded(skb, &trace, TC_ACT_OK);
}

SEC("tc")
int pod_from_overlay(struct __sk_buff *skb)
{
	struct flow_trace trace = { .direction = FLOW_INGRESS };
	struct bpf_tunnel_key key = {};
	struct pod_packet pkt = {};
	struct ipcache_value sender;
	struct pod_endpoint *dst;
	struct ethhdr eth;
	__u32 direction = POD_INGRESS;
	int reason;

	skb->cb[CB_IFINDEX] = 0;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0 || key.tunnel_id == IDENTITY_ANY)
		return pod_drop(skb, &trace, POD_DROP_INVALID_IDENTITY, POD_INGRESS);
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return pod_drop(skb, &trace, POD_DROP_INVALID_PACKET, POD_INGRESS);
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return pod_drop(skb, &trace, POD_DROP_UNKNOWN_L3, POD_INGRESS);
	reason = pod_parse_ipv4(skb, &pkt);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_INGRESS);
	pod_trace_packet(&trace, &pkt, key.tunnel_id);
	dst = bpf_map_lookup_elem(&pod_endpoints, &pkt.tuple.daddr);
	if (!dst) {
		// A backend's reply to a client outside the cluster whose flow this node translated:
		// the service address as source, then the stack routes it to the client. Its inner
		// Ethernet header is addressed to the other node's gateway: without PACKET_HOST the
		// stack would discard it as another host's.
		reason = pod_service_rnat(skb, &pkt);
		if (reason < 0)
			return pod_drop(skb, &trace, POD_DROP_WRITE_ERROR, POD_INGRESS);
		if (!reason)
			return pod_drop(skb, &trace, POD_DROP_UNKNOWN_ENDPOINT, POD_INGRESS);
		if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
			return pod_drop(skb, &trace, POD_DROP_WRITE_ERROR, POD_INGRESS);
		pod_count(skb, POD_SERVICE_REPLIED, POD_INGRESS);
		pod_count(skb, POD_TO_STACK, POD_INGRESS);
		return pod_forwarded(skb, &trace, TC_ACT_OK);
	}

	// Label identity from the tunnel; the address still decides ipBlock rules (its local identity).
	sender = pod_ipcache_lookup(pkt.tuple.saddr);
	sender.identity = key.tunnel_id;
	reason = pod_admit(&pkt, NULL, dst, &sender, sender.tunnel_endpoint ? 0 : bpf_htonl(key.remote_ipv4),
			   &direction, &trace);
	if (reason)
		return pod_drop(skb, &trace, reason, direction);
	reason = pod_reverse_nat(skb, &pkt, &trace, POD_INGRESS);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_INGRESS);
	return pod_forwarded(skb, &trace, pod_redirect_to_pod(skb, &pkt, dst, POD_INGRESS, &trace));
}

// tcx ingress of the node's underlay device: packets from outside the cluster to a service
// address (Cilium's nodeport in bpf_host). A local backend gets it after its ingress policy with
// the client as sender; a remote backend through the overlay with the WORLD identity, so its node
// applies its ingress policy (ipBlock rules still see the real client: no SNAT). Everything else
// (the overlay's own VXLAN packets, ARP, traffic for the node) passes untouched and unreported.
SEC("tc")
int pod_from_netdev(struct __sk_buff *skb)
{
	struct flow_trace trace = { .direction = FLOW_INGRESS };
	struct pod_packet pkt = {};
	struct ipcache_value remote;
	struct pod_endpoint *dst;
	struct svc_value *svc;
	struct ethhdr eth;
	__u32 direction = POD_INGRESS;
	int reason;

	skb->cb[CB_IFINDEX] = 0;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 || eth.h_proto != bpf_htons(ETH_P_IP) ||
	    pod_parse_ipv4(skb, &pkt))
		return TC_ACT_OK; // not for a service: the stack judges it as without us
	svc = pod_service_of(&pkt);
	if (!svc)
		return TC_ACT_OK;
	pod_trace_packet(&trace, &pkt, 0);
	reason = pod_service_dnat(skb, &pkt, svc, &trace);
	if (reason)
		return pod_drop(skb, &trace, reason, POD_INGRESS);
	pod_count(skb, POD_SERVICE_TRANSLATED, POD_INGRESS);
	dst = bpf_map_lookup_elem(&pod_endpoints, &pkt.tuple.daddr);
	if (dst) {
		reason = pod_admit(&pkt, NULL, dst, NULL, 0, &direction, &trace);
		if (reason)
			return pod_drop(skb, &trace, reason, direction);
		return pod_forwarded(skb, &trace, pod_redirect_to_pod(skb, &pkt, dst, POD_INGRESS, &trace));
	}
	remote = pod_ipcache_lookup(pkt.tuple.daddr);
	if (remote.tunnel_endpoint)
		return pod_forwarded(
			skb, &trace,
			pod_redirect_to_tunnel(skb, remote.tunnel_endpoint, IDENTITY_WORLD, &trace));
	return pod_drop(skb, &trace, POD_DROP_NO_SERVICE_BACKEND, POD_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
