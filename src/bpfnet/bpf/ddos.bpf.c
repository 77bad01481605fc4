// SPDX-License-Identifier: GPL-2.0
// DDoS stage (L4Drop-class): packets enter the head of the rule set in force, a program generated
// for that set by src/bpfnet/ddos/ruleset.py (attached, or in the chain's slot), which matches,
// counts and decides the common case itself (drop and pass rules, no match). Limit rules, samples
// and captures go on to xdp_ddos_verdict with the match word in ddos_match: it counts,
// rate-limits, samples, captures and returns the verdict; passing packets go on to the next stage
// of the XDP chain (common/xdp_chain.h), or XDP_PASS when the stage is attached alone. Structs in
// ddos/structs.h.
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ddos/structs.h"
#include "common/xdp_chain.h"
#include "ddos/maps.h"
#include "ddos/syncookie.h"

#define NSEC_PER_SEC 1000000000ULL
#define MAX_REFILL_NS (10 * NSEC_PER_SEC) // caps elapsed * rate below 2^64 for rates <= 1e8 pps
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

static __always_inline void ddos_count_total(__u32 id, __u64 bytes)
{
	struct ddos_counter *c = bpf_map_lookup_elem(&ddos_totals, &id);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

// Takes one packet's worth of tokens; false when the bucket is empty. A bucket never used starts full.
static __always_inline bool ddos_bucket_take(struct ddos_bucket *b, const struct ddos_limit *limit, __u64 now)
{
	__u64 size = limit->burst * NSEC_PER_SEC;
	__u64 tokens = size;

	if (b->last_ns) {
		__u64 elapsed = now > b->last_ns ? now - b->last_ns : 0;

		if (elapsed > MAX_REFILL_NS)
			elapsed = MAX_REFILL_NS;
		tokens = b->tokens + elapsed * limit->rate_pps;
		if (tokens > size)
			tokens = size;
	}
	b->last_ns = now;
	if (tokens < NSEC_PER_SEC) {
		b->tokens = tokens;
		return false;
	}
	b->tokens = tokens - NSEC_PER_SEC;
	return true;
}

static __always_inline bool ddos_rule_bucket_take(__u32 rule, const struct ddos_limit *limit, __u64 now)
{
	struct ddos_rule_bucket *rb = bpf_map_lookup_elem(&ddos_buckets, &rule);
	bool ok;

	if (!rb)
		return false;
	bpf_spin_lock(&rb->lock);
	ok = ddos_bucket_take(&rb->bucket, limit, now);
	bpf_spin_unlock(&rb->lock);
	return ok;
}

// The source address of an Ethernet frame (after up to two VLAN tags) as a bucket key.
static __always_inline void ddos_fill_source_key(struct xdp_md *ctx, __u32 rule, struct ddos_source_key *key)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__u16 proto;

	__builtin_memset(key, 0, sizeof(*key));
	key->rule = rule;
	if ((void *)(eth + 1) > data_end)
		return;
	proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		if (data + off + 4 > data_end)
			return;
		proto = *(__u16 *)(data + off + 2);
		off += 4;
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > data_end)
			return;
		key->family = 4;
		__builtin_memcpy(key->addr, &ip->saddr, 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > data_end)
			return;
		key->family = 6;
		__builtin_memcpy(key->addr, &ip6->saddr, 16);
	}
}

static __always_inline bool ddos_source_bucket_take(struct xdp_md *ctx, __u32 rule,
						    const struct ddos_limit *limit, __u64 now)
{
	struct ddos_source_key key;
	struct ddos_bucket *b;

	ddos_fill_source_key(ctx, rule, &key);
	b = bpf_map_lookup_elem(&ddos_src_bkts, &key);
	if (!b) {
		struct ddos_bucket fresh = {};
		bool ok = ddos_bucket_take(&fresh, limit, now);

		bpf_map_update_elem(&ddos_src_bkts, &key, &fresh, BPF_NOEXIST);
		return ok;
	}
	return ddos_bucket_take(b, limit, now);
}

// Copies the first min(len, max) packet bytes to buf; returns how many (0 when nothing could be read).
static __always_inline __u32 ddos_copy_packet(struct xdp_md *ctx, void *buf, __u32 len, __u32 max)
{
	__u32 cap = len < max ? len : max;

	asm volatile("" : "+r"(cap)); // keep the bound check below on the register the helper gets
	if (cap < 1 || cap > max || bpf_xdp_load_bytes(ctx, 0, buf, cap))
		return 0;
	return cap;
}

static __always_inline void ddos_fill_record(struct ddos_record *r, struct xdp_md *ctx, __u32 word,
					     int verdict, __u64 now, __u32 len, __u32 cap)
{
	r->ts_ns = now;
	r->rule = DDOS_WORD_RULE(word);
	r->action = DDOS_WORD_ACTION(word);
	r->verdict = verdict;
	r->cap_len = cap;
	r->pkt_len = len;
	r->ifindex = ctx->ingress_ifindex;
}

