// Bob Jenkins' lookup3 hash as the kernel's jhash computes it: Katran's packet hash
// (reference/katran.md 3.2). bpfnet.lb.hashing is the Python twin.
#ifndef BPFNET_LB_JHASH_H
#define BPFNET_LB_JHASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define LB_JHASH_INITVAL 0xdeadbeef
// Katran's seeds: MAX_VIPS * RING_SIZE and MAX_VIPS of its build, kept for bit compatibility.
#define LB_JHASH_SEED (512 * 65537)
#define LB_JHASH_SEED_V6 512

static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define LB_JHASH_MIX(a, b, c)         \
	do {                          \
		a -= c;               \
		a ^= lb_rol32(c, 4);  \
		c += b;               \
		b -= a;               \
		b ^= lb_rol32(a, 6);  \
		a += c;               \
		c -= b;               \
		c ^= lb_rol32(b, 8);  \
		b += a;               \
		a -= c;               \
		a ^= lb_rol32(c, 16); \
		c += b;               \
		b -= a;               \
		b ^= lb_rol32(a, 19); \
		a += c;               \
		c -= b;               \
		c ^= lb_rol32(b, 4);  \
		b += a;               \
	} while (0)

#define LB_JHASH_FINAL(a, b, c)       \
	do {                          \
		c ^= b;               \
		c -= lb_rol32(b, 14); \
		a ^= c;               \
		a -= lb_rol32(c, 11); \
		b ^= a;               \
		b -= lb_rol32(a, 25); \
		c ^= b;               \
		c -= lb_rol32(b, 16); \
		a ^= c;               \
		a -= lb_rol32(c, 4);  \
		b ^= a;               \
		b -= lb_rol32(a, 14); \
		c ^= b;               \
		c -= lb_rol32(b, 24); \
	} while (0)

// jhash() of exactly 16 bytes (an IPv6 address as four native words).
static __always_inline __u32 lb_jhash_16(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = LB_JHASH_INITVAL + 16 + initval;
	a += k[0];
	b += k[1];
	c += k[2];
	LB_JHASH_MIX(a, b, c);
	a += k[3];
	LB_JHASH_FINAL(a, b, c);
	return c;
}

static __always_inline __u32 lb_jhash_2words(__u32 a, __u32 b, __u32 initval)
{
	__u32 c = initval + LB_JHASH_INITVAL + (2 << 2);

	a += c;
	b += c;
	LB_JHASH_FINAL(a, b, c);
	return c;
}

#endif
