// The decapsulator's map (decap.bpf.c, on the reals).
#ifndef BPFNET_LB_DECAP_MAPS_H
#define BPFNET_LB_DECAP_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lb/structs.h"

// Packets and bytes per enum lb_decap_counter_id.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_counter);
	__uint(max_entries, LB_DECAP_MAX);
} decap_stats SEC(".maps");

#endif
