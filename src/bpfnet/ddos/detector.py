"""The DDoS detector: sampled packets in, rule decisions out (sans-IO, clock passed in).

Per destination (address, protocol, port) and per (address, protocol) aggregate, the detector
learns a packet-rate baseline online and declares an attack when a window's rate exceeds
`attack_factor` x baseline and `attack_floor_pps`. It then searches a signature over the
attack window's samples against the destination's normal samples:

1. per header field, the heaviest values of the attack samples (space-saving top-k); a field
   whose few top values cover the excess and that is rarer in normal traffic (count-min sketch
   of normal field values) becomes a predicate `field in {values}`; failing that, a flag field
   whose nearly constant bits do (`field & mask = value`), or a numeric field whose values
   crowd into a narrow range free of normal values (`low <= field <= high`);
2. the conjunction of all predicates is the most specific candidate; less specific ones follow
   by dropping, one at a time, the predicate whose removal recovers the most attack samples;
3. the chosen candidate is the most specific one covering `target_coverage` of the excess with
   collateral (share of normal samples matched) <= `max_collateral` (else the best partial one
   above `min_coverage`, refined later from the samples it misses).

Rules expire unless extended; they are extended while the attack lasts and removed once the
rate stayed below the threshold for `hold_time`. Every decision is an `Event` with its evidence.
"""

from __future__ import annotations

import bisect
import enum
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.networks import IPvAnyNetwork

from bpfnet.ddos.fingerprint import (
    PORT_PROTOCOLS,
    AnyPredicate,
    BitsPredicate,
    Destination,
    Fingerprint,
    PacketFields,
    Predicate,
    RangePredicate,
    SourcePrefix,
    search_fields,
    src_in,
)
from bpfnet.ddos.fingerprint import Field as HeaderField
from bpfnet.ddos.sketches import CountMinSketch, SpaceSaving
from bpfnet.schema import MAX_SECONDS, STRICT, U32, U64

# Payload words beyond this offset may fall outside a 128-byte sample (Ethernet + IPv6 + TCP).
MAX_PAYLOAD_OFFSET = 48
# The rule compiler refuses longer expressions (bpfnet.ddos.config.MAX_EXPRESSION_CHARS).
MAX_EXPRESSION_CHARS = 1024
# The detector's rule ids come after the operator's, below the data plane's 4096.
MAX_DETECTOR_RULES = 1024
# Samples are Python objects of a few hundred bytes: bounds on what one config can make the agent hold.
MAX_SAMPLES_KEPT = 1_000_000
MAX_SAMPLES_HELD = 1 << 24
# Of the ok candidates, the most specific within this much coverage of the best is chosen.
COVERAGE_SLACK = 0.01
# A range predicate spans at most this share of its field's values: wider, it describes random
# values (a flood's random source ports), not a shape.
MAX_RANGE_SHARE = 1 / 8
# A range is widened by up to this share of its width on each side (never over a normal value):
# the attack's values just outside the sampled ones are likely too (a window may hold only a part
# of a range an attack walks through).
RANGE_MARGIN = 1 / 4



def _attack_of(track: _Track) -> _Attack:
    """The attack of a track known to be under one."""
    if track.attack is None:
        raise ValueError(f"{track.destination}: no attack in progress")
    return track.attack

