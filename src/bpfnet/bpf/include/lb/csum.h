// Internet checksums for the load balancer's header rewrites.
#ifndef BPFNET_LB_CSUM_H
#define BPFNET_LB_CSUM_H

#include <linux/types.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 lb_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// Header checksum of an IPv4 header without options (check field must be 0).
static __always_inline __u16 lb_ipv4_csum(const struct iphdr *iph)
{
	const __u16 *words = (const __u16 *)iph;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*iph) / 2; i++)
		sum += words[i];
	return lb_csum_fold(sum);
}

// RFC 1624 incremental update: a 16-bit word covered by *csum changed from old to new. The result
// is never 0x0000 but 0xffff, the other zero of one's complement: equally valid wherever 0x0000
// is, and the only valid checksum of a message that sums to +0 (an ICMP echo reply with id 0,
// sequence 0 and no data, which the update would otherwise give 0x0000).
static __always_inline void lb_csum_replace16(__u16 *csum, __u16 old, __u16 new)
{
	__u32 sum = (__u16) ~*csum;
	__u16 folded;

	sum += (__u16)~old;
	sum += new;
	folded = lb_csum_fold(sum);
	*csum = folded ? folded : 0xffff;
}

#endif
