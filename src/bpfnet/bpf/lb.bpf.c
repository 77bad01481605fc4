// SPDX-License-Identifier: GPL-2.0
// XDP L4 load balancer (Katran-class): VIP -> connection table or Maglev ring -> real, encapsulated
// (IPIP / IP6IP6 / 4in6, optionally GUE) and sent towards the real, which answers the client directly.
// Control plane: src/bpfnet/lb (rings from bpfnet.lb.maglev, structs mirrored in dataplane.py).
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb/structs.h"
#include "lb/parse.h"
#include "lb/jhash.h"
#include "lb/csum.h"
#include "lb/encap.h"
#include "lb/maps.h"

#define AF_INET 2
#define AF_INET6 10
#define LB_STABLE_RT_TYPE 0x52 // 'R': Katran's UDP stable routing packet type
#define LB_STABLE_RT_LEN 8
// QUIC invariants (RFC 8999) and Katran's reading of them
#define LB_QUIC_LONG_HEADER 0x80
#define LB_QUIC_TYPE_MASK \
	0x30 // long-header packet type: Initial 0x00, 0-RTT 0x10, Handshake 0x20, Retry 0x30
#define LB_QUIC_HANDSHAKE 0x20
#define LB_QUIC_MIN_CID_LEN 8 // bytes of the destination connection id read
// Katran's TPR TCP option: kind 0xB7, length 6, a 4-byte server id
#define LB_TPR_OPT_KIND 0xB7
#define LB_TPR_OPT_LEN 6
#define LB_TPR_MAX_OPTS 15 // options looked at before giving up
#define LB_TCP_OPT_EOL 0
#define LB_TCP_OPT_NOP 1

// Settings, fixed at load (bpfnet.lb.dataplane writes them from the LbState settings).
const volatile __u32 ring_size = LB_DEFAULT_RING_SIZE;
const volatile __u32 max_frame_size = 1514;	      // larger frames to a VIP are dropped
const volatile __u64 udp_timeout_ns = 30000000000ULL; // UDP connection entries older than this are stale
// UDP entries are stamped with bpf_ktime_get_coarse_ns() (a call to bpf_ktime_get_coarse_ns() cost about 28 ns
// per hit here): an entry counts as stale once it may be, i.e. up to one tick of that clock early.
const volatile __u64 clock_res_ns = 4000000;
const volatile bool use_fib = true;		     // next hop from bpf_fib_lookup, else gateway_mac
const volatile __u64 nexthop_ttl_ns = 1000000000ULL; // a cached FIB answer is reused this long
const volatile __u8 gateway_mac[ETH_ALEN] = {};	     // next hop when the FIB has no answer
const volatile bool use_gue = false;		     // GUE (UDP) instead of IPIP / IP6IP6
const volatile __u16 gue_port = 6080;
const volatile __u32 gue_src_v4 = 0; // outer GUE sources, network order
const volatile __u32 gue_src_v6[4] = {};
const volatile bool tcp_server_id_routing = false; // Katran's TPR: a server id in a TCP option
const volatile bool inline_decap = false;	   // decapsulate what is sent to decap_addrs

static __always_inline void lb_add(void *map, __u32 index, __u32 bytes)
{
	struct lb_counter *counter = bpf_map_lookup_elem(map, &index);

	if (counter) {
		counter->packets++;
		counter->bytes += bytes;
	}
}

static __always_inline int lb_drop(__u32 reason, __u32 frame_len)
{
	lb_add(&lb_stats, reason, frame_len);
	return XDP_DROP;
}

static __always_inline bool lb_is_vip_address(const struct lb_flow *flow)
{
	struct lb_addr key = {};

	__builtin_memcpy(key.addr, flow->dst, sizeof(key.addr));
	key.family = flow->family;
	return bpf_map_lookup_elem(&vip_addrs, &key) != NULL;
}