class DetectorConfig(BaseModel):
    """How the detector learns, decides and what it may do. Rates are packets per second on
    the wire: sampled rate x `sample_every`."""

    model_config = ConfigDict(**STRICT, frozen=True)

    sample_every: Annotated[U32, Field(ge=1)] = Field(100, description="the data plane samples 1 packet in N")
    window: float = Field(0.25, gt=0, le=10, description="seconds per rate measurement")
    baseline_time_constant: float = Field(60.0, gt=0, le=MAX_SECONDS,
                                          description="EWMA time constant of baselines, s")
    learning_time: float = Field(5.0, ge=0, le=MAX_SECONDS,
                                 description="seconds after start when no attack is declared")
    attack_factor: float = Field(5.0, gt=1, le=1e6, description="attack when rate > factor x baseline ...")
    attack_floor_pps: float = Field(2000.0, gt=0, le=1e12, description="... and rate > this floor")
    hold_time: float = Field(5.0, gt=0, le=MAX_SECONDS,
                             description="attack over after this long below the threshold, s")
    rule_ttl: float = Field(30.0, gt=0, le=MAX_SECONDS,
                            description="rule expiry; extended while the attack lasts, s")
    refine_interval: float = Field(0.5, ge=0, le=MAX_SECONDS,
                                   description="minimum seconds between searches of one attack")
    target_coverage: float = Field(0.95, gt=0, le=1,
                                   description="share of the excess a signature should match")
    min_coverage: float = Field(0.5, gt=0, le=1, description="below this a signature is not deployed")
    max_collateral: float = Field(0.01, ge=0, lt=1,
                                  description="max share of normal samples a rule may match")
    max_known_sources: float = Field(0.5, ge=0, le=1,
                                     description="max share of matched attack samples from sources seen "
                                                 "in normal traffic (a heavy legitimate client)")
    max_rules: int = Field(8, ge=0, le=MAX_DETECTOR_RULES, description="rules the detector may own at once")
    allow_list: tuple[IPvAnyNetwork, ...] = Field((), description="source prefixes never matched by a rule")
    dry_run: bool = Field(False, description="report decisions, deploy nothing")
    payload_offsets: tuple[Annotated[int, Field(ge=0, le=MAX_PAYLOAD_OFFSET)], ...] = Field(
        (0, 4), description="payload word offsets a signature may fix")
    max_values_per_field: int = Field(4, ge=1, le=16, description="values one predicate may list")
    normal_samples: int = Field(2000, ge=10, le=MAX_SAMPLES_KEPT,
                                description="normal samples kept per destination")
    window_samples: int = Field(2000, ge=10, le=MAX_SAMPLES_KEPT,
                                description="samples kept per destination per window")
    learn_samples: int = Field(256, ge=1, le=MAX_SAMPLES_KEPT,
                               description="samples per destination per quiet window added to "
                                           "its normal profile (the rate counts them all)")
    min_attack_samples: int = Field(20, ge=1, le=MAX_SAMPLES_KEPT, description="samples needed to search a signature")
    max_destinations: int = Field(1024, ge=1, le=MAX_SAMPLES_KEPT,
                                  description="(address, protocol, port) destinations tracked at once; "
                                              "(address, protocol) aggregates always are")
    forget_after: float = Field(600.0, gt=0, le=MAX_SECONDS,
                                description="idle destinations are forgotten after, s")
    seed: U64 = Field(0, description="seed of the sample reservoir (decisions are reproducible)")

    @model_validator(mode="after")
    def _check(self) -> DetectorConfig:
        if self.min_coverage > self.target_coverage:
            raise ValueError(f"min_coverage ({self.min_coverage}) must be <= target_coverage "
                             f"({self.target_coverage})")
        if self.rule_ttl < 2 * (self.hold_time + self.window):
            raise ValueError(f"rule_ttl ({self.rule_ttl:g} s) must be at least 2 x (hold_time + window) = "
                             f"{2 * (self.hold_time + self.window):g} s, so a rule outlives the hold time")
        if len(set(self.payload_offsets)) != len(self.payload_offsets):
            raise ValueError(f"payload_offsets has duplicates: {list(self.payload_offsets)}")
        kept = (self.normal_samples + self.window_samples) * self.max_destinations
        if kept > MAX_SAMPLES_HELD:
            raise ValueError(f"(normal_samples + window_samples) x max_destinations = {kept:,} samples held "
                             f"in memory; the limit is {MAX_SAMPLES_HELD:,}")
        return self


# --- events ------------------------------------------------------------------------------------


class EventKind(str, enum.Enum):
    ATTACK_STARTED = "attack_started"
    ATTACK_ENDED = "attack_ended"
    RULE_ADDED = "rule_added"
    RULE_PROPOSED = "rule_proposed"  # dry run: the rule that would have been added
    RULE_EXTENDED = "rule_extended"
    RULE_REMOVED = "rule_removed"
    RULE_REFUSED = "rule_refused"  # a signature was found but the rule cap refused it
    NO_SIGNATURE = "no_signature"  # no candidate met the coverage and collateral bounds


