"""Heavy-hitter structures for the detector: count-min sketch and space-saving top-k.

Keys are hashed with Python's `hash`, which is deterministic for ints and tuples of ints (the
detector's keys), so a detector replayed on the same sample stream makes the same decisions.
(str and bytes hashes vary per process unless PYTHONHASHSEED is set.)
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_MASK64 = (1 << 64) - 1


class CountMinSketch:
    """d x w counters; `estimate` never undercounts and overcounts by at most eps*N with
    probability 1 - delta for w = ceil(e/eps), d = ceil(ln(1/delta)). Conservative update
    (only the counters equal to the current minimum grow) keeps the overcount smaller."""

    def __init__(self, width: int = 1024, depth: int = 4, seed: int = 0) -> None:
        if width < 1 or depth < 1:
            raise ValueError(f"count-min sketch needs width >= 1 and depth >= 1, got {width}x{depth}")
        self.width = width
        self.depth = depth
        self.seed = seed
        self.total = 0
        self._rows = [[0] * width for _ in range(depth)]

    @classmethod
    def for_error(cls, epsilon: float, delta: float, seed: int = 0) -> CountMinSketch:
        """Size the sketch for overcount <= epsilon * total with probability 1 - delta."""
        if not 0 < epsilon < 1 or not 0 < delta < 1:
            raise ValueError(f"epsilon and delta must be in (0, 1), got {epsilon}, {delta}")
        return cls(width=math.ceil(math.e / epsilon), depth=math.ceil(math.log(1 / delta)), seed=seed)

    def _columns(self, key: Hashable) -> list[int]:
        # Kirsch-Mitzenmacher: d hash functions from two.
        h1 = hash((self.seed, key)) & _MASK64
        h2 = hash((h1, self.seed)) | 1
        return [((h1 + i * h2) & _MASK64) % self.width for i in range(self.depth)]

    def add(self, key: Hashable, count: int = 1) -> int:
        """Count `key` `count` more times; returns the new estimate."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        columns = self._columns(key)
        new = min(row[c] for row, c in zip(self._rows, columns, strict=False)) + count
        for row, c in zip(self._rows, columns, strict=False):
            if row[c] < new:
                row[c] = new
        self.total += count
        return new

    def estimate(self, key: Hashable) -> int:
        return min(row[c] for row, c in zip(self._rows, self._columns(key), strict=False))

    def share(self, key: Hashable) -> float:
        """Estimated fraction of everything counted that was `key` (0 when empty)."""
        return self.estimate(key) / self.total if self.total else 0.0


@dataclass(frozen=True)
class HeavyHitter(Generic[K]):
    key: K
    count: int  # upper bound of the true count
    error: int  # count - error is a lower bound of the true count

    @property
    def guaranteed(self) -> int:
        return self.count - self.error


class SpaceSaving(Generic[K]):
    """Top-k of a stream in k counters (Metwally et al. 2005). Every key whose true count
    exceeds total/k is present; `count` never undercounts, `count - error` never overcounts."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"space-saving capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.total = 0
        self._counts: dict[K, int] = {}
        self._errors: dict[K, int] = {}

    def add(self, key: K, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.total += count
        if key in self._counts:
            self._counts[key] += count
        elif len(self._counts) < self.capacity:
            self._counts[key] = count
            self._errors[key] = 0
        else:
            victim = min(self._counts, key=self._counts.__getitem__)
            floor = self._counts.pop(victim)
            del self._errors[victim]
            self._counts[key] = floor + count
            self._errors[key] = floor

    def top(self, n: int | None = None) -> list[HeavyHitter[K]]:
        """Monitored keys by decreasing count (ties: smaller error first, then insertion order)."""
        ranked = sorted(self._counts, key=lambda k: (-self._counts[k], self._errors[k]))
        return [HeavyHitter(k, self._counts[k], self._errors[k]) for k in ranked[:n]]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._counts

    def __len__(self) -> int:
        return len(self._counts)
