// Structs and constants of the ddos stage shared with Python (mirrored once in
// src/bpfnet/ddos/dataplane.py and samples.py; keep both in step).
#ifndef BPFNET_DDOS_STRUCTS_H
#define BPFNET_DDOS_STRUCTS_H

#include <linux/types.h>

#define DDOS_MAX_RULES 65536		 // rule ids 1..65535 (16 bits of the match word); 0 = no rule matched
#define DDOS_BANK_SLOTS 2048		 // generated programs per bank (up to 256 rules each)
#define DDOS_MAX_PREFIXES 262144	 // entries of ddos_prefixes (both banks)
#define DDOS_MAX_TUPLE_ENTRIES (1 << 20) // entries of ddos_tuples (both banks)
#define DDOS_MAX_TUPLE_HASHED (1 << 17)	 // entries of each ddos_tuple_h* map (both banks)
#define DDOS_TUPLE_FIELDS 6		 // exact fields of a tuple shape besides its address
#define DDOS_FILTER_SLOTS 64		 // address filters of tuple shapes per bank (8 runs x 8 shapes)
#define DDOS_FILTER_WORDS 2048		 // 32-bit words of one filter: a bit per 16-bit value
#define DDOS_SAMPLE_BYTES 128		 // packet bytes in a sample
#define DDOS_CAPTURE_BYTES 2048		 // packet bytes in a capture record
#define DDOS_MAX_SOURCES 65536		 // per-source buckets kept (LRU)
#define DDOS_VALUE_RUNS 4		 // value runs (e.g. thousands of port rules) per bank
#define DDOS_VALUE_RUN_SIZE 65536	 // entries of one value run in ddos_values: a 16-bit value each

// Slots of the ddos_progs prog array: the verdict program, the head of the rule set in force, then
// two banks of generated rule-set programs ("chunks"). Slot of chunk i of bank b:
// DDOS_SLOT_BANKS + b * DDOS_BANK_SLOTS + i. Packets enter the head, a program generated for the
// rule set (bpfnet/ddos/ruleset.py; the head slot records it for the next agent), attached or in
// the XDP chain's slot: a small set is the head alone, one straight
// program that matches, counts and decides; a big one is grouped by packet key (ethertype, IP
// protocol, destination port): the head computes the key, finds the first chunk of that key's
// group by a binary search compiled into it (else the group of rules that can match any key), and
// a chunk tail-calls the next chunk of its group (same bank). Generated programs count and
// decide themselves; only limit rules, samples and captures go on to the verdict program (the
// match word in ddos_match). A new rule set is written into the idle bank, then its head replaces
// the old one where packets enter (chain slot, XDP links: each an atomic swap), and a packet in
// flight stays in its bank (slots are immediates in the generated code).
enum ddos_slot {
	DDOS_SLOT_VERDICT = 0,
	DDOS_SLOT_HEAD = 1,
	DDOS_SLOT_BANKS = 2,
	DDOS_PROG_SLOTS = DDOS_SLOT_BANKS + 2 * DDOS_BANK_SLOTS,
};

// A run of consecutive source-network rules is one lookup in ddos_prefixes (bpfnet/ddos/ruleset.py
// emits it): the run's id and the frame's ethertype must match whole, then the longest network of
// the address. The value is the match word of the run's first rule matching that address.
struct ddos_prefix_key {
	__u32 prefixlen;   // 64 + network length
	__u32 run;	   // bank << 16 | run number
	__u8 ethertype[2]; // as in the frame (network order)
	__u8 zero[2];
	__u8 addr[4]; // IPv4 source, or the ARP / RARP sender
};

// A run of rules of mixed fields (networks with protocols and ports, IPv4 and IPv6) is a lookup
// per tuple shape in ddos_tuples (bpfnet/ddos/ruleset.py emits it, TupleRun): the run, shape and
// field values must match whole, then the longest prefix of the address. The value is the
// position in the run << 32 | match word of the run's first rule matching (the lowest over the
// shapes decides).
struct ddos_tuple_key {
	__u32 prefixlen; // 32 + the fields' bits + the address prefix length
	__u32 run;	 // bank << 31 | run number << 8 | shape
	// the shape's fields in their own sizes (1, 2 or 4 bytes, masked, network order), then its
	// address (network order), if it has one; zeros after
	__u8 data[4 * DDOS_TUPLE_FIELDS + 16];
};

enum ddos_action {
	DDOS_ACTION_NONE = 0, // no rule matched
	DDOS_ACTION_DROP = 1,
	DDOS_ACTION_PASS = 2,	   // exempt from later rules
	DDOS_ACTION_LIMIT = 3,	   // token bucket: pass under the rate, drop over it
	DDOS_ACTION_SYNCOOKIE = 4, // SYNs answered with a cookie SYN-ACK (ddos/syncookie.h)
};

