// SYN cookies in XDP for rules of action syncookie (ddos.bpf.c, ddos_finish). A SYN is answered
// in place with a SYN-ACK whose sequence number is a kernel SYN cookie (bpf_tcp_raw_gen_syncookie_*,
// the kernel's own secret and MSS table) and XDP_TX; the client's ACK is checked with
// bpf_tcp_raw_check_syncookie_*: a valid one passes to the stack, where netfilter's SYNPROXY (an
// nftables table bpfnet installs in the stage's namespace, ddos/synproxy.py) completes the
// handshake with the real server; an invalid one is dropped. Packets of flows conntrack knows
// (bpf_xdp_ct_lookup) pass: the flows SYNPROXY handed over, and connections the host opened.
//
// The SYN-ACK carries what netfilter's SYNPROXY sends and later decodes from the client's ACK:
// window 0 (SYNPROXY opens it once the server answered), MSS, and, when the client sent
// timestamps, a timestamp whose low bits hold the client's window scale (0xf: none), SACK
// permitted (bit 4) and ECN (bit 5), and our window scale and SACK permitted as the client asked.
// Without timestamps only the MSS can be kept (the cookie holds the client's MSS, rounded down to
// the kernel's table).
#ifndef BPFNET_DDOS_SYNCOOKIE_H
#define BPFNET_DDOS_SYNCOOKIE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ddos/structs.h"
#include "ddos/maps.h"

// The kfuncs of netfilter's conntrack for XDP (net/netfilter/nf_conntrack_bpf.c). libbpf matches
// their prototypes with the kernel's by kind: a struct (of any members) for struct nf_conn.
struct nf_conn___ddos {
	int opaque;
};
struct bpf_ct_opts___ddos {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};
extern struct nf_conn___ddos *bpf_xdp_ct_lookup(struct xdp_md *ctx, struct bpf_sock_tuple *tuple,
						__u32 tuple__sz, struct bpf_ct_opts___ddos *opts,
						__u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn___ddos *ct) __ksym;

#define DDOS_TCP_FIN 0x01
#define DDOS_TCP_SYN 0x02
#define DDOS_TCP_RST 0x04
#define DDOS_TCP_ACK 0x10
#define DDOS_TCP_ECE 0x40
#define DDOS_TCP_CWR 0x80
#define DDOS_TCP_MAX_HDR 60
#define DDOS_TCP_HDR_BUF 64    // a power of two: offsets into it are masked
#define DDOS_TCP_SYNACK_MAX 40 // 20 + MSS 4 + SACK/TS 12 + WS 4
#define DDOS_ETH_P_8021Q 0x8100
#define DDOS_ETH_P_8021AD 0x88A8

// A parsed TCP packet: where its headers start, and copies of them on the stack (the cookie
// helpers and the rewrite read and write those, so no packet pointer needs a variable bound).
struct ddos_tcp_packet {
	__u32 l3;     // offset of the IP header
	__u32 l4;     // offset of the TCP header
	__u32 th_len; // doff * 4
	__u8 family;  // 4 or 6
	union {
		struct iphdr v4;
		struct ipv6hdr v6;
	} ip;
	__u8 th[DDOS_TCP_HDR_BUF];
	__u8 synack[DDOS_TCP_SYNACK_MAX]; // the answer's TCP header (ddos_prepare_synack)
	__u32 synack_len;
};

// What the SYN-ACK answers: the client's options.
struct ddos_syn_options {
	__u32 tsval;
	__u8 wscale; // 0xf: none
	bool ts;
	bool sack;
};

