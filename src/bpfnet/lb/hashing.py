"""Katran-compatible hashes.

Two families, both bit-exact with Katran (see reference/katran.md sections 3.2-3.4):

* the packet hash the data plane computes (kernel ``jhash``), mirrored here so the control plane
  can tell which ring slot a flow lands in;
* the real-address hash (folly ``IPAddress::hash``: FNV-32 for IPv4, SpookyHashV2 for IPv6) and the
  two-word MurmurHash3 that turn a real into its Maglev permutation.
"""

from __future__ import annotations

import ipaddress
import struct

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF

# Katran's jhash seeds: MAX_VIPS * RING_SIZE and MAX_VIPS, fixed in its data plane.
INIT_JHASH_SEED = 512 * 65537
INIT_JHASH_SEED_V6 = 512


# --- kernel jhash (Bob Jenkins lookup3), 32-bit --------------------------------------------------

def _rol32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def _jhash_mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & M32
    a ^= _rol32(c, 4)
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= _rol32(a, 6)
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= _rol32(b, 8)
    b = (b + a) & M32
    a = (a - c) & M32
    a ^= _rol32(c, 16)
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= _rol32(a, 19)
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= _rol32(b, 4)
    b = (b + a) & M32
    return a, b, c


def _jhash_final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol32(b, 14)) & M32
    a ^= c
    a = (a - _rol32(c, 11)) & M32
    b ^= a
    b = (b - _rol32(a, 25)) & M32
    c ^= b
    c = (c - _rol32(b, 16)) & M32
    a ^= c
    a = (a - _rol32(c, 4)) & M32
    b ^= a
    b = (b - _rol32(a, 14)) & M32
    c ^= b
    c = (c - _rol32(b, 24)) & M32
    return c


def jhash(key: bytes, initval: int) -> int:
    """The kernel's ``jhash(key, len, initval)``."""
    n = len(key)
    a = b = c = (0xDEADBEEF + n + initval) & M32
    pos = 0
    while n - pos > 12:
        x, y, z = struct.unpack_from("<III", key, pos)
        a, b, c = _jhash_mix((a + x) & M32, (b + y) & M32, (c + z) & M32)
        pos += 12
    if n == pos:
        return c
    x, y, z = struct.unpack("<III", key[pos:].ljust(12, b"\0"))
    return _jhash_final((a + x) & M32, (b + y) & M32, (c + z) & M32)


def jhash_2words(a: int, b: int, initval: int) -> int:
    s = (initval + 0xDEADBEEF + 8) & M32
    return _jhash_final((a + s) & M32, (b + s) & M32, s)


def flow_hash(src: IPAddress | str, sport: int, dport: int) -> int:
    """Katran's packet hash: source address and both ports (destination and protocol are not hashed).

    The caller applies the VIP flags first (port-less VIP zeroes ``dport``, ``F_HASH_NO_SRC_PORT``
    zeroes ``sport``, ``F_HASH_DPORT_ONLY`` sets ``sport = dport`` and the source to all zeros).
    """
    src = ipaddress.ip_address(src)
    ports = struct.unpack("<I", struct.pack("!HH", sport, dport))[0]
    if src.version == 4:
        head = struct.unpack("<I", src.packed)[0]
    else:
        head = jhash(src.packed, INIT_JHASH_SEED_V6)
    return jhash_2words(head, ports, INIT_JHASH_SEED)


# --- folly IPAddress::hash -----------------------------------------------------------------------

def _rol64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def hash_128_to_64(upper: int, lower: int) -> int:
    """CityHash's Hash128to64 (folly::hash::hash_128_to_64)."""
    k_mul = 0x9DDFEA08EB382D69
    a = ((lower ^ upper) * k_mul) & M64
    a ^= a >> 47
    b = ((upper ^ a) * k_mul) & M64
    b ^= b >> 47
    return (b * k_mul) & M64


def fnv32_signed(data: bytes) -> int:
    """folly's FNV-32 over *signed* chars: bytes >= 0x80 are sign-extended before the XOR."""
    h = 2166136261
    for byte in data:
        h = (h * 16777619) & M32
        h ^= byte | 0xFFFFFF00 if byte >= 0x80 else byte
    return h


_SPOOKY_K = 0xDEADBEEFDEADBEEF
_SHORT_MIX = ((2, 50), (3, 52), (0, 30), (1, 41), (2, 54), (3, 48),
              (0, 38), (1, 37), (2, 62), (3, 34), (0, 5), (1, 36))
_SHORT_END = ((3, 15), (0, 52), (1, 26), (2, 51), (3, 28), (0, 9),
              (1, 47), (2, 54), (3, 32), (0, 25), (1, 63))


def spooky128_16(data: bytes) -> tuple[int, int]:
    """SpookyHashV2 Hash128 of exactly 16 bytes with seeds (0, 0) (the short path)."""
    lo, hi = struct.unpack("<QQ", data)
    h = [0, 0, (_SPOOKY_K + lo) & M64, (_SPOOKY_K + hi) & M64]
    for i, r in _SHORT_MIX:
        h[i] = _rol64(h[i], r)
        h[i] = (h[i] + h[(i + 1) % 4]) & M64
        h[(i + 2) % 4] ^= h[i]
    h[3] = (h[3] + (16 << 56)) & M64
    h[2] = (h[2] + _SPOOKY_K) & M64
    h[3] = (h[3] + _SPOOKY_K) & M64
    for t, r in _SHORT_END:
        s = (t + 3) % 4
        h[t] ^= h[s]
        h[s] = _rol64(h[s], r)
        h[t] = (h[t] + h[s]) & M64
    return h[0], h[1]


_AF_INET, _AF_INET6 = 2, 10


def real_hash(address: IPAddress | str) -> int:
    """folly ``IPAddress(address).hash()``: the 64-bit hash Katran gives each real."""
    address = ipaddress.ip_address(address)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        return hash_128_to_64(_AF_INET, fnv32_signed(address.packed))
    return hash_128_to_64(_AF_INET6, hash_128_to_64(*spooky128_16(address.packed)))


# --- Katran's two-word MurmurHash3_x64_128, folded to 64 bits -----------------------------------

def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    k ^= k >> 33
    return k


def murmur3_2words(a: int, b: int, seed: int) -> int:
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = seed
    k1 = (_rol64((a * c1) & M64, 31) * c2) & M64
    h1 ^= k1
    h1 = (_rol64(h1, 27) + h2) & M64
    h1 = (h1 * 5 + 0x52DCE729) & M64
    k2 = (_rol64((b * c2) & M64, 33) * c1) & M64
    h2 ^= k2
    h2 = (_rol64(h2, 31) + h1) & M64
    h2 = (h2 * 5 + 0x38495AB5) & M64
    h1 ^= 16
    h2 ^= 16
    h1 = (h1 + h2) & M64
    h2 = (h2 + h1) & M64
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    return (h1 + h2) & M64
