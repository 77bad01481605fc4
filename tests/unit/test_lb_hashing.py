"""Katran's hashes: every vector of reference/katran.md sections 3.2-3.4 and 3.7."""

import ipaddress

import pytest

from bpfnet.lb import hashing
from bpfnet.lb.maglev import permutation


@pytest.mark.parametrize("address, folly_hash, offset, skip", [
    ("10.0.0.1", 0xD671359DBAA15954, 4577, 18292),
    ("10.0.0.2", 0x2CD426D008B90279, 42248, 16076),
    ("10.0.0.3", 0x6EB4A2989236785D, 65365, 24158),
    ("fc00::1", 0x64E74A25B986D744, 7827, 60497),
    ("fc00::2", 0x87D247835B02295B, 12132, 1761),
    ("fc00::3", 0x0B2E5EA98827F017, 61702, 64040),
])
def test_real_hash_and_permutation(address, folly_hash, offset, skip):
    assert hashing.real_hash(address) == folly_hash
    assert permutation(folly_hash) == (offset, skip)


@pytest.mark.parametrize("address, fnv", [
    ("10.0.0.1", 0xD692F426), ("10.0.0.2", 0xD692F425), ("10.0.0.3", 0xD692F424),
    ("192.168.1.1", 0x33A20E1B),  # bytes >= 0x80 are sign-extended (signed char)
])
def test_fnv32_signed(address, fnv):
    assert hashing.fnv32_signed(ipaddress.ip_address(address).packed) == fnv


@pytest.mark.parametrize("address, spooky", [
    ("fc00::1", (0x0563A7577DF4BD83, 0x0E65DF2E93F8EB27)),
    ("fc00::2", (0x47E809CCA67AB9A8, 0x650C27266B61CEC4)),
    ("fc00::3", (0xAB521A42C6B8EDD1, 0xA6AB517D57322B55)),
])
def test_spooky(address, spooky):
    assert hashing.spooky128_16(ipaddress.ip_address(address).packed) == spooky


def test_murmur_intermediates():
    h = hashing.real_hash("10.0.0.1")
    assert hashing.murmur3_2words(h, 42, 0) == 0x7E0FC224EE1BBBE7
    assert hashing.murmur3_2words(h, 2718281828, 2307) == 0x3E1F071290CB4773


def test_ipv4_mapped_real_hashes_as_ipv4():
    assert hashing.real_hash("::ffff:10.0.0.1") == hashing.real_hash("10.0.0.1")


def test_ipv4_hash_collision_exists():
    # The 32-bit FNV collides: the ring needs a deterministic tie-break (tested in test_lb_maglev).
    assert hashing.real_hash("10.1.32.76") == hashing.real_hash("10.1.220.176")


@pytest.mark.parametrize("src, sport, dport, expected, pos", [
    ("192.168.1.1", 31337, 80, 0xC7E68632, 48717),
    ("192.168.1.1", 31337, 0, 0x01C79DE1, 39962),
    ("fc00:2::1", 31337, 80, 0x9C5A2EDA, 37505),
    ("192.168.1.42", 31337, 443, 0x900BA7C9, 6078),
    ("fc00:2::42", 31337, 443, 0xD7277F14, 42990),
    ("0.0.0.0", 42, 42, 0xDF5E9469, 46348),
    ("172.16.0.1", 31337, 80, 0x718E1AE2, 43349),
])
def test_flow_hash(src, sport, dport, expected, pos):
    h = hashing.flow_hash(src, sport, dport)
    assert h == expected
    assert h % 65537 == pos


def test_jhash_v6_intermediate():
    assert hashing.jhash(ipaddress.ip_address("fc00:2::1").packed, 512) == 0xBF179E70


def test_jhash_lengths():
    # Lengths 0, exact multiple of 12 and a tail all follow lookup3: the 0-length hash is the seed mix.
    assert hashing.jhash(b"", 0) == 0xDEADBEEF
    assert hashing.jhash(b"\0" * 12, 0) != hashing.jhash(b"\0" * 13, 0)
