"""The measurements `bpfnet bench lb` reports run, take the paths they claim, and return numbers
(no assertion on speed: that is the benchmark's business, not a test's)."""

import math

import pytest

from bpfnet.lb.perf import packet_cost, ring_build_seconds

pytestmark = pytest.mark.root


def test_packet_cost_runs_the_hit_and_bypass_paths():
    cost = packet_cost(flows=50, reals=10)  # raises if a path is not the one it claims
    assert cost.baseline_ns > 0
    assert all(math.isfinite(v) for v in (cost.hit_ns, cost.bypass_ns))


def test_ring_build_seconds():
    assert 0 < ring_build_seconds(reals=20, rounds=1) < 60