// Fills p from the frame: Ethernet, up to two VLAN tags, IPv4 without options and not a fragment,
// or IPv6 with TCP as its next header. 1: parsed; 0: not TCP; -1: TCP this code cannot answer
// (IP options, fragments, extension headers, a header past the end).
static __always_inline int ddos_parse_tcp(struct xdp_md *ctx, struct ddos_tcp_packet *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth), len;
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return 0;
	proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(DDOS_ETH_P_8021Q) && proto != bpf_htons(DDOS_ETH_P_8021AD))
			break;
		if (data + off + 4 > data_end)
			return 0;
		proto = *(__u16 *)(data + off + 2);
		off += 4;
	}
	p->l3 = off;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (bpf_xdp_load_bytes(ctx, off, &p->ip.v4, sizeof(p->ip.v4)))
			return 0;
		if (p->ip.v4.protocol != IPPROTO_TCP)
			return 0;
		if (p->ip.v4.ihl != 5 || (p->ip.v4.frag_off & bpf_htons(0x3fff)))
			return -1;
		p->family = 4;
		off += sizeof(struct iphdr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_xdp_load_bytes(ctx, off, &p->ip.v6, sizeof(p->ip.v6)))
			return 0;
		if (p->ip.v6.nexthdr != IPPROTO_TCP)
			return p->ip.v6.nexthdr == 44 ? -1 : 0; // a fragment (of TCP, for all we know)
		p->family = 6;
		off += sizeof(struct ipv6hdr);
	} else {
		return 0;
	}
	p->l4 = off;
	__builtin_memset(p->th, 0, sizeof(p->th));
	if (bpf_xdp_load_bytes(ctx, off, p->th, sizeof(struct tcphdr)))
		return -1;
	len = ((struct tcphdr *)p->th)->doff * 4;
	if (len < sizeof(struct tcphdr) || len > DDOS_TCP_MAX_HDR)
		return -1;
	p->th_len = len;
	if (len > sizeof(struct tcphdr) && bpf_xdp_load_bytes(ctx, off, p->th, len))
		return -1;
	return 1;
}

// Whether conntrack in the interface's namespace knows the packet's flow.
static __always_inline bool ddos_conntrack_knows(struct xdp_md *ctx, const struct ddos_tcp_packet *p)
{
	struct bpf_ct_opts___ddos opts = { .netns_id = -1, .l4proto = IPPROTO_TCP };
	const struct tcphdr *th = (const void *)p->th;
	struct bpf_sock_tuple tuple = {};
	struct nf_conn___ddos *ct;
	__u32 size;

	if (p->family == 4) {
		tuple.ipv4.saddr = p->ip.v4.saddr;
		tuple.ipv4.daddr = p->ip.v4.daddr;
		tuple.ipv4.sport = th->source;
		tuple.ipv4.dport = th->dest;
		size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, &p->ip.v6.saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, &p->ip.v6.daddr, 16);
		tuple.ipv6.sport = th->source;
		tuple.ipv6.dport = th->dest;
		size = sizeof(tuple.ipv6);
	}
	ct = bpf_xdp_ct_lookup(ctx, &tuple, size, &opts, sizeof(opts));
	if (!ct)
		return false;
	bpf_ct_release(ct);
	return true;
}

struct ddos_option_walk {
	const __u8 *th; // DDOS_TCP_HDR_BUF bytes
	__u32 off, end;
	struct ddos_syn_options *o;
};

// One TCP option of the walk (a bpf_loop callback, so the verifier checks it once); 1 ends the walk.
static long ddos_read_option(__u32 i, void *ctx)
{
	struct ddos_option_walk *w = ctx;
	__u32 off = w->off;
	__u8 kind, len;

	if (off >= w->end || off >= DDOS_TCP_MAX_HDR - 1)
		return 1;
	kind = w->th[off & (DDOS_TCP_HDR_BUF - 1)];
	if (kind == 0)
		return 1;
	if (kind == 1) {
		w->off = off + 1;
		return 0;
	}
	len = w->th[(off + 1) & (DDOS_TCP_HDR_BUF - 1)];
	if (len < 2 || off + len > w->end)
		return 1;
	if (kind == 3 && len == 3) {
		__u8 ws = w->th[(off + 2) & (DDOS_TCP_HDR_BUF - 1)];

		w->o->wscale = ws > 14 ? 14 : ws;
	} else if (kind == 4 && len == 2) {
		w->o->sack = true;
	} else if (kind == 8 && len == 10) {
		__u32 at = off + 2;

		w->o->tsval = (__u32)w->th[at & (DDOS_TCP_HDR_BUF - 1)] << 24 |
			      (__u32)w->th[(at + 1) & (DDOS_TCP_HDR_BUF - 1)] << 16 |
			      (__u32)w->th[(at + 2) & (DDOS_TCP_HDR_BUF - 1)] << 8 |
			      w->th[(at + 3) & (DDOS_TCP_HDR_BUF - 1)];
		w->o->ts = true;
	}
	w->off = off + len;
	return 0;
}

static __always_inline void ddos_read_syn_options(const struct ddos_tcp_packet *p, struct ddos_syn_options *o)
{
	struct ddos_option_walk w = { .th = p->th, .off = sizeof(struct tcphdr), .end = p->th_len, .o = o };

	o->tsval = 0;
	o->wscale = 0xf;
	o->ts = false;
	o->sack = false;
	bpf_loop(DDOS_TCP_MAX_HDR - sizeof(struct tcphdr), ddos_read_option, &w, 0);
}