// Katran's packet hash over the source address and both ports, after the VIP's hash flags.
static __always_inline __u32 lb_flow_hash(const struct lb_flow *flow, __u32 flags)
{
	const __u32 zero[4] = {};
	const __u32 *src = flow->src;
	__be16 sport = flow->sport;
	__u32 head;

	if (flags & LB_F_HASH_DPORT_ONLY) {
		sport = flow->dport;
		src = zero;
	}
	if (flow->family == LB_FAMILY_V6)
		head = lb_jhash_16(src, LB_JHASH_SEED_V6);
	else
		head = src[0];
	return lb_jhash_2words(head, ((__u32)flow->dport << 16) | sport, LB_JHASH_SEED);
}

static __always_inline struct lb_addr *lb_real(__u32 real_id)
{
	struct lb_addr *real = bpf_map_lookup_elem(&reals, &real_id);

	return real && real->family ? real : NULL;
}

// Where the L4 header starts: the parser accepts no IPv4 options and no IPv6 extension headers.
static __always_inline __u32 lb_l4_offset(const struct lb_packet *pkt)
{
	return sizeof(struct ethhdr) +
	       (pkt->flow.family == LB_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
}

// The real a server id maps to (server_ids), 0 when none.
static __always_inline __u32 lb_server_id_real(__u32 server_id)
{
	__u32 *real_id = bpf_map_lookup_elem(&server_ids, &server_id);

	return real_id && lb_real(*real_id) ? *real_id : 0;
}

// Katran's UDP stable routing header: the payload starts with LB_STABLE_RT_TYPE and holds at least
// LB_STABLE_RT_LEN bytes; bytes 1-3 are the server id (big endian). 0: no header.
static __always_inline __u32 lb_stable_server_id(struct xdp_md *ctx, const struct lb_packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *head = data + lb_l4_offset(pkt) + sizeof(struct udphdr);

	if ((void *)(head + LB_STABLE_RT_LEN) > data_end || head[0] != LB_STABLE_RT_TYPE)
		return 0;
	return ((__u32)head[1] << 16) | ((__u32)head[2] << 8) | head[3];
}

// The real of the longest client prefix in src_routes_v4/v6 (NULL: none, or its real is gone).
static __always_inline __u32 *lb_src_route(const struct lb_flow *flow)
{
	__u32 *real_id;

	if (flow->family == LB_FAMILY_V4) {
		struct lb_lpm_v4 key = { .prefixlen = 32, .addr = flow->src[0] };

		real_id = bpf_map_lookup_elem(&src_routes_v4, &key);
	} else {
		struct lb_lpm_v6 key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, flow->src, sizeof(key.addr));
		real_id = bpf_map_lookup_elem(&src_routes_v6, &key);
	}
	return real_id && lb_real(*real_id) ? real_id : NULL;
}

// The server id in a QUIC packet's destination connection id (0: none), and which lb_stats outcome
// the packet counts as when it is not routed by it. Long header: flags, version (4 bytes), DCID length,
// DCID; Initial and 0-RTT carry the client's CID and are hashed. Short header: flags, DCID. The
// first 2 bits of the CID give its layout: v1 = 16 bits after them, v2 = bytes 1-3, v3 = bytes 1-4.
static __always_inline __u32 lb_quic_server_id(struct xdp_md *ctx, const struct lb_packet *pkt,
					       __u32 *outcome)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *quic = data + lb_l4_offset(pkt) + sizeof(struct udphdr);
	__u8 *cid;
	__u8 version;

	*outcome = LB_CNT_QUIC_NO_CID;
	if ((void *)(quic + 1) > data_end)
		return 0;
	if (quic[0] & LB_QUIC_LONG_HEADER) {
		if ((void *)(quic + 6 + LB_QUIC_MIN_CID_LEN) > data_end)
			return 0;
		if ((quic[0] & LB_QUIC_TYPE_MASK) < LB_QUIC_HANDSHAKE) {
			*outcome = LB_CNT_QUIC_INITIAL;
			return 0;
		}
		if (quic[5] < LB_QUIC_MIN_CID_LEN)
			return 0;
		cid = quic + 6;
	} else {
		if ((void *)(quic + 1 + LB_QUIC_MIN_CID_LEN) > data_end)
			return 0;
		cid = quic + 1;
	}
	version = cid[0] >> 6;
	lb_add(&lb_stats, LB_CNT_QUIC_CID_V0 + version, 0);
	switch (version) {
	case 1:
		return ((__u32)(cid[0] & 0x3f) << 10) | ((__u32)cid[1] << 2) | (cid[2] >> 6);
	case 2:
		return ((__u32)cid[1] << 16) | ((__u32)cid[2] << 8) | cid[3];
	case 3:
		return ((__u32)cid[1] << 24) | ((__u32)cid[2] << 16) | ((__u32)cid[3] << 8) | cid[4];
	}
	return 0;
}