@dataclass(frozen=True)
class Candidate:
    """One candidate fingerprint with its estimates over the samples searched."""

    expression: str
    description: str
    coverage: float  # estimated share of the excess (attack) traffic it matches
    collateral: float  # share of the destination's normal samples it matches
    known_sources: float  # share of its attack matches coming from sources seen in normal traffic
    attack_matches: int
    normal_matches: int
    verdict: str  # "chosen", "ok", "partial", "coverage", "collateral", "known sources", "too long"


@dataclass(frozen=True)
class Evidence:
    rate_pps: float
    baseline_pps: float
    threshold_pps: float
    window_samples: int = 0  # samples of the destination in the window
    searched_samples: int = 0  # attack-window samples the signature search looked at
    normal_samples: int = 0
    expected_normal_samples: float = 0.0  # of the searched samples, how many the baseline explains
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class DetectorRule:
    name: str
    expression: str
    destination: str
    description: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Event:
    time: float
    kind: EventKind
    destination: str
    message: str
    evidence: Evidence
    rule: DetectorRule | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d


# --- signature search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    chosen: Fingerprint | None
    candidates: tuple[Candidate, ...]
    expected_normal: float


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


def search_signature(scope: Destination, attack: Sequence[PacketFields], normal: NormalTraffic,
                     expected_normal: float, config: DetectorConfig) -> SearchResult:
    """Choose a fingerprint for the attack samples of `scope` (see the module docstring).

    `expected_normal` is how many of `attack` the baseline explains (legitimate traffic in the
    attack window); the rest is the excess a signature must cover.
    """
    allow = list(config.allow_list)
    attack = [p for p in attack if not any(src_in(p, net) for net in allow)]
    expected_normal = min(expected_normal, len(attack))
    if len(attack) < config.min_attack_samples:
        return SearchResult(None, (), expected_normal)
    excess = max(len(attack) - expected_normal, 1.0)
    predicates = _concentrated_predicates(scope, attack, normal, expected_normal, excess, config)
    normal_samples = list(normal.samples)

    # Bitsets over samples: bit i set = sample i matches. Conjunctions are ANDs of ints.
    attack_bits = {pred: _bits(pred, attack) for pred in predicates}
    normal_bits = {pred: _bits(pred, normal_samples) for pred in predicates}
    # A predicate over the same header bytes as an earlier (more specific) one, selecting exactly
    # its samples, adds nothing but length (`ip[6:2] = 0x0000`, then `ip[6] & 0xe0 = 0x00`).
    seen: set[tuple[str, int, int]] = set()
    distinct = []
    for pred in predicates:
        key = (pred.field.reads, attack_bits[pred], normal_bits[pred])
        if key not in seen:
            seen.add(key)
            distinct.append(pred)
    predicates = distinct
    all_attack, all_normal = (1 << len(attack)) - 1, (1 << len(normal_samples)) - 1
    normal_allowed = sum(1 << i for i, p in enumerate(normal_samples) if any(src_in(p, net) for net in allow))
    known = {p.src for p in normal_samples}
    known_bits = sum(1 << i for i, p in enumerate(attack) if p.src in known)

    def evaluate(preds: tuple[AnyPredicate, ...]) -> tuple[int, int]:
        a, n = all_attack, all_normal & ~normal_allowed
        for pred in preds:
            a &= attack_bits[pred]
            n &= normal_bits[pred]
        return a, n

    def recovered(preds: tuple[AnyPredicate, ...]) -> tuple[int, int]:
        a, n = evaluate(preds)
        return a.bit_count(), -n.bit_count()

    chain = [tuple(predicates)]
    while chain[-1]:  # generalise: drop the predicate whose removal recovers the most attack samples
        current = chain[-1]
        chain.append(max((tuple(q for q in current if q != pred) for pred in current), key=recovered))

    def score(preds: tuple[AnyPredicate, ...]) -> tuple[Fingerprint, Candidate]:
        a, n = evaluate(preds)
        collateral = n.bit_count() / len(normal_samples) if normal_samples else 0.0
        matched = a.bit_count()
        coverage = max(0.0, min(1.0, (matched - collateral * expected_normal) / excess))
        known_share = (a & known_bits).bit_count() / matched if matched else 0.0
        fp = Fingerprint(scope, preds).excluding(allow)
        expression = fp.expression()
        if len(expression) > MAX_EXPRESSION_CHARS:
            verdict = "too long"
        elif collateral > config.max_collateral:
            verdict = "collateral"
        elif known_share > config.max_known_sources:
            verdict = "known sources"
        elif coverage < config.min_coverage:
            verdict = "coverage"
        else:
            verdict = "ok" if coverage >= config.target_coverage else "partial"
        return fp, Candidate(expression, fp.describe(), round(coverage, 4), round(collateral, 4),
                             round(known_share, 4), matched, n.bit_count(), verdict)

    candidates = [score(preds) for preds in chain]

    # The most specific ok candidate, unless it gives up more than a point of coverage that a
    # less specific ok one has (a range stopped short by a normal value, say).
    best = max((c.coverage for _, c in candidates if c.verdict == "ok"), default=0.0)
    full = [i for i, (_, c) in enumerate(candidates) if c.verdict == "ok" and c.coverage >= best - COVERAGE_SLACK]
    partial = sorted((i for i, (_, c) in enumerate(candidates) if c.verdict == "partial"),
                     key=lambda i: -candidates[i][1].coverage)
    pick = full[0] if full else (partial[0] if partial else None)
    if pick is not None:
        fp, c = candidates[pick]
        # A range is fitted to one window, which may hold only part of what the attack sends (a
        # source port walked through, lengths that grow): it stays only where the rule needs it.
        kept = fp.predicates
        for pred in [q for q in kept if isinstance(q, RangePredicate)]:
            trial = tuple(q for q in kept if q is not pred)
            if score(trial)[1].verdict == c.verdict and score(trial)[1].coverage >= c.coverage:
                kept = trial
        if kept != fp.predicates:
            candidates.insert(pick + 1, score(kept))
            pick += 1
        fp, c = candidates[pick]
        candidates[pick] = (fp, replace(c, verdict="chosen"))
    return SearchResult(candidates[pick][0] if pick is not None else None,
                        tuple(c for _, c in candidates), expected_normal)


