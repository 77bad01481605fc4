// The ddos stage's maps (ddos.bpf.c); bpfnet.ddos.dataplane binds them (DdosObjects).
#ifndef BPFNET_DDOS_MAPS_H
#define BPFNET_DDOS_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "ddos/structs.h"

// Generated rule-set chunks and the verdict program (slots: enum ddos_slot).
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(max_entries, DDOS_PROG_SLOTS);
} ddos_progs SEC(".maps");

// The bank of the rule set in force (index 0), for the control plane; the head slot of ddos_progs
// is what packets follow.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} ddos_active SEC(".maps");

// Runs of source-network rules: (run, ethertype, network) -> match word (see ddos_prefix_key).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ddos_prefix_key);
	__type(value, __u32);
	__uint(max_entries, DDOS_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ddos_prefixes SEC(".maps");

// Runs of rules of mixed fields: (run, shape, field values, address prefix) -> position << 32 |
// match word (see ddos_tuple_key).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ddos_tuple_key);
	__type(value, __u64);
	__uint(max_entries, DDOS_MAX_TUPLE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ddos_tuples SEC(".maps");

// Tuple shapes whose entries all have one prefix length (after expanding a few shorter prefixes
// to it) are an exact lookup instead: (run, shape, field values, the address masked to that
// length) -> the same value as ddos_tuples, in the hash map of the key's size (12, 16, 32 or 48
// bytes: struct ddos_tuple_key from `run`, zeros after the shape's bytes). A hash of a short key
// costs less than a trie walk. (A hash map allocates its buckets up front: fewer entries than the
// trie, a shape that would not fit stays in the trie.)
#define DDOS_TUPLE_HASH(bytes)                              \
	struct {                                            \
		__uint(type, BPF_MAP_TYPE_HASH);            \
		__uint(key_size, bytes);                    \
		__uint(value_size, sizeof(__u64));          \
		__uint(max_entries, DDOS_MAX_TUPLE_HASHED); \
		__uint(map_flags, BPF_F_NO_PREALLOC);       \
	} ddos_tuple_h##bytes SEC(".maps")
DDOS_TUPLE_HASH(12);
DDOS_TUPLE_HASH(16);
DDOS_TUPLE_HASH(32);
DDOS_TUPLE_HASH(48);

// Address filters of tuple shapes: a bit per value of 16 address bits every entry of the shape
// fixes; a packet whose bit is clear skips the shape's ddos_tuples lookup. Word
// ((bank * DDOS_FILTER_SLOTS + slot) * DDOS_FILTER_WORDS + value / 32), bit value % 32.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2 * DDOS_FILTER_SLOTS * DDOS_FILTER_WORDS);
} ddos_tuple_filter SEC(".maps");

// The match word (rule id, action, flags) handed from the rule-set program to the verdict program.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} ddos_match SEC(".maps");

// Value runs: consecutive rules that differ only in the constant of their final comparison (a
// thousand `udp dst port N` rules) are one lookup here, indexed by (bank * DDOS_VALUE_RUNS + run) *
// DDOS_VALUE_RUN_SIZE + value; the entry is the match word of the run's first rule for that value
// (0: none).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2 * DDOS_VALUE_RUNS * DDOS_VALUE_RUN_SIZE);
} ddos_values SEC(".maps");

// Packets left before the next sample, per CPU: generated programs count down, the verdict program
// takes the sample and draws the next gap (1 .. 2 * sample_every - 1, so 1 in sample_every on average
// and never in step with periodic traffic). DDOS_SAMPLER_CAPTURE while a capture runs.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} ddos_sampler SEC(".maps");

// Rule id -> packets, bytes and time of last match.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_rule_stats);
	__uint(max_entries, DDOS_MAX_RULES);
} ddos_rule_stats SEC(".maps");

// Totals per outcome, indexed by enum ddos_total_id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_counter);
	__uint(max_entries, DDOS_TOTALS);
} ddos_totals SEC(".maps");

// What syncookie rules did, per enum ddos_syncookie_id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_counter);
	__uint(max_entries, DDOS_SYNCOOKIE_COUNTERS);
} ddos_syncookies SEC(".maps");

// Ingress ifindex -> what a cookie SYN-ACK sent back on that interface advertises.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct ddos_synack_params);
	__uint(max_entries, DDOS_SYNACK_INTERFACES);
} ddos_synack SEC(".maps");

// Rule id -> rate and burst of a limit rule.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_limit);
	__uint(max_entries, DDOS_MAX_RULES);
} ddos_limits SEC(".maps");

// Rule id -> the rule's token bucket (shared by all CPUs, under a spin lock).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_rule_bucket);
	__uint(max_entries, DDOS_MAX_RULES);
} ddos_buckets SEC(".maps");

// (rule id, source address) -> token bucket of a per-source limit rule; least recently used go
// first. Updated without a lock, like rakelimit: concurrent CPUs may admit a few extra packets.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ddos_source_key);
	__type(value, struct ddos_bucket);
	__uint(max_entries, DDOS_MAX_SOURCES);
} ddos_src_bkts SEC(".maps");

// Runtime settings (sampling, capture), index 0.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_config);
	__uint(max_entries, 1);
} ddos_config SEC(".maps");

// Control-plane bookkeeping (active bank), index 0; not read here.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ddos_meta);
	__uint(max_entries, 1);
} ddos_meta SEC(".maps");

// Rule id -> content tag of the deployed rule (control plane only; 0 = unused id), so an adopting
// agent knows which counters belong to unchanged rules.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, DDOS_MAX_RULES);
} ddos_rule_tags SEC(".maps");

// 1-in-N samples: struct ddos_sample records for the detector and `bpfnet ddos top`.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} ddos_samples SEC(".maps");

// Captured packets (struct ddos_capture) for `bpfnet ddos capture`.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} ddos_captures SEC(".maps");

#endif