// The server id of a TPR option among the TCP options (0: none). Its 4 bytes are read little-endian:
// Katran's writer stores the id in host order (x86) and its reader loads it the same way.
static __always_inline __u32 lb_tcp_server_id(struct xdp_md *ctx, const struct lb_packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + lb_l4_offset(pkt);
	__u32 len, off = 0;
	__u8 *opts;

	if ((void *)(tcp + 1) > data_end)
		return 0;
	len = tcp->doff * 4;
	if (len < sizeof(*tcp) + LB_TPR_OPT_LEN)
		return 0;
	len -= sizeof(*tcp);
	opts = (__u8 *)(tcp + 1);
	for (int i = 0; i < LB_TPR_MAX_OPTS; i++) {
		__u8 *opt = opts + (off & 0x3f); // options take at most 40 bytes
		__u8 kind, opt_len;

		if (off >= len || (void *)(opt + 2) > data_end)
			break;
		kind = opt[0];
		if (kind == LB_TCP_OPT_EOL)
			break;
		if (kind == LB_TCP_OPT_NOP) {
			off++;
			continue;
		}
		opt_len = opt[1];
		if (opt_len < 2 || off + opt_len > len)
			break;
		if (kind == LB_TPR_OPT_KIND) {
			if (opt_len != LB_TPR_OPT_LEN || (void *)(opt + LB_TPR_OPT_LEN) > data_end)
				break;
			return opt[2] | ((__u32)opt[3] << 8) | ((__u32)opt[4] << 16) | ((__u32)opt[5] << 24);
		}
		off += opt_len;
	}
	return 0;
}

// A packet routed by its server id (QUIC connection id, TPR) records its real in the connection
// table, as Katran does: a later packet of the flow without the id (a QUIC long header, a TCP segment
// without the option, an id whose mapping went away) stays on that real. UDP entries are stamped.
// Not for LB_F_LRU_BYPASS VIPs, and a RST creates no entry (it ends the flow).
static __always_inline void lb_record_routed(const struct lb_packet *pkt, const struct lb_vip_meta *meta,
					     __u32 real_id)
{
	bool is_udp = pkt->flow.proto == IPPROTO_UDP;
	struct lb_conn *conn;

	if (meta->flags & LB_F_LRU_BYPASS)
		return;
	conn = bpf_map_lookup_elem(&conn_table, &pkt->flow);
	if (conn) {
		if (conn->real_id != real_id) {
			conn->real_id = real_id;
			lb_add(&lb_stats, LB_CNT_SID_CONN_MOVED, 0);
		}
		if (is_udp)
			conn->atime_ns = bpf_ktime_get_coarse_ns();
	} else if (!(pkt->tcp_flags & LB_TCP_FLAG_RST)) {
		struct lb_conn entry = { .real_id = real_id,
					 .atime_ns = is_udp ? bpf_ktime_get_coarse_ns() : 0 };

		bpf_map_update_elem(&conn_table, &pkt->flow, &entry, BPF_ANY);
		lb_add(&lb_stats, LB_CNT_SID_CONN_NEW, 0);
	}
}

static __always_inline bool lb_is_down(__u32 vip_num, __u32 real_id)
{
	struct lb_down_key key = { .vip_num = vip_num, .real_id = real_id };

	return bpf_map_lookup_elem(&down_reals, &key) != NULL;
}