def _concentrated_predicates(scope: Destination, attack: Sequence[PacketFields], normal: NormalTraffic,
                             expected_normal: float, excess: float,
                             config: DetectorConfig) -> list[AnyPredicate]:
    """Per field, the most specific predicate that covers the excess and is at least twice as
    common in the attack samples as in normal traffic: a few exact values; else, for flag
    fields, a pattern of bits; else, for numeric fields, a narrow range."""
    predicates: list[AnyPredicate] = []
    have_prefix = False
    need = config.target_coverage * excess
    for f in search_fields(config.payload_offsets, with_dst_port=scope.port is None):
        if isinstance(f, SourcePrefix) and have_prefix:
            continue  # a more specific prefix already holds; shorter ones are implied
        top: SpaceSaving[int] = SpaceSaving(capacity=4 * config.max_values_per_field)
        values_seen: list[int] = []
        for p in attack:
            value = f.value(p)
            if value is not None:
                top.add(value)
                values_seen.append(value)
        values: set[int] = set()
        covered = normal_share = 0.0
        for hitter in top.top(config.max_values_per_field):
            values.add(hitter.key)
            share = normal.share(f, hitter.key)
            normal_share += share
            covered += hitter.guaranteed - share * expected_normal
            if covered >= need:
                break
        attack_share = sum(h.count for h in top.top() if h.key in values) / len(attack)
        if covered >= need and attack_share >= 2 * normal_share:
            predicates.append(Predicate(f, frozenset(values)))
            have_prefix = have_prefix or isinstance(f, SourcePrefix)
            continue
        if not values_seen or not (f.bit_pattern or f.ranged):
            continue
        normal_values = [v for p in normal.samples if (v := f.value(p)) is not None]
        found = (_bit_pattern(f, values_seen, normal_values, len(normal.samples), expected_normal, need)
                 if f.bit_pattern else
                 _value_range(f, values_seen, normal_values, len(normal.samples), expected_normal, need, config))
        if found is not None:
            pred, matched, normal_matched = found
            share_in_normal = normal_matched / len(normal.samples) if normal.samples else 0.0
            if matched / len(attack) >= 2 * share_in_normal:
                predicates.append(pred)
    return predicates


