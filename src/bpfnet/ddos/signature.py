"""The signature search: a fingerprint for an attack window's samples, searched against the
destination's normal samples (`bpfnet.ddos.normal_traffic.NormalTraffic`):

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

When nothing qualifies and the excess is TCP SYNs (a flood from random spoofed sources looks like
real clients' SYNs: collateral), `syn_flood_fingerprint` gives the fallback: the destination's
SYNs, for a syncookie rule — harmless to real clients, whose SYNs it also matches (they get a
cookie SYN-ACK and complete the handshake through SYNPROXY).
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.fingerprint import (
    DST_PORT,
    TCP,
    TCP_FLAGS,
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
from bpfnet.ddos.normal_traffic import NormalTraffic
from bpfnet.ddos.sketches import SpaceSaving

# The rule compiler refuses longer expressions (bpfnet.ddos.config.MAX_EXPRESSION_CHARS).
MAX_EXPRESSION_CHARS = 1024
# Of the ok candidates, the most specific within this much coverage of the best is chosen.
COVERAGE_SLACK = 0.01
# A range predicate spans at most this share of its field's values: wider, it describes random
# values (a flood's random source ports), not a shape.
MAX_RANGE_SHARE = 1 / 8
# A range is widened by up to this share of its width on each side (never over a normal value):
# the attack's values just outside the sampled ones are likely too (a window may hold only a part
# of a range an attack walks through).
RANGE_MARGIN = 1 / 4


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
class SearchResult:
    chosen: Fingerprint | None
    candidates: tuple[Candidate, ...]
    expected_normal: float



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



SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01


def is_syn(p: PacketFields) -> bool:
    """A connection request: SYN without ACK, RST or FIN."""
    return p.tcp_flags is not None and p.tcp_flags & (SYN | ACK | RST | FIN) == SYN


@dataclass(frozen=True)
class SynFlood:
    fingerprint: Fingerprint
    coverage: float  # estimated share of the excess that is SYNs (beyond the normal share of SYNs)


def syn_flood_fingerprint(scope: Destination, attack: Sequence[PacketFields], normal: Sequence[PacketFields],
                          expected_normal: float, config: DetectorConfig) -> SynFlood | None:
    """SYNs to `scope` (and, for a scope of any port, to the few ports that take the attack's
    SYNs: at most `max_values_per_field` covering `target_coverage` of them), allow-listed sources
    excluded, when they cover at least `min_coverage` of the excess; None otherwise (not TCP, not
    SYNs, SYNs to spread ports, an expression too long)."""
    # as few samples as the signature search refuses to judge are too few to answer every SYN of
    # the destination either: the next window, fuller, may hold a narrow signature
    if scope.protocol != TCP or len(attack) < config.min_attack_samples:
        return None
    excess = len(attack) - expected_normal
    if excess <= 0:
        return None
    syns = [p for p in attack if scope.contains(p) and is_syn(p)]
    normal_share = sum(map(is_syn, normal)) / len(normal) if normal else 0.0
    coverage = min(1.0, (len(syns) - expected_normal * normal_share) / excess)
    if coverage < config.min_coverage:
        return None
    predicates: tuple[AnyPredicate, ...] = (BitsPredicate(TCP_FLAGS, SYN | ACK, SYN),)
    if scope.port is None:
        ports = collections.Counter(p.dst_port for p in syns if p.dst_port is not None)
        top = frozenset(port for port, _ in ports.most_common(config.max_values_per_field))
        if sum(p.dst_port in top for p in syns) < config.target_coverage * len(syns):
            return None
        predicates = (Predicate(DST_PORT, top), *predicates)
    fingerprint = Fingerprint(scope, predicates).excluding(list(config.allow_list))  # never matched, as ever
    if len(fingerprint.expression()) > MAX_EXPRESSION_CHARS:
        return None
    return SynFlood(fingerprint, round(coverage, 4))