// Server-id routing first (VIP flags), then the connection table (not for SYNs), then the ring.
// Returns the real id, 0 when none.
static __always_inline __u32 lb_pick_real(struct xdp_md *ctx, const struct lb_packet *pkt,
					  const struct lb_vip_meta *meta)
{
	bool use_table = !(meta->flags & LB_F_LRU_BYPASS);
	bool is_udp = pkt->flow.proto == IPPROTO_UDP;
	struct lb_conn *conn;
	__u32 key, *slot, routed = 0;

	if (is_udp && !pkt->icmp_error && (meta->flags & LB_F_QUIC)) {
		__u32 outcome;
		__u32 server_id = lb_quic_server_id(ctx, pkt, &outcome);

		if (server_id) {
			__u32 real_id = lb_server_id_real(server_id);

			if (real_id) {
				outcome = LB_CNT_QUIC_CID_ROUTED;
				routed = real_id;
			} else {
				outcome = LB_CNT_QUIC_CID_UNKNOWN;
			}
		}
		lb_add(&lb_stats, outcome, 0);
	}

	if (!routed && is_udp && !pkt->icmp_error && (meta->flags & LB_F_UDP_STABLE_ROUTING)) {
		__u32 server_id = lb_stable_server_id(ctx, pkt);

		if (server_id) {
			__u32 real_id = lb_server_id_real(server_id);

			if (real_id) {
				lb_add(&lb_stats, LB_CNT_STABLE_ROUTED, 0);
				return real_id;
			}
			lb_add(&lb_stats, LB_CNT_STABLE_UNKNOWN, 0);
		} else {
			lb_add(&lb_stats, LB_CNT_STABLE_NO_ID, 0);
		}
	}

	if (tcp_server_id_routing && !is_udp && !pkt->icmp_error && !(pkt->tcp_flags & LB_TCP_FLAG_SYN)) {
		__u32 server_id = lb_tcp_server_id(ctx, pkt);

		if (server_id) {
			__u32 real_id = lb_server_id_real(server_id);

			if (real_id) {
				lb_add(&lb_stats, LB_CNT_TPR_ROUTED, 0);
				routed = real_id;
			} else {
				lb_add(&lb_stats, LB_CNT_TPR_UNKNOWN, 0);
			}
		} else {
			lb_add(&lb_stats, LB_CNT_TPR_NO_ID, 0);
		}
	}
	if (routed) {
		lb_record_routed(pkt, meta, routed);
		return routed;
	}

	if (use_table && !(pkt->tcp_flags & LB_TCP_FLAG_SYN)) {
		conn = bpf_map_lookup_elem(&conn_table, &pkt->flow);
		if (conn && lb_real(conn->real_id)) {
			__u64 now = is_udp ? bpf_ktime_get_coarse_ns() : 0;

			if (!is_udp || !udp_timeout_ns ||
			    now - conn->atime_ns + clock_res_ns <= udp_timeout_ns) {
				// a UDP flow of a migrating VIP leaves a real that is down (the ring has it no more)
				if (is_udp && (meta->flags & LB_F_UDP_FLOW_MIGRATION) &&
				    lb_is_down(meta->vip_num, conn->real_id)) {
					lb_add(&lb_stats, LB_CNT_UDP_MIGRATED, 0);
				} else {
					if (is_udp)
						conn->atime_ns = now;
					lb_add(&lb_stats, LB_CNT_CONN_HIT, 0);
					return conn->real_id;
				}
			}
		}
		lb_add(&lb_stats, LB_CNT_CONN_MISS, 0);
	}

	slot = NULL;
	if (meta->flags & LB_F_SRC_ROUTING) {
		slot = lb_src_route(&pkt->flow);
		lb_add(&lb_stats, slot ? LB_CNT_SRC_ROUTED : LB_CNT_SRC_UNROUTED, 0);
	}
	if (!slot) {
		key = meta->vip_num * ring_size + lb_flow_hash(&pkt->flow, meta->flags) % ring_size;
		slot = bpf_map_lookup_elem(&ch_rings, &key);
		if (!slot || !*slot || !lb_real(*slot))
			return 0;
		lb_add(&lb_stats, LB_CNT_RING, 0);
	}
	// RSTs end flows and ICMP errors are not flows: neither creates an entry.
	if (use_table && !(pkt->tcp_flags & LB_TCP_FLAG_RST) && !pkt->icmp_error) {
		struct lb_conn entry = { .real_id = *slot,
					 .atime_ns = is_udp ? bpf_ktime_get_coarse_ns() : 0 };

		bpf_map_update_elem(&conn_table, &pkt->flow, &entry, BPF_ANY);
	}
	return *slot;
}