def _bit_pattern(f: HeaderField, values: list[int], normal_values: list[int], normal_count: int,
                 expected_normal: float, need: float) -> tuple[BitsPredicate, int, int] | None:
    """The bits of `f` (nearly) fixed in the attack values, as `f & mask = value`: bits are added
    from the most to the least constant while the pattern still covers `need` of the excess,
    then the ones normal traffic shares too are left out. None if no bit qualifies."""
    def counts(mask: int, value: int) -> tuple[int, int]:
        return (sum(1 for v in values if v & mask == value), sum(1 for v in normal_values if v & mask == value))

    def covered(mask: int, value: int) -> float:
        matched, normal_matched = counts(mask, value)
        return matched - (normal_matched / normal_count if normal_count else 0.0) * expected_normal

    ones = [sum(1 for v in values if v >> b & 1) for b in range(f.bits)]
    agreement = [max(n, len(values) - n) for n in ones]
    majority = [int(2 * n >= len(values)) for n in ones]
    mask = value = 0
    for b in sorted(range(f.bits), key=lambda b: -agreement[b]):
        if covered(mask | 1 << b, value | majority[b] << b) >= need:
            mask, value = mask | 1 << b, value | majority[b] << b
    # clear bits first (the set ones say what is odd about the attack), least constant first
    for b in sorted(range(f.bits), key=lambda b: (majority[b], agreement[b])):
        narrower = mask & ~(1 << b)
        if mask >> b & 1 and narrower and counts(narrower, value & narrower)[1] <= counts(mask, value)[1]:
            mask, value = narrower, value & narrower
    if not mask or mask == f.max_value or covered(mask, value) < need:
        return None  # no fixed bit, or all fixed: one value, which the exact search would have found
    return BitsPredicate(f, mask, value), *counts(mask, value)


def _value_range(f: HeaderField, values: list[int], normal_values: list[int], normal_count: int,
                 expected_normal: float, need: float,
                 config: DetectorConfig) -> tuple[RangePredicate, int, int] | None:
    """The interval of `f` holding the most attack values, at most MAX_RANGE_SHARE of the field
    wide and holding at most `max_collateral` of the normal samples; widened by RANGE_MARGIN
    on each side without taking in another normal value. None if it does not cover `need`."""
    attack_sorted, normal_sorted = sorted(values), sorted(normal_values)
    max_width = int((f.max_value + 1) * MAX_RANGE_SHARE)
    tolerated = int(config.max_collateral * normal_count)

    def normal_in(low: int, high: int) -> int:
        return bisect.bisect_right(normal_sorted, high) - bisect.bisect_left(normal_sorted, low)

    best: tuple[int, int, int] | None = None  # (count, -width, i) of the best window [i, j]
    best_j = i = 0
    for j, high in enumerate(attack_sorted):
        while i <= j and (high - attack_sorted[i] > max_width or normal_in(attack_sorted[i], high) > tolerated):
            i += 1
        if i > j:
            continue  # this value alone is common in normal traffic
        key = (j - i + 1, attack_sorted[i] - high, i)
        if best is None or key[:2] > best[:2]:
            best, best_j = key, j
    if best is None:
        return None
    low, high = attack_sorted[best[2]], attack_sorted[best_j]
    if low == high:
        return None  # one value: the exact search's business
    margin = max(1, int((high - low) * RANGE_MARGIN))
    below = bisect.bisect_left(normal_sorted, low)  # normal values < low
    above = bisect.bisect_right(normal_sorted, high)  # normal values <= high
    low = max(low - margin, normal_sorted[below - 1] + 1 if below else 0, 0)
    high = min(high + margin, normal_sorted[above] - 1 if above < len(normal_sorted) else f.max_value, f.max_value)
    if high - low + 1 >= f.max_value + 1:
        return None
    matched = bisect.bisect_right(attack_sorted, high) - bisect.bisect_left(attack_sorted, low)
    normal_matched = normal_in(low, high)
    share = normal_matched / normal_count if normal_count else 0.0
    if matched - share * expected_normal < need:
        return None
    return RangePredicate(f, low, high), matched, normal_matched


def _bits(pred: AnyPredicate, samples: Sequence[PacketFields]) -> int:
    bits = 0
    for i, p in enumerate(samples):
        if pred.matches(p):
            bits |= 1 << i
    return bits