static __always_inline __u16 ddos_csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

// Builds the SYN-ACK options into opt (from its byte 0); returns their length (a multiple of 4).
static __always_inline __u32 ddos_synack_options(__u8 *opt, const struct ddos_syn_options *o, bool ecn,
						 __u16 mss, __u8 wscale, __u64 now_ns)
{
	__u32 n = 0, *w = (__u32 *)opt;

	w[n++] = bpf_htonl(2 << 24 | 4 << 16 | mss);
	if (o->ts) {
		__u32 tsval = (__u32)(now_ns / 1000000) & ~0x3fu;

		tsval |= o->wscale | (o->sack ? 1 << 4 : 0) | (ecn ? 1 << 5 : 0);
		w[n++] = bpf_htonl(o->sack ? 4 << 24 | 2 << 16 | 8 << 8 | 10
					   : 1 << 24 | 1 << 16 | 8 << 8 | 10);
		w[n++] = bpf_htonl(tsval);
		w[n++] = bpf_htonl(o->tsval);
		if (o->wscale != 0xf)
			w[n++] = bpf_htonl(1 << 24 | 3 << 16 | 3 << 8 | wscale);
	}
	return n * 4;
}

// Makes the answer to the SYN in p, arrived on ifindex: the cookie, p's IP header turned into the
// SYN-ACK's and the SYN-ACK's TCP header in p->synack, checksums included; 0 on success. The frame
// is untouched.
static __always_inline int ddos_prepare_synack(struct ddos_tcp_packet *p, __u32 ifindex)
{
	const struct ddos_synack_params *params = bpf_map_lookup_elem(&ddos_synack, &ifindex);
	__u16 mss = p->family == 4 ? DDOS_SYNCOOKIE_MSS4 : DDOS_SYNCOOKIE_MSS6;
	__u8 wscale = DDOS_SYNCOOKIE_WSCALE;
	const struct tcphdr *syn = (const void *)p->th;
	struct tcphdr *th = (void *)p->synack;
	struct ddos_syn_options o;
	__u32 th_len = p->th_len, len;
	bool ecn;
	__u64 sum;
	__s64 cookie;

	asm volatile("" : "+r"(th_len)); // bound the register the helper gets
	if (th_len < sizeof(struct tcphdr) || th_len > DDOS_TCP_MAX_HDR)
		return -1;
	if (p->family == 4)
		cookie = bpf_tcp_raw_gen_syncookie_ipv4(&p->ip.v4, (void *)p->th, th_len);
	else
		cookie = bpf_tcp_raw_gen_syncookie_ipv6(&p->ip.v6, (void *)p->th, th_len);
	if (cookie < 0)
		return -1;
	if (params) {
		mss = p->family == 4 ? params->mss4 : params->mss6;
		wscale = params->wscale;
	}
	ddos_read_syn_options(p, &o);
	ecn = syn->ece && syn->cwr && o.ts; // without a timestamp, nothing carries ECN to SYNPROXY
	__builtin_memset(p->synack, 0, sizeof(p->synack));
	len = sizeof(*th) +
	      ddos_synack_options(p->synack + sizeof(*th), &o, ecn, mss, wscale, bpf_ktime_get_ns());
	th->source = syn->dest;
	th->dest = syn->source;
	th->seq = bpf_htonl((__u32)cookie);
	th->ack_seq = bpf_htonl(bpf_ntohl(syn->seq) + 1);
	th->doff = len / 4;
	th->syn = 1;
	th->ack = 1;
	th->ece = ecn;
	p->synack_len = len;

	if (p->family == 4) {
		struct iphdr *ip = &p->ip.v4;
		__be32 addr = ip->saddr;
		struct {
			__be32 saddr, daddr;
			__u8 zero, proto;
			__be16 len;
		} pseudo;

		ip->saddr = ip->daddr;
		ip->daddr = addr;
		ip->tos = 0;
		ip->tot_len = bpf_htons(sizeof(*ip) + len);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000); // DF
		ip->ttl = DDOS_SYNCOOKIE_TTL;
		ip->check = 0;
		ip->check = ddos_csum_fold(bpf_csum_diff(0, 0, (void *)ip, sizeof(*ip), 0));
		pseudo.saddr = ip->saddr;
		pseudo.daddr = ip->daddr;
		pseudo.zero = 0;
		pseudo.proto = IPPROTO_TCP;
		pseudo.len = bpf_htons(len);
		sum = bpf_csum_diff(0, 0, (void *)&pseudo, sizeof(pseudo), 0);
	} else {
		struct ipv6hdr *ip6 = &p->ip.v6;
		struct in6_addr addr = ip6->saddr;
		struct {
			struct in6_addr saddr, daddr;
			__be32 len;
			__u8 zero[3], next;
		} pseudo;

		ip6->saddr = ip6->daddr;
		ip6->daddr = addr;
		ip6->priority = 0;
		ip6->flow_lbl[0] = 0;
		ip6->flow_lbl[1] = 0;
		ip6->flow_lbl[2] = 0;
		ip6->payload_len = bpf_htons(len);
		ip6->hop_limit = DDOS_SYNCOOKIE_TTL;
		pseudo.saddr = ip6->saddr;
		pseudo.daddr = ip6->daddr;
		pseudo.len = bpf_htonl(len);
		pseudo.zero[0] = pseudo.zero[1] = pseudo.zero[2] = 0;
		pseudo.next = IPPROTO_TCP;
		sum = bpf_csum_diff(0, 0, (void *)&pseudo, sizeof(pseudo), 0);
	}
	// the bytes past len are zero and add nothing
	th->check = ddos_csum_fold(bpf_csum_diff(0, 0, (void *)p->synack, sizeof(p->synack), sum));
	return 0;
}