// Katran's outer addresses: a per-flow source so the real's NIC spreads flows over its queues.
static __always_inline void lb_outer_for(const struct lb_packet *pkt, const struct lb_addr *real,
					 struct lb_outer *outer)
{
	// A = the client's IPv4 address or the last 4 bytes of its IPv6 one; P = sport (network order)
	const __u8 *a = (const __u8 *)&pkt->flow.src[pkt->flow.family == LB_FAMILY_V6 ? 3 : 0];
	const __u8 *p = (const __u8 *)&pkt->flow.sport;
	__u8 *src = (__u8 *)outer->src;

	outer->family = real->family;
	outer->tos = pkt->tos;
	outer->inner_len = pkt->ip_len;
	__builtin_memcpy(outer->dst, real->addr, sizeof(outer->dst));
	if (use_gue) {
		outer->proto = IPPROTO_UDP;
		outer->gue_dport = bpf_htons(gue_port);
		if (real->family == LB_FAMILY_V4) {
			outer->src[0] = gue_src_v4;
			((__u8 *)&outer->gue_sport)[0] = a[2] ^ p[1];
			((__u8 *)&outer->gue_sport)[1] = a[3] ^ p[0];
		} else {
			outer->src[0] = gue_src_v6[0];
			outer->src[1] = gue_src_v6[1];
			outer->src[2] = gue_src_v6[2];
			outer->src[3] = gue_src_v6[3];
			// Katran's v6 GUE mix: bytes 12-13 of an IPv6 client, bytes 2-3 of an IPv4 one
			if (pkt->flow.family == LB_FAMILY_V6) {
				((__u8 *)&outer->gue_sport)[0] = a[0] ^ p[0];
				((__u8 *)&outer->gue_sport)[1] = a[1] ^ p[1];
			} else {
				((__u8 *)&outer->gue_sport)[0] = a[2] ^ p[0];
				((__u8 *)&outer->gue_sport)[1] = a[3] ^ p[1];
			}
		}
		return;
	}
	outer->proto = pkt->flow.family == LB_FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	if (real->family == LB_FAMILY_V4) {
		src[0] = 172;
		src[1] = 16;
		src[2] = a[2] ^ p[1];
		src[3] = a[3] ^ p[0];
	} else {
		src[0] = 0x01; // 100::/64, RFC 6666 discard prefix
		src[12] = a[0] ^ p[0];
		src[13] = a[1] ^ p[1];
		src[14] = a[2];
		src[15] = a[3];
	}
}

static __always_inline bool lb_same_real(const struct lb_addr *a, const struct lb_addr *b)
{
	return !((a->addr[0] ^ b->addr[0]) | (a->addr[1] ^ b->addr[1]) | (a->addr[2] ^ b->addr[2]) |
		 (a->addr[3] ^ b->addr[3]) | (a->family ^ b->family));
}

