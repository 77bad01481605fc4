// Pod data plane: flow events (Hubble-like) to the ring buffer pod_flows. Every drop is reported;
// forwarded packets are aggregated per connection and observation point (Cilium's monitor
// aggregation): a flow's first packet, any TCP flag not seen on it before, and otherwise at most
// one report per second standing for the packets since the last one. A failed ringbuf write is
// counted in pod_flow_lost so the agent can show what it missed.
#ifndef BPFNET_POD_TRACE_H
#define BPFNET_POD_TRACE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "pod/maps.h"
#include "pod/flow.h"
#include "pod/conntrack.h"

#define FLOW_REPORT_INTERVAL_NS 1000000000ULL

// What a flow event says about the packet at hand, filled in as the program learns it.
struct flow_trace {
	struct ct_key tuple; // zero until the packet is parsed
	__u32 src_identity;
	__u32 dst_identity;
	__u8 direction; // enum flow_direction of the observation point
	__u8 tcp_flags;
	__u8 is_reply; // conntrack said reply
	__u8 pad;
};

static __always_inline __u8 pod_flow_direction(__u32 pod_direction)
{
	return pod_direction == POD_EGRESS ? FLOW_EGRESS : FLOW_INGRESS;
}

static __always_inline void pod_emit_flow(struct __sk_buff *skb, const struct flow_trace *trace, __u8 verdict,
					  __u8 reason, __u8 direction, __u64 time_ns, __u32 packets,
					  __u64 bytes, __u8 tcp_flags)
{
	struct flow_event event = {
		.time_ns = time_ns,
		.bytes = bytes,
		.src_port = trace->tuple.sport,
		.dst_port = trace->tuple.dport,
		.family = 4,
		.protocol = trace->tuple.protocol,
		.direction = direction,
		.verdict = verdict,
		.drop_reason = reason,
		.tcp_flags = tcp_flags,
		.is_reply = trace->is_reply,
		.src_identity = trace->src_identity,
		.dst_identity = trace->dst_identity,
		.ifindex = skb->ifindex,
		.packets = packets,
	};

	event.src_addr[0] = trace->tuple.saddr;
	event.dst_addr[0] = trace->tuple.daddr;
	if (bpf_ringbuf_output(&pod_flows, &event, sizeof(event), 0) < 0) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&pod_flow_lost, &zero);

		if (lost)
			(*lost)++;
	}
}

static __always_inline void pod_trace_drop(struct __sk_buff *skb, const struct flow_trace *trace,
					   __u32 reason, __u32 pod_direction)
{
	pod_emit_flow(skb, trace, FLOW_DROPPED, reason, pod_flow_direction(pod_direction), bpf_ktime_get_ns(),
		      1, skb->len, trace->tcp_flags);
}

static __always_inline void pod_trace_forwarded(struct __sk_buff *skb, const struct flow_trace *trace)
{
	struct flow_agg_key key = { .tuple = trace->tuple, .direction = trace->direction };
	struct flow_agg_value *agg = bpf_map_lookup_elem(&pod_flow_agg, &key);
	__u64 now = bpf_ktime_get_ns();
	__u8 flags = trace->tcp_flags;

	if (!agg) {
		struct flow_agg_value fresh = { .last_report_ns = now, .flags_seen = flags };

		pod_emit_flow(skb, trace, FLOW_FORWARDED, DROP_NONE, trace->direction, now, 1, skb->len,
			      flags);
		bpf_map_update_elem(&pod_flow_agg, &key, &fresh, BPF_ANY);
		return;
	}
	// A fresh SYN after the connection closed starts a new one on the same tuple (port reuse).
	if ((agg->flags_seen & (TCP_FLAG_FIN | TCP_FLAG_RST)) &&
	    (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		agg->flags_seen = 0;
	if (!agg->packets)
		agg->first_ns = now;
	agg->packets++;
	agg->bytes += skb->len;
	agg->flags_pending |= flags;
	if (!(flags & ~agg->flags_seen) && now - agg->last_report_ns < FLOW_REPORT_INTERVAL_NS)
		return;
	pod_emit_flow(skb, trace, FLOW_FORWARDED, DROP_NONE, trace->direction, agg->first_ns, agg->packets,
		      agg->bytes, agg->flags_pending);
	agg->flags_seen |= flags;
	agg->last_report_ns = now;
	agg->packets = 0;
	agg->bytes = 0;
	agg->flags_pending = 0;
}

#endif
