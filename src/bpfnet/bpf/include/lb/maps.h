// The load balancer's maps (lb.bpf.c); bpfnet.lb.dataplane binds them (LbObjects).
#ifndef BPFNET_LB_MAPS_H
#define BPFNET_LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lb/structs.h"

// Sizes at build time; bpfnet.lb.dataplane sets them from the LbSettings before load.
#define LB_DEFAULT_MAX_VIPS 64
#define LB_DEFAULT_RING_SIZE 65537
#define LB_DEFAULT_MAX_REALS 4096
#define LB_DEFAULT_CONN_TABLE_SIZE (1 << 22) // config.DEFAULT_CONN_TABLE_SIZE
#define LB_MAX_SERVER_IDS 65536
#define LB_MAX_DOWN_REALS 65536
#define LB_MAX_SRC_ROUTES 65536
#define LB_MAX_DECAP_ADDRS 64

// (VIP address, port, protocol) -> flags and VIP number.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_vip_key);
	__type(value, struct lb_vip_meta);
	__uint(max_entries, LB_DEFAULT_MAX_VIPS);
} vip_map SEC(".maps");

// Addresses that carry at least one VIP (ICMP echo and the drop decisions for unparsable packets).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_addr);
	__type(value, __u32);
	__uint(max_entries, LB_DEFAULT_MAX_VIPS);
} vip_addrs SEC(".maps");

// Entry 0: 1 while some VIP is port-less (port 0). A packet that matches no (address, port, protocol)
// VIP looks for a port-less one only then: without any, a packet to another address costs one
// vip_map lookup, not two. bpfnet.lb.plan sets it before the first such VIP entry is written and
// clears it once the last one is deleted.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} portless_vips SEC(".maps");

// Maglev rings, one block of ring_size slots per VIP number: slot -> real id (0 = none).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, (LB_DEFAULT_MAX_VIPS * LB_DEFAULT_RING_SIZE));
} ch_rings SEC(".maps");

// Real id -> address (family 0 = unused id).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_addr);
	__uint(max_entries, LB_DEFAULT_MAX_REALS);
} reals SEC(".maps");

// Real id -> its next hop as bpf_fib_lookup last answered (per CPU: no torn entries, no sharing).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_nexthop);
	__uint(max_entries, LB_DEFAULT_MAX_REALS);
} nexthops SEC(".maps");

// Flow -> real: keeps established flows on their real when rings change. One table shared by all
// CPUs, so a flow hashed to any CPU finds its entry, with the kernel's common LRU (Katran's LRU
// type): each CPU takes free entries from the shared list 128 at a time and any CPU can fill the
// whole table. BPF_F_NO_COMMON_LRU (an LRU per CPU) instead rotates that CPU's lists on every
// insert (a new flow cost ~95 ns more, docs/bench.md) and gives each CPU 1/ncpus of the entries.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_flow);
	__type(value, struct lb_conn);
	__uint(max_entries, LB_DEFAULT_CONN_TABLE_SIZE);
} conn_table SEC(".maps");

// Server id (QUIC connection id, UDP stable routing header, TCP option) -> real id.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, LB_MAX_SERVER_IDS);
} server_ids SEC(".maps");

// (VIP number, real id) of reals that are down: UDP flows of LB_F_UDP_FLOW_MIGRATION VIPs leave them.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_down_key);
	__type(value, __u32);
	__uint(max_entries, LB_MAX_DOWN_REALS);
} down_reals SEC(".maps");

// Client IPv4 network -> real id, for LB_F_SRC_ROUTING VIPs (Katran's lpm_src_v4).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_lpm_v4);
	__type(value, __u32);
	__uint(max_entries, LB_MAX_SRC_ROUTES);
} src_routes_v4 SEC(".maps");

// Client IPv6 network -> real id (Katran's lpm_src_v6).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_lpm_v6);
	__type(value, __u32);
	__uint(max_entries, LB_MAX_SRC_ROUTES);
} src_routes_v6 SEC(".maps");

// The load balancer's own addresses: encapsulated packets sent to them are decapsulated inline.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_addr);
	__type(value, __u32);
	__uint(max_entries, LB_MAX_DECAP_ADDRS);
} decap_addrs SEC(".maps");

// Global counters and drop reasons, indexed by enum lb_counter_id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_counter);
	__uint(max_entries, LB_CNT_MAX);
} lb_stats SEC(".maps");

// Packets and bytes per VIP number (every packet that matched the VIP).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_counter);
	__uint(max_entries, LB_DEFAULT_MAX_VIPS);
} vip_stats SEC(".maps");

// Packets and bytes per real id (packets sent to it).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_counter);
	__uint(max_entries, LB_DEFAULT_MAX_REALS);
} real_stats SEC(".maps");

#endif