// The next hop towards the real: the cached FIB answer while it is fresh and was made for this real
// address and ingress interface, else a bpf_fib_lookup (cached when it succeeds). NULL: no route.
static __always_inline struct lb_nexthop *
lb_nexthop_for(struct xdp_md *ctx, __u32 real_id, const struct lb_addr *real, const struct lb_outer *outer)
{
	struct lb_nexthop *hop = bpf_map_lookup_elem(&nexthops, &real_id);
	struct bpf_fib_lookup fib = {};
	__u32 ifindex = ctx->ingress_ifindex;
	__u64 now;

	if (!hop)
		return NULL;
	now = bpf_ktime_get_coarse_ns();
	if (hop->stamp_ns && now - hop->stamp_ns < nexthop_ttl_ns && hop->in_ifindex == ifindex &&
	    lb_same_real(&hop->real, real))
		return hop;

	fib.ifindex = ifindex;
	if (outer->family == LB_FAMILY_V4) {
		fib.family = AF_INET;
		fib.tos = outer->tos;
		fib.ipv4_src = outer->src[0];
		fib.ipv4_dst = outer->dst[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, outer->src, 16);
		__builtin_memcpy(fib.ipv6_dst, outer->dst, 16);
	}
	lb_add(&lb_stats, LB_CNT_FIB_LOOKUP, 0);
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		hop->stamp_ns = 0;
		return NULL;
	}
	hop->real = *real;
	hop->in_ifindex = ifindex;
	hop->stamp_ns = now ? now : 1;
	hop->out_ifindex = fib.ifindex;
	__builtin_memcpy(hop->dmac, fib.dmac, ETH_ALEN);
	__builtin_memcpy(hop->smac, fib.smac, ETH_ALEN);
	return hop;
}

// A decapsulated packet the LB sends on to a real crosses it as a router: its TTL / hop limit goes
// down by one and the IPv4 header checksum follows (RFC 1624). -1: it would reach 0 (dropped, as
// Katran does; no ICMP time exceeded is sent). check_only: only whether it would. A decapsulated
// packet passed to the local stack keeps its TTL: the kernel decrements it if it forwards the packet.
static __always_inline int lb_hop(struct xdp_md *ctx, __u8 family, bool check_only)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (family == LB_FAMILY_V4) {
		struct iphdr *iph = data + sizeof(struct ethhdr);
		__u16 old_word, *word = (__u16 *)&iph->ttl; // TTL and protocol: one checksummed word

		if ((void *)(iph + 1) > data_end || iph->ttl <= 1)
			return -1;
		if (check_only)
			return 0;
		old_word = *word;
		iph->ttl--;
		lb_csum_replace16(&iph->check, old_word, *word);
	} else {
		struct ipv6hdr *ip6h = data + sizeof(struct ethhdr);

		if ((void *)(ip6h + 1) > data_end || ip6h->hop_limit <= 1)
			return -1;
		if (!check_only)
			ip6h->hop_limit--;
	}
	return 0;
}

// Encapsulates towards the real and picks the next hop.
static __always_inline int lb_send(struct xdp_md *ctx, const struct lb_packet *pkt, __u32 real_id,
				   const struct lb_addr *real, __u32 frame_len)
{
	struct lb_outer outer = {};
	struct lb_nexthop *hop = NULL;
	__u8 dmac[ETH_ALEN], *smac = NULL;
	int verdict = XDP_TX;

	if (real->family == LB_FAMILY_V4 && pkt->flow.family == LB_FAMILY_V6)
		return lb_drop(LB_CNT_DROP_ENCAP, frame_len); // no 6-in-4: the config refuses it
	lb_outer_for(pkt, real, &outer);

	if (use_fib)
		hop = lb_nexthop_for(ctx, real_id, real, &outer);
	if (hop) {
		__u32 out_ifindex = hop->out_ifindex;

		lb_add(&lb_stats, LB_CNT_FIB_OK, 0);
		__builtin_memcpy(dmac, hop->dmac, ETH_ALEN);
		smac = hop->smac;
		if (out_ifindex != ctx->ingress_ifindex)
			verdict = bpf_redirect(out_ifindex, 0);
	} else {
#pragma unroll
		for (int i = 0; i < ETH_ALEN; i++)
			dmac[i] = gateway_mac[i];
		if (!(dmac[0] | dmac[1] | dmac[2] | dmac[3] | dmac[4] | dmac[5]))
			return lb_drop(LB_CNT_DROP_NO_ROUTE, frame_len);
		lb_add(&lb_stats, LB_CNT_FIB_FALLBACK, 0);
	}
	if (inline_decap && pkt->decapsulated && lb_hop(ctx, pkt->flow.family, false))
		return lb_drop(LB_CNT_DROP_TTL, frame_len);
	if (lb_push_outer(ctx, &outer, dmac, smac))
		return lb_drop(LB_CNT_DROP_ENCAP, frame_len);
	return verdict;
}