// What the cookie SYN-ACK advertises on an interface (ddos_synack, by ingress ifindex): the MSS
// its MTU allows and the window scale the server's stack will use (bpfnet/ddos/synproxy.py works
// them out; the nftables SYNPROXY rules of that interface say the same). An interface with no
// entry gets the defaults below (a 1500-byte MTU and Linux's scale with its default buffers).
struct ddos_synack_params {
	__u16 mss4;
	__u16 mss6;
	__u8 wscale;
	__u8 pad[3];
};
#define DDOS_SYNCOOKIE_MSS4 1460
#define DDOS_SYNCOOKIE_MSS6 1440
#define DDOS_SYNCOOKIE_WSCALE 7
#define DDOS_SYNCOOKIE_TTL 64
#define DDOS_SYNACK_INTERFACES 1024 // entries of ddos_synack

// The match word a rule-set program leaves in ddos_match: rule id, action, flags.
#define DDOS_WORD_RULE(w) ((w)&0xffff)
#define DDOS_WORD_ACTION(w) (((w) >> 16) & 0xff)
#define DDOS_WORD_PER_SOURCE (1u << 24)

// Totals per outcome (ddos_totals index).
enum ddos_total_id {
	DDOS_PASS_NO_MATCH = 0,
	DDOS_PASS_RULE = 1,	    // a pass rule matched
	DDOS_DROP_RULE = 2,	    // a drop rule matched
	DDOS_PASS_LIMIT = 3,	    // a limit rule matched, under its rate
	DDOS_DROP_LIMIT = 4,	    // a limit rule matched, over its rate
	DDOS_DROP_LIMIT_SOURCE = 5, // a per-source limit rule matched, that source over its rate
	DDOS_SAMPLED = 6,
	DDOS_SAMPLES_LOST = 7, // sample ring full
	DDOS_CAPTURED = 8,
	DDOS_CAPTURES_LOST = 9, // capture ring full
	DDOS_TOTALS = 10,
};

// What syncookie rules did (ddos_syncookies index); in ddos_totals a SYN answered or a packet
// dropped counts as drop_rule, a packet passed as pass_rule.
enum ddos_syncookie_id {
	DDOS_SYNCOOKIE_SENT = 0,    // a SYN answered with a cookie SYN-ACK (XDP_TX)
	DDOS_SYNCOOKIE_VALID = 1,   // an ACK with a valid cookie, passed to SYNPROXY
	DDOS_SYNCOOKIE_INVALID = 2, // an ACK with a bad cookie, or other TCP of no known flow: dropped
	DDOS_SYNCOOKIE_TRACKED = 3, // a packet of a flow conntrack knows: passed
	DDOS_SYNCOOKIE_NOT_TCP = 4, // a packet that is not TCP: passed
	DDOS_SYNCOOKIE_COUNTERS = 5,
};

struct ddos_counter {
	__u64 packets;
	__u64 bytes;
};

struct ddos_rule_stats {
	__u64 packets;
	__u64 bytes;
	__u64 last_jiffies; // bpf_jiffies64() of the last match (Python turns it into monotonic ns)
};

// Rate of a limit rule: tokens are packets * 1e9, refilled by elapsed_ns * rate_pps.
struct ddos_limit {
	__u64 rate_pps;
	__u64 burst; // bucket size in packets
};

struct ddos_bucket {
	__u64 tokens;  // packets * 1e9
	__u64 last_ns; // 0: never used, starts full
};

struct ddos_rule_bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	struct ddos_bucket bucket;
};

struct ddos_source_key {
	__u32 rule;
	__u8 family; // 4, 6, or 0 for non-IP frames (one shared bucket)
	__u8 pad[3];
	__u8 addr[16]; // IPv4 in the first 4 bytes
};

// Settings that change without reloading (ddos_config[0]).
struct ddos_config {
	__u32 sample_every; // 1-in-N sampling; 0 = off
	__u32 capture;	    // bit 0: capture drops, bit 1: capture passes; 0 = off
};

// ddos_sampler: packets left before the next sample, and this bit while a capture runs (a value
// generated programs see as negative: every packet goes to the verdict program).
#define DDOS_SAMPLER_CAPTURE 0x80000000u
#define DDOS_SAMPLER_NEVER 0x7fffffffu // sampling off

#define DDOS_CAPTURE_DROP 1u
#define DDOS_CAPTURE_PASS 2u

// Header of sample and capture records.
struct ddos_record {
	__u64 ts_ns;
	__u32 rule;    // 0 = no rule matched
	__u8 action;   // enum ddos_action of the rule
	__u8 verdict;  // XDP_DROP or XDP_PASS
	__u16 cap_len; // bytes of data[] that are packet bytes
	__u32 pkt_len;
	__u32 ifindex;
};

struct ddos_sample {
	struct ddos_record head;
	__u8 data[DDOS_SAMPLE_BYTES];
};

struct ddos_capture {
	struct ddos_record head;
	__u8 data[DDOS_CAPTURE_BYTES];
};

// Bookkeeping for the control plane only (not read by BPF): the rule set in force.
struct ddos_meta {
	__u32 chunks;	  // programs the rules run in (1: one straight program; a head not counted)
	__u32 groups;	  // keyed groups (the any-key group not counted)
	__u64 generation; // rule sets deployed so far
};

#endif