// Whether this packet is the one to sample (see ddos_sampler); draws the next gap when it is. The
// countdown carries DDOS_SAMPLER_CAPTURE while a capture runs, so generated programs send every
// packet here without reading the config.
static __always_inline bool ddos_sample_due(const struct ddos_config *cfg)
{
	__u32 zero = 0, *left = bpf_map_lookup_elem(&ddos_sampler, &zero);
	__u32 capture = cfg->capture ? DDOS_SAMPLER_CAPTURE : 0;
	__u32 count;
	__u64 every = cfg->sample_every, gap;

	if (!left)
		return false;
	count = *left & ~DDOS_SAMPLER_CAPTURE;
	if (count > 1) {
		*left = capture | (count - 1);
		return false;
	}
	gap = every ? 1 + bpf_get_prandom_u32() % (2 * every - 1) : DDOS_SAMPLER_NEVER;
	*left = capture | (gap < DDOS_SAMPLER_NEVER ? gap : DDOS_SAMPLER_NEVER);
	return every != 0;
}

static __always_inline void ddos_sample_frame(struct xdp_md *ctx, const struct ddos_config *cfg, __u32 word,
					      int verdict, __u64 now, __u32 len)
{
	struct ddos_sample *s;

	if (!ddos_sample_due(cfg))
		return;
	s = bpf_ringbuf_reserve(&ddos_samples, sizeof(*s), 0);
	if (!s) {
		ddos_count_total(DDOS_SAMPLES_LOST, len);
		return;
	}
	ddos_fill_record(&s->head, ctx, word, verdict, now, len,
			 ddos_copy_packet(ctx, s->data, len, DDOS_SAMPLE_BYTES));
	bpf_ringbuf_submit(s, 0);
	ddos_count_total(DDOS_SAMPLED, len);
}

static __always_inline void ddos_capture_frame(struct xdp_md *ctx, const struct ddos_config *cfg, __u32 word,
					       int verdict, __u64 now, __u32 len)
{
	struct ddos_capture *c;
	__u32 want = verdict == XDP_PASS ? DDOS_CAPTURE_PASS : DDOS_CAPTURE_DROP; // a SYN answered: stopped

	if (!(cfg->capture & want))
		return;
	c = bpf_ringbuf_reserve(&ddos_captures, sizeof(*c), 0);
	if (!c) {
		ddos_count_total(DDOS_CAPTURES_LOST, len);
		return;
	}
	ddos_fill_record(&c->head, ctx, word, verdict, now, len,
			 ddos_copy_packet(ctx, c->data, len, DDOS_CAPTURE_BYTES));
	bpf_ringbuf_submit(c, 0);
	ddos_count_total(DDOS_CAPTURED, len);
}

// Acts on the match word: counters, rate limits, sampling, capture; passing packets go on to the
// next stage.
static __always_inline int ddos_finish(struct xdp_md *ctx, __u32 word)
{
	struct ddos_tcp_packet tcp;
	struct ddos_counter *c;
	__u32 rule = DDOS_WORD_RULE(word), zero = 0, total = DDOS_PASS_NO_MATCH, cookie;
	__u32 len = bpf_xdp_get_buff_len(ctx);
	__u64 now = bpf_ktime_get_ns();
	struct ddos_config *cfg;
	int verdict = XDP_PASS;

	if (rule) {
		struct ddos_rule_stats *st = bpf_map_lookup_elem(&ddos_rule_stats, &rule);
		struct ddos_limit *limit;

		if (st) {
			st->packets++;
			st->bytes += len;
			st->last_jiffies = bpf_jiffies64(); // as the generated programs do
		}
		switch (DDOS_WORD_ACTION(word)) {
		case DDOS_ACTION_DROP:
			total = DDOS_DROP_RULE;
			break;
		case DDOS_ACTION_PASS:
			total = DDOS_PASS_RULE;
			break;
		case DDOS_ACTION_LIMIT:
			limit = bpf_map_lookup_elem(&ddos_limits, &rule);
			if (!limit) {
				total = DDOS_DROP_LIMIT;
			} else if (word & DDOS_WORD_PER_SOURCE) {
				total = ddos_source_bucket_take(ctx, rule, limit, now)
						? DDOS_PASS_LIMIT
						: DDOS_DROP_LIMIT_SOURCE;
			} else {
				total = ddos_rule_bucket_take(rule, limit, now) ? DDOS_PASS_LIMIT
										: DDOS_DROP_LIMIT;
			}
			break;
		case DDOS_ACTION_SYNCOOKIE:
			cookie = ddos_syncookie(ctx, &tcp, &verdict);
			total = verdict == XDP_PASS ? DDOS_PASS_RULE : DDOS_DROP_RULE;
			c = bpf_map_lookup_elem(&ddos_syncookies, &cookie);
			if (c) {
				c->packets++;
				c->bytes += len;
			}
			break;
		}
		if (verdict == XDP_PASS &&
		    (total == DDOS_DROP_RULE || total == DDOS_DROP_LIMIT || total == DDOS_DROP_LIMIT_SOURCE))
			verdict = XDP_DROP;
	}
	ddos_count_total(total, len);
	cfg = bpf_map_lookup_elem(&ddos_config, &zero);
	if (cfg) {
		ddos_sample_frame(ctx, cfg, word, verdict, now, len);
		ddos_capture_frame(ctx, cfg, word, verdict, now, len);
	}
	if (verdict == XDP_TX) // samples and captures hold the SYN, the frame becomes the SYN-ACK
		return ddos_send_synack(ctx, &tcp) ? XDP_DROP : XDP_TX;
	return verdict == XDP_PASS ? xdp_chain_next(ctx) : verdict;
}

SEC("xdp")
int xdp_ddos_verdict(struct xdp_md *ctx)
{
	__u32 zero = 0, *word = bpf_map_lookup_elem(&ddos_match, &zero);

	return ddos_finish(ctx, word ? *word : 0);
}

char LICENSE[] SEC("license") = "GPL";
