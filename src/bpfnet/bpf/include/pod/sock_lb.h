// Socket-level load balancing for services: structs shared with Python (bpfnet/podnet/servicelb.py).
#ifndef BPFNET_POD_SOCK_LB_H
#define BPFNET_POD_SOCK_LB_H

#include <linux/types.h>

#define SVC_FLAG_AFFINITY 1 // same client network namespace -> same backend

// A service address: IPv4 in addr[0] (family 4) or IPv6 (family 6); port in network order.
struct svc_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 family;
};

// The service's current backend set: `revision` names it in `backends`; count 0 refuses.
struct svc_value {
	__u32 revision;
	__u16 count;
	__u8 flags;
	__u8 pad;
	__u32 service_id; // stable id for counters and affinity
};

struct backend_key {
	__u32 revision;
	__u32 slot;
};

struct backend {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct affinity_key {
	__u64 netns_cookie;
	__u32 service_id;
	__u32 pad;
};

// A UDP socket's view: replies from `backend` are shown as coming from the service address.
struct rev_key {
	__u64 socket_cookie;
	__u32 addr[4];
	__u16 port;
	__u16 pad;
	__u32 pad2; // explicit: tail padding would hold stack garbage in the key
};

struct rev_value {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

// Per service id: connections (connect) and datagram translations (sendmsg), and refusals.
struct svc_counters {
	__u64 connects;
	__u64 datagrams;
	__u64 refused;
};

// A network namespace the scoped socket LB translates for (key: its netns cookie): the pod's
// address and identity for a pod's namespace, the node's router address and the host identity
// for a node's. Its connect() translations are reported as TRANSLATED flow events.
struct scope_client {
	__be32 addr;
	__u32 identity;
};

#endif