// Turns the frame into the SYN-ACK ddos_prepare_synack made: MACs swapped, VLAN tags kept, the
// headers written, the frame cut (or grown) to its end; 0 on success.
static __always_inline int ddos_send_synack(struct xdp_md *ctx, struct ddos_tcp_packet *p)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];
	__u32 len = p->synack_len;

	if (bpf_xdp_adjust_tail(ctx, (int)(p->l4 + len) - (int)bpf_xdp_get_buff_len(ctx)))
		return -1;
	if (bpf_xdp_load_bytes(ctx, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	if (bpf_xdp_store_bytes(ctx, 0, swapped, sizeof(swapped)))
		return -1;
	if (p->family == 4 ? bpf_xdp_store_bytes(ctx, p->l3, &p->ip.v4, sizeof(p->ip.v4))
			   : bpf_xdp_store_bytes(ctx, p->l3, &p->ip.v6, sizeof(p->ip.v6)))
		return -1;
	asm volatile("" : "+r"(len));
	if (len < sizeof(struct tcphdr) || len > DDOS_TCP_SYNACK_MAX)
		return -1;
	return bpf_xdp_store_bytes(ctx, p->l4, p->synack, len) ? -1 : 0;
}

// The outcome of a packet of a syncookie rule (a ddos_syncookie_id) and its verdict in *verdict. For
// XDP_TX the answer is ready in p: ddos_send_synack writes it (after sampling saw the SYN).
static __always_inline __u32 ddos_syncookie(struct xdp_md *ctx, struct ddos_tcp_packet *p, int *verdict)
{
	const struct tcphdr *th = (const void *)p->th;
	__u8 flags;
	int parsed = ddos_parse_tcp(ctx, p);

	*verdict = XDP_DROP;
	if (parsed == 0) {
		*verdict = XDP_PASS;
		return DDOS_SYNCOOKIE_NOT_TCP;
	}
	if (parsed < 0)
		return DDOS_SYNCOOKIE_INVALID;
	flags = p->th[13];
	if ((flags & (DDOS_TCP_SYN | DDOS_TCP_ACK | DDOS_TCP_RST | DDOS_TCP_FIN)) == DDOS_TCP_SYN) {
		if (ddos_prepare_synack(p, ctx->ingress_ifindex))
			return DDOS_SYNCOOKIE_INVALID;
		*verdict = XDP_TX;
		return DDOS_SYNCOOKIE_SENT;
	}
	if (ddos_conntrack_knows(ctx, p)) {
		*verdict = XDP_PASS;
		return DDOS_SYNCOOKIE_TRACKED;
	}
	if ((flags & (DDOS_TCP_SYN | DDOS_TCP_ACK | DDOS_TCP_RST)) != DDOS_TCP_ACK)
		return DDOS_SYNCOOKIE_INVALID;
	if (p->family == 4 ? bpf_tcp_raw_check_syncookie_ipv4(&p->ip.v4, (struct tcphdr *)th)
			   : bpf_tcp_raw_check_syncookie_ipv6(&p->ip.v6, (struct tcphdr *)th))
		return DDOS_SYNCOOKIE_INVALID;
	*verdict = XDP_PASS;
	return DDOS_SYNCOOKIE_VALID;
}

#endif