static __always_inline int lb_forward(struct xdp_md *ctx, struct lb_packet *pkt, __u32 frame_len)
{
	struct lb_vip_key vip = {};
	struct lb_vip_meta *meta;
	struct lb_addr *real;
	__u32 real_id;

	__builtin_memcpy(vip.addr, pkt->flow.dst, sizeof(vip.addr));
	vip.port = pkt->flow.dport;
	vip.proto = pkt->flow.proto;
	vip.family = pkt->flow.family;
	meta = bpf_map_lookup_elem(&vip_map, &vip);
	if (!meta) {
		__u32 zero = 0, *portless = bpf_map_lookup_elem(&portless_vips, &zero);

		if (!portless || !*portless)
			return XDP_PASS;
		vip.port = 0;
		meta = bpf_map_lookup_elem(&vip_map, &vip);
		if (!meta)
			return XDP_PASS;
		// a port-less VIP hashes without the destination port unless it hashes on nothing else
		if (!(meta->flags & LB_F_HASH_DPORT_ONLY))
			pkt->flow.dport = 0;
	}
	lb_add(&vip_stats, meta->vip_num, frame_len);
	if (frame_len > max_frame_size)
		return lb_drop(LB_CNT_DROP_TOO_BIG, frame_len);
	// checked before the connection table can take the flow; decremented once it is sent on
	if (inline_decap && pkt->decapsulated && lb_hop(ctx, pkt->flow.family, true))
		return lb_drop(LB_CNT_DROP_TTL, frame_len);
	if (meta->flags & LB_F_HASH_NO_SRC_PORT)
		pkt->flow.sport = 0;

	real_id = lb_pick_real(ctx, pkt, meta);
	real = lb_real(real_id);
	if (!real)
		return lb_drop(LB_CNT_DROP_NO_REAL, frame_len);
	lb_add(&real_stats, real_id, frame_len);
	if (pkt->icmp_error)
		lb_add(&lb_stats, LB_CNT_ICMP_STEERED, frame_len);
	return lb_send(ctx, pkt, real_id, real, frame_len);
}

// Answers an ICMP echo request in place: swap addresses, echo reply type, TTL 64.
static __always_inline int lb_echo_reply(struct xdp_md *ctx, __u8 family, __u32 frame_len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 mac[ETH_ALEN];
	__u16 old_word, *word;

	if (family == LB_FAMILY_V4) {
		struct iphdr *iph = (void *)(eth + 1);
		struct lb_icmphdr *icmp = (void *)(iph + 1);
		__be32 addr;

		if ((void *)(icmp + 1) > data_end)
			return XDP_PASS;
		addr = iph->saddr;
		iph->saddr = iph->daddr;
		iph->daddr = addr;
		iph->ttl = LB_OUTER_TTL;
		iph->check = 0;
		iph->check = lb_ipv4_csum(iph);
		word = (__u16 *)icmp;
		old_word = *word;
		icmp->type = LB_ICMP_ECHO_REPLY;
		lb_csum_replace16(&icmp->checksum, old_word, *word);
	} else {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		struct lb_icmphdr *icmp = (void *)(ip6h + 1);
		struct in6_addr addr;

		if ((void *)(icmp + 1) > data_end)
			return XDP_PASS;
		addr = ip6h->saddr;
		ip6h->saddr = ip6h->daddr;
		ip6h->daddr = addr;
		ip6h->hop_limit = LB_OUTER_TTL;
		word = (__u16 *)icmp;
		old_word = *word;
		icmp->type = LB_ICMPV6_ECHO_REPLY;
		lb_csum_replace16(&icmp->checksum, old_word, *word);
	}
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	lb_add(&lb_stats, LB_CNT_ICMP_ECHO, frame_len);
	return XDP_TX;
}

