"""The detector at work: sampled packets in, rule changes out through a `RuleSink`.

`Autopilot` is as sans-IO as the detector: its owner (the ddos controller) hands it samples as
they are drained from the ring (`on_samples`, a `DdosController.sample_listeners` entry) and
calls `tick(now)` with the agent's monotonic clock. Each decision is kept, numbered, for
`bpfnet ddos events`, and carried out through the sink:

- `rule_added` -> sink.add, `rule_extended` -> sink.extend, `rule_removed` -> sink.remove;
- dry run: the detector only proposes (`rule_proposed`), nothing reaches the sink.

`DeployedRules` is the sink the controller uses: the detector's rules as ddos `Rule`s (action
drop, unix-time expiry) that it deploys after the operator's rules, so an operator's `pass`
rule always wins. Their ids count down from the top of the id space, away from the operator's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from bpfnet.ddos.config import Rule
from bpfnet.ddos.detector import Detector
from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.detector_events import DetectorRule, Event, EventKind
from bpfnet.ddos.fingerprint import PacketFields
from bpfnet.ddos.ruleset import MAX_RULES
from bpfnet.ddos.samples import Sample

log = logging.getLogger(__name__)


class RuleSink(Protocol):
    """Where the detector's rule decisions go (the data plane, a test's list, ...)."""

    def add(self, rule: DetectorRule) -> None: ...

    def extend(self, rule: DetectorRule) -> None: ...

    def remove(self, rule: DetectorRule) -> None: ...


class Autopilot:
    """A detector wired to a rule sink, with a numbered history of its events."""

    def __init__(self, config: DetectorConfig, sink: RuleSink, history: int = 1000) -> None:
        self.config = config
        self.detector = Detector(config)
        self.sink = sink
        self._pending: list[PacketFields] = []
        self._history: deque[tuple[int, Event]] = deque(maxlen=history)
        self._seq = 0
        self.counters = {"samples_not_ip": 0, "sink_errors": 0}

    def on_samples(self, samples: Iterable[Sample | PacketFields]) -> None:
        """Queue drained samples (ring records or parsed fields) for the next tick."""
        for sample in samples:
            fields = sample.fields if isinstance(sample, Sample) else sample
            if fields is None:
                self.counters["samples_not_ip"] += 1
            else:
                self._pending.append(fields)

    def tick(self, now: float) -> list[Event]:
        """Feed the queued samples, take the window's decisions and carry them out."""
        pending, self._pending = self._pending, []
        self.detector.observe(pending, now)
        events = self.detector.decide(now)
        actions = {EventKind.RULE_ADDED: self.sink.add, EventKind.RULE_EXTENDED: self.sink.extend,
                   EventKind.RULE_REMOVED: self.sink.remove}
        for event in events:
            self._seq += 1
            self._history.append((self._seq, event))
            if event.kind in actions and event.rule is not None:  # dry run: only rule_proposed
                self._carry_out(actions[event.kind], event.rule)
        return events

    def _carry_out(self, action: Callable[[DetectorRule], None], rule: DetectorRule) -> None:
        try:
            action(rule)
        except Exception:  # the detector goes on; the failure is counted and logged
            self.counters["sink_errors"] += 1
            log.exception("%s(%s) failed", action.__name__, rule.name)

    def close(self) -> None:
        """Withdraw every rule the detector owns (auto mode switched off)."""
        if not self.config.dry_run:
            for rule in self.detector.rules():
                self._carry_out(self.sink.remove, rule)

    def events(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Events numbered above `since`, oldest first (`seq` lets a follower resume)."""
        selected = [{"seq": seq, **event.to_dict()} for seq, event in self._history if seq > since]
        return selected[-limit:] if limit else selected

    def status(self) -> dict[str, Any]:
        return {**self.detector.status(), "events": self._seq, **self.counters}


class DeployedRules:
    """The detector's rules as ddos `Rule`s, for the controller to deploy after its own.

    `version` grows when a rule is added or removed, so the owner knows when to redeploy (an
    extension only moves `Rule.expires`, which the owner checks itself). `to_wall` turns the
    detector's monotonic times into the unix times of `Rule.expires`.
    """

    def __init__(self, to_wall: Callable[[float], float] | None = None,
                 first_id: int = MAX_RULES - 1) -> None:
        self._to_wall = to_wall or (lambda t: time.time() + (t - time.monotonic()))
        self._first_id = first_id
        self._rules: dict[str, Rule] = {}
        self.version = 0

    def add(self, rule: DetectorRule) -> None:
        taken = {r.id for r in self._rules.values()}
        rule_id = next(i for i in range(self._first_id, 0, -1) if i not in taken)
        self._rules[rule.name] = Rule(id=rule_id, expr=rule.expression, action=rule.action,
                                      expires=self._to_wall(rule.expires_at),
                                      comment=f"{rule.name} (detector): {rule.description}")
        self.version += 1

    def extend(self, rule: DetectorRule) -> None:
        current = self._rules.get(rule.name)
        if current is not None:  # None: its add was refused (and counted) earlier
            self._rules[rule.name] = current.model_copy(update={"expires": self._to_wall(rule.expires_at)})

    def remove(self, rule: DetectorRule) -> None:
        if self._rules.pop(rule.name, None) is not None:
            self.version += 1

    def rules(self) -> list[Rule]:
        """In the order the detector added them."""
        return list(self._rules.values())


def describe(event: dict[str, Any]) -> str:
    """One line per event for people (`bpfnet ddos events`)."""
    rule = event.get("rule")
    tail = f"  {rule['expression']}" if rule and event["kind"] in ("rule_added", "rule_proposed") else ""
    return f"{event['seq']:>5} {event['time']:>10.2f}  {event['kind']:<14} {event['destination']:<28} " \
           f"{event['message']}{tail}"
