// Pod network data plane: structs shared with Python (mirrored in bpfnet/podnet/dataplane.py) and
// constants. The maps are in pod/maps.h.
#ifndef BPFNET_POD_STRUCTS_H
#define BPFNET_POD_STRUCTS_H

#include <linux/types.h>
#include "pod/sock_lb.h"

// Reserved identities (Cilium's numbers); 0 is the wildcard in a policy key.
#define IDENTITY_ANY 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2

// Outcome codes counted per direction in pod_metrics. Drops use Cilium's numbers (its negated
// DROP_* codes) so they read the same as `cilium-dbg monitor --type drop` and Hubble.
enum pod_outcome {
	POD_FORWARDED = 0,		   // redirected straight into a local pod (from-pod)
	POD_TO_STACK = 1,		   // handed to the node's stack: host, other nodes, world
	POD_DELIVERED = 2,		   // allowed into the pod from the node's stack (to-pod)
	POD_ARP_REPLIED = 3,		   // ARP request for the gateway answered
	POD_PASSED = 4,			   // not ours to judge (to-pod: non-IPv4, not an endpoint address)
	POD_TUNNELED = 5,		   // sent to a pod of another node through the VXLAN device
	POD_SERVICE_TRANSLATED = 6,	   // destination rewritten to a service backend (tc fallback)
	POD_SERVICE_REPLIED = 7,	   // a backend's reply rewritten to come from the service address
	POD_DROP_INVALID_SOURCE = 132,	   // source address is not the sending pod's
	POD_DROP_POLICY_DENIED = 133,	   // no policy entry allows it
	POD_DROP_INVALID_PACKET = 134,	   // truncated or malformed headers
	POD_DROP_UNKNOWN_L3 = 139,	   // neither IPv4 nor ARP from a pod
	POD_DROP_WRITE_ERROR = 141,	   // rewriting the packet failed
	POD_DROP_CT_INSERT_FAILED = 155,   // conntrack map full or update failed
	POD_DROP_FRAGMENT = 157,	   // IPv4 fragments are not tracked
	POD_DROP_NO_SERVICE_BACKEND = 158, // a service address whose service has no backend
	POD_DROP_NO_TUNNEL_ENDPOINT = 160, // a remote pod, but this node has no VXLAN device
	POD_DROP_INVALID_IDENTITY = 171,   // overlay packet without tunnel key or with identity 0
	POD_DROP_TTL_EXCEEDED = 196,
	POD_DROP_UNKNOWN_ENDPOINT = 203, // overlay packet for an address that is no pod of this node
};

enum pod_direction {
	POD_INGRESS = 0, // into the endpoint
	POD_EGRESS = 1,	 // out of the endpoint
};

#define POD_METRICS_SLOTS 512 // (outcome << 1) | direction

// Endpoint flags: a direction is isolated when some policy selecting the pod has that type.
#define EP_F_INGRESS_ISOLATED 1
#define EP_F_EGRESS_ISOLATED 2

struct pod_endpoint {
	__u32 ifindex;	  // host-side veth on this node
	__u32 flags;	  // EP_F_*
	__u8 mac[6];	  // the pod's eth0
	__u8 node_mac[6]; // the host-side veth: the pod's gateway MAC
};

struct ipcache_key {
	__u32 prefixlen; // LPM: bits of addr that count
	__be32 addr;
};

struct ipcache_value {
	__u32 identity;		// label identity of a pod, IDENTITY_HOST or IDENTITY_WORLD
	__u32 local_identity;	// this entry's own identity: ipBlock rules and per-pod rules
	__be32 tunnel_endpoint; // underlay address of the node holding this pod; 0: not remote
};

// The node itself (slot 0 of pod_node): where packets for other nodes' pods go.
struct pod_node_config {
	__u32 tunnel_ifindex; // the node's VXLAN device (external mode); 0: single node, no overlay
	__be32 underlay_addr; // the node's own underlay address
};

// Policy key: protocol and port last so a prefix can leave them out (Cilium's layout, with the
// endpoint in front because one map holds all endpoints of the node).
struct policy_key {
	__u32 prefixlen; // 72: any protocol; 80: any port; 80 + n: port block; 96: exact
	__be32 endpoint; // the endpoint's address
	__u32 identity;	 // remote identity, IDENTITY_ANY for the L3 wildcard
	__u8 direction;	 // enum pod_direction
	__u8 protocol;
	__be16 dport;
};
#define POLICY_FULL_PREFIX 96

struct policy_value {
	__u64 packets; // packets this entry allowed (new flows and re-checks)
};

// Conntrack key: the 5-tuple in the direction of the flow's first packet.
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; // ICMP echo: the identifier in sport (request) or dport (reply)
	__be16 dport;
	__u8 protocol;
	__u8 pad[3];
};

#define CT_F_CLOSING 1 // a FIN or RST was seen: short timeout

struct ct_value {
	__u64 last_seen_ns; // bpf_ktime_get_ns (CLOCK_MONOTONIC)
	__u64 packets_forward;
	__u64 packets_reply;
	__u32 revision;		// policy revision the flow was last allowed under
	__u32 flags;		// CT_F_*
	__be32 tunnel_endpoint; // a flow from a non-pod sender that came through the overlay: the
				// node it came from, where its replies go back (it holds the NAT)
	__u32 pad;
};

struct pod_counter {
	__u64 packets;
	__u64 bytes;
};

// --- services: the tc fallback of the socket LB (Cilium's per-packet LB in bpf_lxc / nodeport) ---
// The services and their backend sets use the socket LB's layout (pod/sock_lb.h) and are written by
// the same code; a packet to a service address that no socket hook translated is DNATed here.

// A translated flow's backend, chosen once (keyed by the flow's tuple to the service address).
struct svc_flow {
	__be32 backend_addr;
	__be16 backend_port;
	__u16 pad;
	__u32 service_id;
};

// Reverse NAT: the source a backend's reply gets back (keyed by the reply's tuple).
struct svc_origin {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

// Per service id: flows and packets the tc fallback translated on this node.
struct svc_fallback_counters {
	__u64 flows;
	__u64 packets;
};

#define POD_MAX_SERVICES 4096

// Forwarded packets not yet reported, per connection and observation point (pod/trace.h).
struct flow_agg_key {
	struct ct_key tuple;
	__u32 direction; // enum flow_direction: one entry per observation point
};

struct flow_agg_value {
	__u64 last_report_ns;
	__u64 first_ns;	    // first packet not yet reported
	__u64 bytes;	    // not yet reported
	__u32 packets;	    // not yet reported
	__u8 flags_pending; // TCP flags of the packets not yet reported
	__u8 flags_seen;    // every TCP flag reported on this flow
	__u8 pad[2];
};

#endif
