// Flow events from the pod data plane to the agent (Hubble-like); mirrored in bpfnet/podnet/flows.py.
#ifndef BPFNET_POD_FLOW_H
#define BPFNET_POD_FLOW_H

#include <linux/types.h>

enum flow_verdict {
	FLOW_FORWARDED = 1,
	FLOW_DROPPED = 2,
	FLOW_TRANSLATED = 3, // a service address rewritten to a backend (socket LB or tc fallback)
};

enum flow_direction {
	FLOW_EGRESS = 0,  // leaving the source pod
	FLOW_INGRESS = 1, // entering the destination pod
};

// Drop reasons use Cilium's numbers (the negated DROP_* codes) so users can compare.
enum drop_reason {
	DROP_NONE = 0,
	DROP_INVALID_SOURCE_IP = 132,
	DROP_POLICY_DENIED = 133,
	DROP_INVALID_PACKET = 134,
	DROP_CT_INVALID_HEADER = 135,
	DROP_UNSUPPORTED_L3_PROTOCOL = 139,
	DROP_ERROR_WRITING_TO_PACKET = 141,
	DROP_CT_MAP_INSERTION_FAILED = 155,
	DROP_FRAGMENT_NOT_SUPPORTED = 157,
	DROP_SERVICE_BACKEND_NOT_FOUND = 158,
	DROP_NO_TUNNEL_ENDPOINT = 160,
	DROP_FIB_LOOKUP_FAILED = 169,
	DROP_INVALID_IDENTITY = 171,
	DROP_TTL_EXCEEDED = 196,
	DROP_UNKNOWN_ENDPOINT = 203,
};

struct flow_event {
	__u64 time_ns;	   // bpf_ktime_get_ns() of the first packet in this report
	__u64 bytes;	   // bytes this report stands for
	__u32 src_addr[4]; // IPv4 in [0]
	__u32 dst_addr[4];
	__u16 src_port; // network order; ICMP: type/code in src, id in dst
	__u16 dst_port;
	__u8 family; // 4 or 6
	__u8 protocol;
	__u8 direction;	  // enum flow_direction
	__u8 verdict;	  // enum flow_verdict
	__u8 drop_reason; // enum drop_reason - 0 when pod_forwarded (values fit in a byte)
	__u8 tcp_flags;	  // OR of the flags seen since the last report
	__u8 is_reply;
	__u8 pad;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 packets; // packets this report stands for (trace aggregation)
	__u32 pad2;    // explicit tail padding: records are copied whole
};

#endif
