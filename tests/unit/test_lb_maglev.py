"""Maglev rings: Katran's vectors (reference/katran.md 3.7), a literal port as oracle, properties."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfnet.lb.hashing import real_hash
from bpfnet.lb.maglev import RingError, build_ring, endpoints_for, permutation, ring_shares

V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
V6 = ["fc00::1", "fc00::2", "fc00::3"]


def katran_reference(reals, ring_size, version):
    """A line-by-line port of MaglevHash / MaglevHashV2 (uint32 arithmetic included)."""
    endpoints = endpoints_for(reals)
    ring = [-1] * ring_size
    if not endpoints:
        return ring
    if len(endpoints) == 1:
        return [endpoints[0].num] * ring_size
    perms = [permutation(e.hash, ring_size) for e in endpoints]
    nxt = [0] * len(endpoints)
    runs = 0

    def place(i):
        nonlocal runs
        offset, skip = perms[i]
        cur = ((offset + nxt[i] * skip) & 0xFFFFFFFF) % ring_size
        while ring[cur] >= 0:
            nxt[i] += 1
            cur = ((offset + nxt[i] * skip) & 0xFFFFFFFF) % ring_size
        ring[cur] = endpoints[i].num
        nxt[i] += 1
        runs += 1
        return runs == ring_size

    weights = [e.weight for e in endpoints]
    if version == "v1":
        while True:
            for i in range(len(endpoints)):
                for _ in range(weights[i]):
                    if place(i):
                        return ring
                weights[i] = 1
    max_weight = max(weights)
    cum = [0] * len(endpoints)
    while True:
        for i in range(len(endpoints)):
            cum[i] += weights[i]
            if cum[i] >= max_weight:
                cum[i] -= max_weight
                if place(i):
                    return ring


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_equal_weight_v4_vector(version):
    ring = build_ring([(a, 1) for a in V4], version=version)
    assert len(ring) == 65537
    assert [V4[i] for i in ring[:8]] == ["10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.2",
                                         "10.0.0.1", "10.0.0.3", "10.0.0.3", "10.0.0.1"]
    assert ring_shares(ring, 3) == [21845, 21846, 21846]
    # Flow positions from the packet-hash table.
    assert V4[ring[48717]] == "10.0.0.3"
    assert V4[ring[39962]] == "10.0.0.2"
    assert V4[ring[6078]] == "10.0.0.2"
    assert V4[ring[46348]] == "10.0.0.2"
    assert V4[ring[43349]] == "10.0.0.2"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_equal_weight_v6_vector(version):
    ring = build_ring([(a, 1) for a in V6], version=version)
    assert [V6[i] for i in ring[:8]] == ["fc00::2", "fc00::3", "fc00::2", "fc00::2",
                                         "fc00::2", "fc00::3", "fc00::3", "fc00::3"]
    assert ring_shares(ring, 3) == [21846, 21845, 21846]
    assert V6[ring[48717]] == "fc00::1"
    assert V6[ring[37505]] == "fc00::3"
    assert V6[ring[42990]] == "fc00::1"
    assert V6[ring[43349]] == "fc00::2"


def test_weighted_vectors():
    reals = list(zip(V4, [1, 2, 3], strict=False))
    assert ring_shares(build_ring(reals, version="v1"), 3) == [21844, 21846, 21847]
    assert ring_shares(build_ring(reals, version="v2"), 3) == [10922, 21846, 32769]
    exact = list(zip(V4, [10000, 20000, 35537], strict=False))
    assert ring_shares(build_ring(exact, version="v1"), 3) == [10000, 20000, 35537]


def test_index_follows_input_order_not_hash_order():
    forward = build_ring([(a, 1) for a in V4])
    backward = build_ring([(a, 1) for a in reversed(V4)])
    assert [V4[i] for i in forward] == [list(reversed(V4))[i] for i in backward]


def test_no_weight_gives_empty_ring():
    assert build_ring([]) == [-1] * 65537
    assert set(build_ring([("10.0.0.1", 0), ("10.0.0.2", 0)], ring_size=13)) == {-1}


def test_single_real_and_zero_weight_reals_are_skipped():
    assert set(build_ring([("10.0.0.1", 0), ("10.0.0.2", 5)], ring_size=101)) == {1}


def test_wrapping_skip_that_katran_cannot_fill_raises():
    # 10.2.40.26 has skip 65536: offset + next*skip wraps uint32 and Katran's loop never ends.
    assert permutation(real_hash("10.2.40.26"))[1] == 65536
    with pytest.raises(RingError, match="never terminates"):
        build_ring([("10.0.0.2", 1), ("10.2.40.26", 65536)], version="v1")


def test_hash_collision_tie_break_is_deterministic():
    a, b = "10.1.32.76", "10.1.220.176"
    ring1 = build_ring([(a, 1), (b, 1), ("10.0.0.1", 1)], ring_size=1009)
    ring2 = build_ring([(b, 1), (a, 1), ("10.0.0.1", 1)], ring_size=1009)
    names1 = [[a, b, "10.0.0.1"][i] for i in ring1]
    names2 = [[b, a, "10.0.0.1"][i] for i in ring2]
    assert names1 == names2


@pytest.mark.parametrize("reals, ring_size, version, message", [
    ([("10.0.0.1", 1), ("10.0.0.1", 2)], 65537, "v2", "duplicate address 10.0.0.1"),
    ([("10.0.0.300", 1)], 65537, "v2", "real #0"),
    ([("10.0.0.1", -1)], 65537, "v2", "weight must be"),
    ([("10.0.0.1", 1.5)], 65537, "v2", "weight must be"),
    ([("10.0.0.1", 1)], 65536, "v2", "must be prime"),
    ([("10.0.0.1", 1)], 65537, "v3", "unknown Maglev version"),
])
def test_bad_input(reals, ring_size, version, message):
    with pytest.raises(RingError, match=message):
        build_ring(reals, ring_size=ring_size, version=version)


def test_full_size_matches_literal_port():
    reals = [(f"10.{i}.{i * 7 % 256}.{i * 13 % 256}", 1 + i % 4) for i in range(20)]
    for version in ("v1", "v2"):
        assert build_ring(reals, version=version) == katran_reference(reals, 65537, version)


def test_hundred_reals_build_quickly_enough_to_not_matter():
    # Functional check only (no timing assertion): 100 mixed-family reals fill every slot.
    reals = [(f"10.0.{i}.1", 1 + i % 3) for i in range(50)] + [(f"fc00::{i:x}", 2) for i in range(50)]
    ring = build_ring(reals)
    assert -1 not in ring and set(ring) == set(range(100))


addresses = st.one_of(
    st.integers(1, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None),
)
real_lists = st.lists(st.tuples(addresses, st.integers(0, 20)), min_size=0, max_size=12,
                      unique_by=lambda r: r[0])


@settings(max_examples=150, deadline=None)
@given(real_lists, st.sampled_from([13, 251, 1009, 4099]), st.sampled_from(["v1", "v2"]))
def test_matches_literal_port(reals, ring_size, version):
    assert build_ring(reals, ring_size, version) == katran_reference(reals, ring_size, version)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(addresses, st.integers(1, 10)), min_size=2, max_size=10, unique_by=lambda r: r[0]))
def test_v2_balance_within_weights(reals):
    ring_size = 65537
    shares = ring_shares(build_ring(reals, ring_size, "v2"), len(reals))
    total = sum(w for _, w in reals)
    for (_, weight), share in zip(reals, shares, strict=False):
        expected = ring_size * weight / total
        # MaglevV2 lands within a fraction of a percent of the ideal share; 1% cannot flake.
        assert abs(share - expected) <= 0.01 * expected + 16


@settings(max_examples=30, deadline=None)
@given(st.lists(addresses, min_size=3, max_size=12, unique=True), st.data(), st.sampled_from(["v1", "v2"]),
       st.sampled_from([4099, 65537]))
def test_minimal_disruption_when_a_real_is_removed(addrs, data, version, ring_size):
    reals = [(a, 1) for a in addrs]
    gone = data.draw(st.integers(0, len(addrs) - 1))
    before = build_ring(reals, ring_size, version)
    after_reals = reals[:gone] + reals[gone + 1:]
    after = build_ring(after_reals, ring_size, version)
    survivors = [a for a, _ in after_reals]
    moved = sum(1 for old, new in zip(before, after, strict=False)
                if old != gone and addrs[old] != survivors[new])
    # Slots of surviving reals that moved. Maglev keeps this a fraction of one real's share but
    # does not bound it tightly: with a small ring it reached 0.79 of a share in 4,000 random
    # removals (a case with 5 reals on 4,099 slots moves 260, a third of a share). It never moves
    # as many as the removed real frees.
    assert moved < ring_size / len(addrs)
    # The removed real's slots all went somewhere.
    assert -1 not in after
