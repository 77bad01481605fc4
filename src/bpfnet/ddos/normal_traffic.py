"""A destination's normal-traffic profile: what its traffic looks like outside attacks, against
which the signature search measures how rare an attack's header values are."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from bpfnet.ddos.fingerprint import Field as HeaderField
from bpfnet.ddos.fingerprint import PacketFields
from bpfnet.ddos.sketches import CountMinSketch


class NormalTraffic:
    """What a destination's traffic looks like outside attacks: the most recent samples (exact
    collateral of a whole fingerprint), and the long-memory count of every (field, value) seen:
    exact for fields of at most 8 bits, a count-min sketch for wider ones."""

    def __init__(self, fields: Sequence[HeaderField], max_samples: int, seed: int = 0) -> None:
        self.fields = tuple(fields)
        self._index = {f: i for i, f in enumerate(self.fields)}  # sketch keys are (field index, value) ints
        self._wide = tuple((i, f) for i, f in enumerate(self.fields) if f.bits > 8)
        self._narrow = tuple(f for f in self.fields if f.bits <= 8)
        self._counts: dict[HeaderField, Counter[int]] = {f: Counter() for f in self._narrow}
        self.samples: deque[PacketFields] = deque(maxlen=max_samples)
        self.counted = 0
        self._sketch: CountMinSketch | None = None  # allocated on first use: most tracks never learn
        self._seed = seed

    def add(self, p: PacketFields) -> None:
        if self._sketch is None:
            self._sketch = CountMinSketch(width=1024, depth=3, seed=self._seed)
        self.samples.append(p)
        self.counted += 1
        for i, f in self._wide:
            value = f.value(p)
            if value is not None:
                self._sketch.add((i, value))
        for f in self._narrow:
            value = f.value(p)
            if value is not None:
                self._counts[f][value] += 1

    def share(self, f: HeaderField, value: int) -> float:
        """Estimated share of normal samples with `f` = `value` (never underestimated)."""
        if not self.counted:
            return 0.0
        if f.bits <= 8:
            return self._counts[f][value] / self.counted
        if self._sketch is None:
            return 0.0
        return self._sketch.estimate((self._index[f], value)) / self.counted

