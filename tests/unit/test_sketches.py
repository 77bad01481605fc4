"""Count-min sketch and space-saving: the error guarantees the detector relies on."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfnet.ddos.sketches import CountMinSketch, SpaceSaving


def zipf_stream(n: int, universe: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(universe)]
    return rng.choices(range(universe), weights=weights, k=n)


def test_cms_exact_when_no_collisions():
    sketch = CountMinSketch(width=4096, depth=4)
    for key, count in [("a", 3), (("udp", 53), 7), (b"\x01\x02", 1)]:
        sketch.add(key, count)
    assert sketch.estimate("a") == 3
    assert sketch.estimate(("udp", 53)) == 7
    assert sketch.estimate(b"\x01\x02") == 1
    assert sketch.estimate("never") == 0
    assert sketch.total == 11
    assert sketch.share(("udp", 53)) == pytest.approx(7 / 11)


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=400))
@settings(max_examples=50, deadline=None)
def test_cms_never_undercounts(keys):
    sketch = CountMinSketch(width=32, depth=3)  # tiny: collisions are certain
    for key in keys:
        sketch.add(key)
    for key, true in Counter(keys).items():
        assert sketch.estimate(key) >= true


def test_cms_overcount_within_epsilon_bound():
    epsilon, delta = 0.01, 0.01
    sketch = CountMinSketch.for_error(epsilon, delta, seed=7)
    stream = zipf_stream(20_000, 2_000, seed=1)
    for key in stream:
        sketch.add(key)
    truth = Counter(stream)
    over = [sketch.estimate(k) - truth[k] for k in range(2_000)]
    # The bound holds per key with probability 1 - delta; allow twice that share of misses.
    misses = sum(1 for o in over if o > epsilon * len(stream))
    assert misses <= 2 * delta * 2_000
    assert min(over) >= 0


def test_cms_is_deterministic_across_instances():
    a, b = CountMinSketch(64, 3, seed=5), CountMinSketch(64, 3, seed=5)
    for key in range(500):
        a.add(key % 37)
        b.add(key % 37)
    assert [a.estimate(k) for k in range(37)] == [b.estimate(k) for k in range(37)]


@pytest.mark.parametrize("width,depth", [(0, 1), (1, 0)])
def test_cms_rejects_bad_shape(width, depth):
    with pytest.raises(ValueError, match="width >= 1 and depth >= 1"):
        CountMinSketch(width, depth)


def test_cms_rejects_negative_count():
    with pytest.raises(ValueError, match="count must be >= 0"):
        CountMinSketch().add("x", -1)


def test_space_saving_exact_below_capacity():
    top = SpaceSaving(capacity=8)
    for key in "aaabbc":
        top.add(key)
    assert [(h.key, h.count, h.error) for h in top.top()] == [("a", 3, 0), ("b", 2, 0), ("c", 1, 0)]
    assert top.total == 6 and len(top) == 3 and "a" in top


def test_space_saving_eviction_inherits_minimum():
    top = SpaceSaving(capacity=2)
    for key in "aab":
        top.add(key)
    top.add("c")  # evicts b (count 1): c gets count 2, error 1
    assert "b" not in top
    hitter = {h.key: h for h in top.top()}["c"]
    assert (hitter.count, hitter.error, hitter.guaranteed) == (2, 1, 1)


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=300), st.integers(min_value=1, max_value=12))
@settings(max_examples=60, deadline=None)
def test_space_saving_guarantees(stream, capacity):
    top = SpaceSaving(capacity)
    for key in stream:
        top.add(key)
    truth = Counter(stream)
    hitters = {h.key: h for h in top.top()}
    for key, true in truth.items():
        if true > len(stream) / capacity:
            assert key in hitters  # every frequent key is monitored
    for key, hitter in hitters.items():
        assert hitter.guaranteed <= truth[key] <= hitter.count


def test_space_saving_finds_heavy_hitter_among_noise():
    rng = random.Random(3)
    top = SpaceSaving(capacity=16)
    for i in range(5_000):
        top.add(53 if i % 4 == 0 else rng.randrange(1024, 65536))
    best = top.top(1)[0]
    assert best.key == 53
    assert best.guaranteed >= 1_000  # true count is 1250; noise inflates only the error


def test_space_saving_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        SpaceSaving(0)
