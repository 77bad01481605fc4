// Structs and constants the load balancer shares with Python.
// Mirrored once in src/bpfnet/lb/dataplane.py: change both together (sizes are checked at load).
#ifndef BPFNET_LB_STRUCTS_H
#define BPFNET_LB_STRUCTS_H

#include <linux/types.h>

// VIP flags (Katran's values).
#define LB_F_HASH_NO_SRC_PORT 1	    // hash without the source port: one client address -> one real
#define LB_F_LRU_BYPASS 2	    // never read or write the connection table
#define LB_F_QUIC 4		    // QUIC: the destination connection id names a server id (Katran layouts)
#define LB_F_HASH_DPORT_ONLY 8	    // hash the destination port only: every client -> the same real
#define LB_F_SRC_ROUTING 16	    // the client's network (src_routes LPM) names the real before the ring
#define LB_F_UDP_STABLE_ROUTING 256 // UDP payload 0x52 + 8 bytes names a server id (bytes 1-3)
#define LB_F_UDP_FLOW_MIGRATION 512 // UDP flows whose real is down leave the connection table's real

#define LB_FAMILY_V4 4
#define LB_FAMILY_V6 6

// Address of either family: IPv4 in addr[0] (network order), the rest zero.
struct lb_addr {
	__u32 addr[4];
	__u8 family; // LB_FAMILY_V4 / LB_FAMILY_V6; 0 = unused slot
	__u8 pad[3];
};

// vip_map key: (address, port, protocol). Port 0 = the port-less VIP of that address.
struct lb_vip_key {
	__u32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 family;
};

struct lb_vip_meta {
	__u32 flags;   // LB_F_*
	__u32 vip_num; // ring block and counter index
};

// A flow as the load balancer sees it; also the connection table key. For ICMP errors it is the
// flow embedded in the error, turned around so it reads client -> VIP.
struct lb_flow {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct lb_conn {
	__u32 real_id;
	__u32 pad;
	__u64 atime_ns; // last packet, bpf_ktime_get_coarse_ns() (UDP entries expire)
};

// Next-hop cache entry, per CPU and real id: bpf_fib_lookup's answer for that real, reused while
// fresh instead of a FIB lookup per packet.
struct lb_nexthop {
	struct lb_addr real; // address it was resolved for (a real id can be reused for another)
	__u32 in_ifindex;    // ingress interface the lookup was made from
	__u64 stamp_ns;	     // bpf_ktime_get_coarse_ns() of the lookup; 0 = empty
	__u32 out_ifindex;   // egress interface
	__u8 dmac[6];
	__u8 smac[6];
};

// src_routes_v4 / src_routes_v6 keys: client prefixes (LPM tries).
struct lb_lpm_v4 {
	__u32 prefixlen;
	__be32 addr;
};

struct lb_lpm_v6 {
	__u32 prefixlen;
	__be32 addr[4];
};

// down_reals key: a real of a VIP that is down (health check or operator).
struct lb_down_key {
	__u32 vip_num;
	__u32 real_id;
};

struct lb_counter {
	__u64 packets;
	__u64 bytes;
};

// Indexes of lb_stats. Python reads the names from dataplane.COUNTERS (same order).
enum lb_counter_id {
	LB_CNT_RX,   // every frame
	LB_CNT_PASS, // verdicts
	LB_CNT_DROP,
	LB_CNT_TX,
	LB_CNT_REDIRECT,
	LB_CNT_CONN_HIT,       // connection table consulted and used
	LB_CNT_CONN_MISS,      // consulted, nothing (or a stale entry) found
	LB_CNT_RING,	       // real picked by the Maglev ring
	LB_CNT_ICMP_ECHO,      // echo requests to a VIP answered
	LB_CNT_ICMP_STEERED,   // ICMP errors about a VIP flow sent to its real
	LB_CNT_FIB_OK,	       // next hop from bpf_fib_lookup (fresh or from the next-hop cache)
	LB_CNT_FIB_FALLBACK,   // next hop = the configured gateway MAC
	LB_CNT_DROP_MALFORMED, // drop reasons
	LB_CNT_DROP_IP_OPTIONS,
	LB_CNT_DROP_FRAGMENT,
	LB_CNT_DROP_TOO_BIG,
	LB_CNT_DROP_NO_REAL,
	LB_CNT_DROP_NO_ROUTE,
	LB_CNT_DROP_ENCAP,
	LB_CNT_FIB_LOOKUP,	 // bpf_fib_lookup calls: next-hop cache misses and stale entries
	LB_CNT_UDP_MIGRATED,	 // UDP flow whose table entry named a down real: re-hashed
	LB_CNT_STABLE_ROUTED,	 // UDP stable routing: sent to the real of the header's server id
	LB_CNT_STABLE_UNKNOWN,	 // server id without a real: hashed
	LB_CNT_STABLE_NO_ID,	 // no stable routing header (or server id 0): hashed
	LB_CNT_SRC_ROUTED,	 // LB_F_SRC_ROUTING: the client's network named the real
	LB_CNT_SRC_UNROUTED,	 // LB_F_SRC_ROUTING: no route for the client: the ring
	LB_CNT_QUIC_INITIAL,	 // LB_F_QUIC outcomes: long-header Initial / 0-RTT (client's CID): hashed
	LB_CNT_QUIC_CID_ROUTED,	 // server id of a known real: sent to it
	LB_CNT_QUIC_CID_UNKNOWN, // server id without a real: hashed
	LB_CNT_QUIC_NO_CID,	 // no server id readable (truncated, short DCID, version 0, id 0): hashed
	LB_CNT_QUIC_CID_V0,	 // connection ids read, by layout version (first 2 bits)
	LB_CNT_QUIC_CID_V1,
	LB_CNT_QUIC_CID_V2,
	LB_CNT_QUIC_CID_V3,
	LB_CNT_TPR_ROUTED,     // tcp_server_id_routing outcomes (non-SYN TCP): option's server id -> its real
	LB_CNT_TPR_UNKNOWN,    // server id without a real: table and ring
	LB_CNT_TPR_NO_ID,      // no server id option: table and ring
	LB_CNT_DECAP_IPIP,     // inline decap (outer destination in decap_addrs): IPIP / IP6IP6 / 4in6 / 6in4
	LB_CNT_DECAP_GUE,      // GUE (UDP to gue_port)
	LB_CNT_SID_CONN_NEW,   // a server-id-routed packet (QUIC CID, TPR) entered its flow in the table
	LB_CNT_SID_CONN_MOVED, // ... found its flow's entry naming another real: now names the id's real
	LB_CNT_DROP_TTL,       // a decapsulated packet to forward whose TTL / hop limit would reach 0
	LB_CNT_MAX,
};

// Indexes of decap_stats.
enum lb_decap_counter_id {
	LB_DECAP_RX,
	LB_DECAP_IPIP,
	LB_DECAP_IP6IP6,
	LB_DECAP_4IN6,
	LB_DECAP_GUE,
	LB_DECAP_PASS,
	LB_DECAP_MAX,
};

#endif