// Inline decapsulation: an IPIP / IP6IP6 / 4in6 / 6in4 packet, or GUE (UDP to gue_port, the inner IP
// header right after the UDP one), whose outer destination is in decap_addrs loses its outer header;
// the inner packet is then load balanced (or passed) like any other. 1: decapsulated, 0: not for us,
// -1: the head could not move.
static __always_inline int lb_inline_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct lb_addr dst = {};
	__u32 header_len, counter = LB_CNT_DECAP_IPIP;
	__u8 proto, *next;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end || *(__u8 *)iph != 0x45 ||
		    (iph->frag_off & bpf_htons(0x3fff)))
			return 0;
		proto = iph->protocol;
		dst.addr[0] = iph->daddr;
		dst.family = LB_FAMILY_V4;
		header_len = sizeof(*iph);
		next = (__u8 *)(iph + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end)
			return 0;
		proto = ip6h->nexthdr;
		lb_copy_v6(dst.addr, &ip6h->daddr);
		dst.family = LB_FAMILY_V6;
		header_len = sizeof(*ip6h);
		next = (__u8 *)(ip6h + 1);
	} else {
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)next;

		if ((void *)(udp + 1) + 1 > data_end || udp->dest != bpf_htons(gue_port))
			return 0;
		next = (__u8 *)(udp + 1);
		header_len += sizeof(*udp);
		counter = LB_CNT_DECAP_GUE;
	} else if (proto != IPPROTO_IPIP && proto != IPPROTO_IPV6) {
		return 0;
	}
	if ((void *)(next + 1) > data_end || !bpf_map_lookup_elem(&decap_addrs, &dst))
		return 0;
	switch (next[0] >> 4) { // the inner IP version decides the new EtherType
	case 4:
		proto = IPPROTO_IPIP;
		break;
	case 6:
		proto = IPPROTO_IPV6;
		break;
	default:
		return 0;
	}
	if (lb_pop_outer(ctx, header_len,
			 proto == IPPROTO_IPIP ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6)))
		return -1;
	lb_add(&lb_stats, counter, 0);
	return 1;
}

static __always_inline int lb_process(struct xdp_md *ctx, __u32 frame_len)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct lb_packet pkt = {};
	int parsed;

	if (inline_decap) {
		int decapsulated = lb_inline_decap(ctx);

		if (decapsulated < 0)
			return lb_drop(LB_CNT_DROP_ENCAP, frame_len);
		if (decapsulated) {
			frame_len = ctx->data_end - ctx->data;
			pkt.decapsulated = true;
		}
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		parsed = lb_parse_v4(data, data_end, frame_len, &pkt);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		parsed = lb_parse_v6(data, data_end, frame_len, &pkt);
	else
		return XDP_PASS;

	if (parsed == LB_PARSE_FLOW)
		return lb_forward(ctx, &pkt, frame_len);
	// Everything else concerns the load balancer only when addressed to a VIP address.
	if (parsed == LB_PARSE_NOT_OURS || !lb_is_vip_address(&pkt.flow))
		return XDP_PASS;
	switch (parsed) {
	case LB_PARSE_ECHO:
		return lb_echo_reply(ctx, pkt.flow.family, frame_len);
	case LB_PARSE_IP_OPTIONS:
		return lb_drop(LB_CNT_DROP_IP_OPTIONS, frame_len);
	case LB_PARSE_FRAGMENT:
		return lb_drop(LB_CNT_DROP_FRAGMENT, frame_len);
	default:
		return lb_drop(LB_CNT_DROP_MALFORMED, frame_len);
	}
}

SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	__u32 frame_len = ctx->data_end - ctx->data;
	int verdict = lb_process(ctx, frame_len);

	lb_add(&lb_stats, LB_CNT_RX, frame_len);
	switch (verdict) {
	case XDP_PASS:
		lb_add(&lb_stats, LB_CNT_PASS, frame_len);
		break;
	case XDP_DROP:
		lb_add(&lb_stats, LB_CNT_DROP, frame_len);
		break;
	case XDP_TX:
		lb_add(&lb_stats, LB_CNT_TX, frame_len);
		break;
	case XDP_REDIRECT:
		lb_add(&lb_stats, LB_CNT_REDIRECT, frame_len);
		break;
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