# --- per-destination state --------------------------------------------------------------------


@dataclass
class _OwnedRule:
    rule: DetectorRule
    fingerprint: Fingerprint


@dataclass
class _Attack:
    started_at: float
    baseline_pps: float
    threshold_pps: float
    rules: list[_OwnedRule] = field(default_factory=list)
    below_since: float | None = None
    last_search: float = -math.inf
    reported: set[EventKind] = field(default_factory=set)


@dataclass
class _Window:
    """Samples of one destination in one window: a count and a bounded uniform reservoir."""

    count: int = 0
    samples: list[PacketFields] = field(default_factory=list)


class _Track:
    def __init__(self, destination: Destination, parent: _Track | None, config: DetectorConfig) -> None:
        self.destination = destination
        self.parent = parent
        self.baseline_pps = 0.0
        self.windows_learned = 0
        self.last_seen = -math.inf
        self.window = _Window()
        # The previous quiet window waits one window before it is learned: if the next window
        # is an attack, its samples may already hold the attack's start.
        self.pending: tuple[float, float, list[PacketFields]] | None = None
        fields = search_fields(config.payload_offsets, with_dst_port=destination.port is None)
        self.normal = NormalTraffic(fields, config.normal_samples, config.seed)
        self.attack: _Attack | None = None
        self.children_attacked = 0

    def add(self, p: PacketFields, now: float, cap: int, rng: random.Random) -> None:
        w = self.window
        w.count += 1
        self.last_seen = now
        if len(w.samples) < cap:
            w.samples.append(p)
        else:  # reservoir sampling keeps a uniform subset of the window
            j = rng.randrange(w.count)
            if j < cap:
                w.samples[j] = p

    def learn(self, rate: float, duration: float, samples: list[PacketFields],
              config: DetectorConfig) -> None:
        # Bias-corrected EWMA: a plain mean over the first windows, then exponential decay.
        self.windows_learned += 1
        alpha = max(1 - math.exp(-duration / config.baseline_time_constant), 1 / self.windows_learned)
        self.baseline_pps += alpha * (rate - self.baseline_pps)
        stride = max(1, -(-len(samples) // config.learn_samples))  # a spread-out subset is enough
        for p in samples[::stride]:
            self.normal.add(p)


# --- the detector -----------------------------------------------------------------------------


class Detector:
    """Sans-IO detector: `observe(samples, now)` as samples arrive, `decide(now)` about every
    window; both take the clock from the caller."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._tracks: dict[Destination, _Track] = {}
        self._started_at: float | None = None
        self._window_start: float | None = None
        self._rule_seq = 0
        self._port_tracks = 0
        self.counters: dict[str, int] = {"samples": 0, "samples_vlan": 0, "samples_port_untracked": 0,
                                         "windows": 0, **{kind.value: 0 for kind in EventKind}}

    # -- input --

    def observe(self, samples: Iterable[PacketFields], now: float) -> None:
        self._start(now)
        cap, tracks = self.config.window_samples, self._tracks
        for p in samples:
            self.counters["samples"] += 1
            if p.vlan is not None:  # no rule could match it (see PacketFields.vlan)
                self.counters["samples_vlan"] += 1
                continue
            # Every sample counts for its (address, protocol) aggregate, so a flood spread over
            # random ports is seen even when its ports are too many to track one by one.
            aggregate_key = Destination.of(p, with_port=False)
            aggregate = tracks.get(aggregate_key) or self._new_track(aggregate_key, None)
            aggregate.add(p, now, cap, self._rng)
            if p.dst_port is None or p.protocol not in PORT_PROTOCOLS:
                continue
            port_key = Destination.of(p, with_port=True)
            track = tracks.get(port_key)
            if track is None:
                if self._port_tracks >= self.config.max_destinations:
                    self.counters["samples_port_untracked"] += 1
                    continue
                track = self._new_track(port_key, aggregate)
            track.add(p, now, cap, self._rng)

    def _new_track(self, destination: Destination, parent: _Track | None) -> _Track:
        track = self._tracks[destination] = _Track(destination, parent, self.config)
        self._port_tracks += parent is not None
        return track

    def _start(self, now: float) -> float:
        """Start the clock on the first call; the current window's start."""
        if self._started_at is None or self._window_start is None:
            self._started_at = self._window_start = now
        return self._window_start

    # -- decisions --

    def decide(self, now: float) -> list[Event]:
        """Close the current window if it is over, and return the decisions taken."""
        duration = now - self._start(now)
        if duration < self.config.window:
            return []
        self._window_start = now
        self.counters["windows"] += 1
        events: list[Event] = []
        # Port-level destinations first, so an aggregate knows whether a port took the blame.
        for track in sorted(self._tracks.values(), key=lambda t: t.destination.port is None):
            self._close(track, now, duration, events)
        self._forget_idle(now)
        for event in events:
            self.counters[event.kind.value] += 1
        return events

    def _close(self, track: _Track, now: float, duration: float, events: list[Event]) -> None:
        cfg = self.config
        window, track.window = track.window, _Window()
        rate = window.count * cfg.sample_every / duration
        if track.attack is not None:
            self._continue_attack(track, window, rate, now, duration, events)
            return
        parent_attacked = track.parent is not None and track.parent.attack is not None
        related_attack = parent_attacked or track.children_attacked > 0
        if related_attack:
            track.pending = None  # traffic now is not normal; its parent/child is handling the attack
            return
        threshold = self._threshold(track.baseline_pps)
        learning = self._started_at is None or now - self._started_at < cfg.learning_time
        if rate > threshold and not learning:
            track.pending = None
            self._start_attack(track, window, rate, threshold, now, events)
            return
        if track.pending is not None:
            track.learn(*track.pending, cfg)
        track.pending = (rate, duration, window.samples)

    def _threshold(self, baseline_pps: float) -> float:
        return max(self.config.attack_factor * baseline_pps, self.config.attack_floor_pps)

    def _start_attack(self, track: _Track, window: _Window, rate: float, threshold: float, now: float,
                      events: list[Event]) -> None:
        track.attack = _Attack(started_at=now, baseline_pps=track.baseline_pps, threshold_pps=threshold)
        if track.parent is not None:
            track.parent.children_attacked += 1
        evidence = Evidence(round(rate, 1), round(track.baseline_pps, 1), round(threshold, 1), window.count)
        events.append(Event(now, EventKind.ATTACK_STARTED, str(track.destination),
                            f"{rate:.0f} pps > {threshold:.0f} pps (baseline {track.baseline_pps:.0f} pps)",
                            evidence))
        self._mitigate(track, window, window.samples, rate, now, events)

    def _continue_attack(self, track: _Track, window: _Window, rate: float, now: float, duration: float,
                         events: list[Event]) -> None:
        cfg, attack = self.config, _attack_of(track)
        if rate <= attack.threshold_pps:
            if attack.below_since is None:
                attack.below_since = now - duration
            if now - attack.below_since >= cfg.hold_time:
                self._end_attack(track, rate, now, events)
            return
        attack.below_since = None
        for owned in attack.rules:
            if owned.rule.expires_at - now < cfg.rule_ttl / 2:
                owned.rule = replace(owned.rule, expires_at=now + cfg.rule_ttl)
                if not cfg.dry_run:
                    events.append(Event(now, EventKind.RULE_EXTENDED, str(track.destination),
                                        f"{owned.rule.name} extended while the attack lasts",
                                        self._evidence(track, rate, window), owned.rule))
        # Refine: if what the rules miss still looks like an attack, search again on it.
        missed = [p for p in window.samples if not any(o.fingerprint.matches(p) for o in attack.rules)]
        missed_rate = rate * len(missed) / len(window.samples) if window.samples else 0.0
        if missed_rate > attack.threshold_pps and now - attack.last_search >= cfg.refine_interval:
            self._mitigate(track, window, missed, missed_rate, now, events)

    def _mitigate(self, track: _Track, window: _Window, samples: list[PacketFields], rate: float, now: float,
                  events: list[Event]) -> None:
        cfg, attack = self.config, _attack_of(track)
        attack.last_search = now
        # Of the searched samples, the share the baseline explains is legitimate traffic.
        expected_normal = len(samples) * min(1.0, attack.baseline_pps / rate) if rate else 0.0
        result = search_signature(track.destination, samples, track.normal, expected_normal, cfg)
        evidence = self._evidence(track, rate, window, searched=len(samples), result=result)
        destination = str(track.destination)
        if result.chosen is None:
            self._report_once(attack, events, Event(now, EventKind.NO_SIGNATURE, destination,
                                                    "no fingerprint covers the excess within the collateral "
                                                    "bound", evidence))
            return
        owned = len(self.rules())
        if owned >= cfg.max_rules:
            self._report_once(attack, events, Event(now, EventKind.RULE_REFUSED, destination,
                                                    f"rule cap reached ({owned}/{cfg.max_rules}): "
                                                    f"{result.chosen.expression()}", evidence))
            return
        self._rule_seq += 1
        rule = DetectorRule(name=f"auto-{self._rule_seq}", expression=result.chosen.expression(),
                            destination=destination, description=result.chosen.describe(),
                            created_at=now, expires_at=now + cfg.rule_ttl)
        attack.rules.append(_OwnedRule(rule, result.chosen))
        kind = EventKind.RULE_PROPOSED if cfg.dry_run else EventKind.RULE_ADDED
        chosen = next(c for c in result.candidates if c.verdict == "chosen")
        events.append(Event(now, kind, destination, f"{rule.name}: coverage {chosen.coverage:.1%}, "
                            f"collateral {chosen.collateral:.2%}", evidence, rule))

    @staticmethod
    def _report_once(attack: _Attack, events: list[Event], event: Event) -> None:
        """Searches repeat every refine_interval; a failure is worth one event per attack."""
        if event.kind not in attack.reported:
            attack.reported.add(event.kind)
            events.append(event)

    def _end_attack(self, track: _Track, rate: float, now: float, events: list[Event]) -> None:
        attack, destination = _attack_of(track), str(track.destination)
        evidence = Evidence(round(rate, 1), round(attack.baseline_pps, 1), round(attack.threshold_pps, 1))
        if not self.config.dry_run:
            for owned in attack.rules:
                events.append(Event(now, EventKind.RULE_REMOVED, destination,
                                    f"{owned.rule.name} removed: attack over", evidence, owned.rule))
        events.append(Event(now, EventKind.ATTACK_ENDED, destination,
                            f"below {attack.threshold_pps:.0f} pps for {self.config.hold_time:g} s "
                            f"(lasted {now - attack.started_at:.1f} s)", evidence))
        track.attack = None
        if track.parent is not None:
            track.parent.children_attacked -= 1

    def _evidence(self, track: _Track, rate: float, window: _Window, searched: int = 0,
                  result: SearchResult | None = None) -> Evidence:
        attack = _attack_of(track)
        return Evidence(round(rate, 1), round(attack.baseline_pps, 1), round(attack.threshold_pps, 1),
                        window.count, searched, len(track.normal.samples),
                        round(result.expected_normal, 1) if result else 0.0,
                        result.candidates if result else ())

    def _forget_idle(self, now: float) -> None:
        # A parent sees every sample of its children, so an idle parent has only idle children.
        idle = [d for d, t in self._tracks.items() if t.attack is None and not t.children_attacked
                and now - t.last_seen > self.config.forget_after]
        for destination in idle:
            self._port_tracks -= self._tracks.pop(destination).parent is not None

    # -- queries --

    def rules(self) -> list[DetectorRule]:
        """The rules the detector owns now (proposals in dry-run mode)."""
        return [o.rule for t in self._tracks.values() if t.attack is not None for o in t.attack.rules]

    def status(self) -> dict[str, Any]:
        attacks = [{"destination": str(t.destination), "since": t.attack.started_at,
                    "baseline_pps": round(t.attack.baseline_pps, 1),
                    "threshold_pps": round(t.attack.threshold_pps, 1),
                    "rules": [o.rule.name for o in t.attack.rules]}
                   for t in self._tracks.values() if t.attack is not None]
        return {"dry_run": self.config.dry_run, "destinations": len(self._tracks), "attacks": attacks,
                "rules": [asdict(r) for r in self.rules()], "counters": dict(self.counters)}

    def baseline(self, destination: Destination) -> float | None:
        track = self._tracks.get(destination)
        return track.baseline_pps if track else None
