// The socket LB's maps (sock_lb.bpf.c); bpfnet.podnet.servicelb binds them (SockLbObjects).
#ifndef BPFNET_POD_SOCK_MAPS_H
#define BPFNET_POD_SOCK_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pod/sock_lb.h"
#include "pod/flow.h"

#define SOCK_MAX_SERVICES 4096

// Network namespace cookies (bpf_get_netns_cookie) whose sockets are translated when scoped.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct scope_client);
} netns_scope SEC(".maps");

// When scoped: a TRANSLATED flow event (pod/flow.h) per connect() translated, for the agent.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} sock_flows SEC(".maps");

// Slot 0: events that did not fit in sock_flows.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sock_flow_lost SEC(".maps");

// Service address -> its current backend set.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SOCK_MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
} services SEC(".maps");

// (revision, slot) -> backend; a new revision is written in full before the service points at it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct backend_key);
	__type(value, struct backend);
} backends SEC(".maps");

// Client network namespace + service -> slot, for services with client affinity.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct affinity_key);
	__type(value, struct backend);
} affinity SEC(".maps");

// Sockets' reverse translations (socket, backend) -> service, for recvmsg() and getpeername().
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rev_key);
	__type(value, struct rev_value);
} reverse SEC(".maps");

// Per-service counters, indexed by service id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SOCK_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_counters);
} counters SEC(".maps");

#endif
