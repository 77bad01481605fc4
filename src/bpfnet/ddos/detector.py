"""The DDoS detector: sampled packets in, rule decisions out (sans-IO, clock passed in).

Per destination (address, protocol, port) and per (address, protocol) aggregate, the detector
learns a packet-rate baseline online and declares an attack when a window's rate exceeds
`attack_factor` x baseline and `attack_floor_pps`. It then searches a signature over the
attack window's samples against the destination's normal samples (`bpfnet.ddos.signature`,
against the profile of `bpfnet.ddos.normal_traffic`).

Rules expire unless extended; they are extended while the attack lasts and removed once the
rate stayed below the threshold for `hold_time`. Every decision is an `Event` with its evidence
(`bpfnet.ddos.detector_events`); the configuration and its bounds are in
`bpfnet.ddos.detector_config`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.detector_events import DetectorRule, Event, EventKind, Evidence
from bpfnet.ddos.fingerprint import PORT_PROTOCOLS, Destination, Fingerprint, PacketFields, search_fields
from bpfnet.ddos.normal_traffic import NormalTraffic
from bpfnet.ddos.signature import SearchResult, search_signature, syn_flood_fingerprint

__all__ = ["Detector", "DetectorConfig"]  # the config with the class it configures (bench, docs)


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




def _attack_of(track: _Track) -> _Attack:
    """The attack of a track known to be under one."""
    if track.attack is None:
        raise ValueError(f"{track.destination}: no attack in progress")
    return track.attack


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
        action, chosen_fp, flood = "drop", result.chosen, None
        # the fallback of an attack nothing describes yet (a remainder a drop rule leaves is refined
        # with drop rules: every rule the detector adds then keeps within max_collateral)
        if chosen_fp is None and cfg.syn_cookies and not attack.rules:
            flood = syn_flood_fingerprint(track.destination, samples, list(track.normal.samples), expected_normal,
                                          cfg)
            if flood is not None:
                action, chosen_fp = "syncookie", flood.fingerprint
        if chosen_fp is None:
            self._report_once(attack, events, Event(now, EventKind.NO_SIGNATURE, destination,
                                                    "no fingerprint covers the excess within the collateral "
                                                    "bound", evidence))
            return
        owned = len(self.rules())
        if owned >= cfg.max_rules:
            self._report_once(attack, events, Event(now, EventKind.RULE_REFUSED, destination,
                                                    f"rule cap reached ({owned}/{cfg.max_rules}): "
                                                    f"{chosen_fp.expression()}", evidence))
            return
        self._rule_seq += 1
        rule = DetectorRule(name=f"auto-{self._rule_seq}", expression=chosen_fp.expression(),
                            destination=destination, description=chosen_fp.describe(),
                            created_at=now, expires_at=now + cfg.rule_ttl, action=action)
        attack.rules.append(_OwnedRule(rule, chosen_fp))
        kind = EventKind.RULE_PROPOSED if cfg.dry_run else EventKind.RULE_ADDED
        if flood is not None:
            message = (f"{rule.name}: syncookie — no narrow signature, SYNs are {flood.coverage:.1%} of the "
                       "excess (real clients' SYNs are answered too, and connect)")
        else:
            chosen = next(c for c in result.candidates if c.verdict == "chosen")
            message = f"{rule.name}: coverage {chosen.coverage:.1%}, collateral {chosen.collateral:.2%}"
        events.append(Event(now, kind, destination, message, evidence, rule))

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
