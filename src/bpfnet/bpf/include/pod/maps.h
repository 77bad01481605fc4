// The pod programs' maps (pod.bpf.c); bpfnet.podnet.dataplane binds them (PodObjects). One object
// per node; its maps are pinned under pin_root/podnet/<node>/.
#ifndef BPFNET_POD_MAPS_H
#define BPFNET_POD_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pod/structs.h"

// Local endpoints of this node by address.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct pod_endpoint);
	__uint(max_entries, 4096);
} pod_endpoints SEC(".maps");

// Every known address or prefix -> identities (pods of all nodes, node addresses, policy CIDRs).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} pod_ipcache SEC(".maps");

// Allow entries of every endpoint of this node.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} pod_policy SEC(".maps");

// Connection tracking: flows allowed so far.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
} pod_conntrack SEC(".maps");

// Slot 0: the policy revision, bumped by the agent after every change to endpoints, ipcache or
// policy; an established flow is re-checked once when its revision is older.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} pod_revision SEC(".maps");

// Slot 0: this node itself, where packets for other nodes' pods go.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct pod_node_config);
	__uint(max_entries, 1);
} pod_node SEC(".maps");

// Packets and bytes per (outcome, direction).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct pod_counter);
	__uint(max_entries, POD_METRICS_SLOTS);
} pod_metrics SEC(".maps");

// Service address -> its current backend set (struct svc_value of pod/sock_lb.h).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, POD_MAX_SERVICES);
} pod_services SEC(".maps");

// (revision, slot) -> backend, as the socket LB's backends map.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend);
	__uint(max_entries, 65536);
} pod_backends SEC(".maps");

// Flow to a service address -> its backend: existing flows keep theirs when the set changes.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct svc_flow);
	__uint(max_entries, 65536);
} pod_svc_flows SEC(".maps");

// Reply tuple (backend -> client) -> the service address the client sent to.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct svc_origin);
	__uint(max_entries, 65536);
} pod_svc_rnat SEC(".maps");

// Per-service counters of the fallback, indexed by service id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_fallback_counters);
	__uint(max_entries, POD_MAX_SERVICES);
} pod_svc_stats SEC(".maps");

// Flow events (struct flow_event of pod/flow.h) for the agent: drops, forwards, translations.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} pod_flows SEC(".maps");

// Slot 0: events that did not fit in pod_flows.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} pod_flow_lost SEC(".maps");

// Aggregation of forwarded packets per connection and observation point (pod/trace.h).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_agg_key);
	__type(value, struct flow_agg_value);
	__uint(max_entries, 65536);
} pod_flow_agg SEC(".maps");

#endif
