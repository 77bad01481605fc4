"""Autopilot: ring records in (decoded by bpfnet.ddos.samples), rule changes out through a sink."""

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from bpfnet.ddos.autopilot import Autopilot, DeployedRules, describe
from bpfnet.ddos.config import DdosState, Rule
from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.detector_events import DetectorRule
from bpfnet.ddos.ruleset import MAX_RULES
from bpfnet.ddos.samples import RECORD, decode

SERVER = "198.51.100.10"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
CONFIG = DetectorConfig(sample_every=10, window=0.25, learning_time=2, hold_time=1, rule_ttl=4)


def record(frame: bytes, verdict: int = 2, rule: int = 0) -> bytes:
    """A ddos_samples ring record as the XDP stage writes it (first 128 bytes of the frame)."""
    cap = frame[:128]
    return RECORD.pack(0, rule, 0, verdict, len(cap), len(frame), 1) + cap


def frames(make, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(ETH / make(rng)) for _ in range(count)]


LEGIT = frames(lambda r: IP(src=f"100.64.{r.randrange(256)}.{r.randrange(1, 255)}", dst=SERVER, flags="DF")
               / TCP(sport=r.randrange(32768, 61000), dport=80, flags=r.choice(["S", "A", "PA"]),
                     options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]), 200, seed=1)
SYN_FLOOD = frames(lambda r: IP(src=".".join(str(r.randrange(1, 224)) for _ in range(4)), dst=SERVER,
                                ttl=r.randrange(30, 250), id=r.randrange(65536))
                   / TCP(sport=r.randrange(1024, 65536), dport=80, flags="S", window=r.randrange(1, 65536)),
                   200, seed=2)


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self.fail = False

    def add(self, rule: DetectorRule) -> None:
        if self.fail:
            raise RuntimeError("data plane refused the rule")
        self.calls.append(("add", rule.name, rule.expires_at))

    def extend(self, rule: DetectorRule) -> None:
        self.calls.append(("extend", rule.name, rule.expires_at))

    def remove(self, rule: DetectorRule) -> None:
        self.calls.append(("remove", rule.name, rule.expires_at))


def run(autopilot: Autopilot, attack_from: float, attack_to: float, end: float, tick: float = 0.05):
    """Legit at 2000 pps, SYN flood at 30000 pps in (attack_from, attack_to]; records as the ring has them."""
    rng = random.Random(3)
    now, carry = 0.0, [0.0, 0.0]
    while now < end - 1e-9:
        now = round(now + tick, 9)
        batch = []
        sources = [(LEGIT, 2000, True), (SYN_FLOOD, 30000, attack_from < now <= attack_to)]
        for i, (pool, pps, on) in enumerate(sources):
            if on:
                carry[i] += pps * tick / CONFIG.sample_every
                batch += [decode(record(f)) for f in rng.choices(pool, k=int(carry[i]))]
                carry[i] -= int(carry[i])
        autopilot.on_samples(batch)
        autopilot.tick(now)


def test_rule_added_extended_and_removed_through_the_sink():
    sink = RecordingSink()
    autopilot = Autopilot(CONFIG, sink)
    run(autopilot, 5.0, 10.0, 13.0)
    assert [c[0] for c in sink.calls][0] == "add" and [c[0] for c in sink.calls][-1] == "remove"
    assert {c[1] for c in sink.calls} == {"auto-1"}
    assert sum(c[0] == "extend" for c in sink.calls) >= 2  # 5 s of attack, 4 s ttl
    added_at = next(e for e in autopilot.events() if e["kind"] == "rule_added")["time"]
    assert 5.0 < added_at <= 5.5
    assert autopilot.detector.rules() == []


def test_events_are_numbered_for_followers():
    autopilot = Autopilot(CONFIG, RecordingSink())
    run(autopilot, 5.0, 6.0, 8.0)
    events = autopilot.events()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["kind"] for e in autopilot.events(since=2)] == [e["kind"] for e in events[2:]]
    assert autopilot.events(since=events[-1]["seq"]) == []
    assert len(autopilot.events(limit=1)) == 1
    added = next(e for e in events if e["kind"] == "rule_added")
    line = describe(added)
    assert "rule_added" in line and added["rule"]["expression"] in line
    assert "chosen" in [c["verdict"] for c in added["evidence"]["candidates"]]


def test_dry_run_sends_nothing_to_the_sink():
    sink = RecordingSink()
    autopilot = Autopilot(CONFIG.model_copy(update={"dry_run": True}), sink)
    run(autopilot, 5.0, 10.0, 13.0)
    assert sink.calls == []
    assert "rule_proposed" in [e["kind"] for e in autopilot.events()]
    autopilot.close()
    assert sink.calls == []


def test_close_withdraws_the_detector_rules():
    sink = RecordingSink()
    autopilot = Autopilot(CONFIG, sink)
    run(autopilot, 5.0, 20.0, 6.0)
    assert [c[0] for c in sink.calls] == ["add"]
    autopilot.close()
    assert [c[:2] for c in sink.calls] == [("add", "auto-1"), ("remove", "auto-1")]


def test_sink_failure_is_counted_and_detection_goes_on():
    sink = RecordingSink()
    sink.fail = True
    autopilot = Autopilot(CONFIG, sink)
    run(autopilot, 5.0, 6.0, 9.0)
    assert autopilot.status()["sink_errors"] == 1
    assert "attack_ended" in [e["kind"] for e in autopilot.events()]


def test_non_ip_samples_are_counted_not_fed():
    autopilot = Autopilot(CONFIG, RecordingSink())
    autopilot.on_samples([decode(record(bytes(ETH / ARP())))])
    autopilot.tick(1.0)
    assert autopilot.status()["samples_not_ip"] == 1 and autopilot.status()["counters"]["samples"] == 0


def test_deployed_rules_are_valid_ddos_rules_after_the_operators():
    deployed = DeployedRules(to_wall=lambda t: 1_700_000_000 + t)
    autopilot = Autopilot(CONFIG, deployed)
    run(autopilot, 5.0, 20.0, 6.0)
    [rule] = deployed.rules()
    assert isinstance(rule, Rule) and rule.id == MAX_RULES - 1 and rule.action == "drop"
    assert "tcp[tcpflags] = tcp-syn" in rule.expr and rule.comment.startswith("auto-1 (detector): ")
    [owned] = autopilot.detector.rules()
    assert rule.expires == pytest.approx(1_700_000_000 + owned.expires_at)
    # The controller deploys the operator's rules first: the combined set is a valid state.
    operator = DdosState(rules=[Rule(expr="src net 100.64.0.0/16", action="pass")])
    combined = DdosState(rules=[*operator.rules, *deployed.rules()])
    assert [r.id for r in combined.rules] == [1, MAX_RULES - 1]


def test_deployed_rules_versions_and_ids():
    deployed = DeployedRules(to_wall=lambda t: t)
    first = DetectorRule("auto-1", "udp src port 53", "x", "", 0.0, 10.0)
    second = DetectorRule("auto-2", "udp src port 123", "x", "", 0.0, 10.0)
    deployed.add(first)
    deployed.add(second)
    assert [r.id for r in deployed.rules()] == [MAX_RULES - 1, MAX_RULES - 2] and deployed.version == 2
    deployed.extend(DetectorRule("auto-1", "udp src port 53", "x", "", 0.0, 20.0))
    assert deployed.rules()[0].expires == 20.0 and deployed.version == 2  # no redeploy needed
    deployed.remove(first)
    deployed.remove(first)  # already gone: no change
    deployed.extend(first)  # unknown: ignored
    assert [r.id for r in deployed.rules()] == [MAX_RULES - 2] and deployed.version == 3
    deployed.add(first)  # the freed id is reused
    assert sorted(r.id for r in deployed.rules()) == [MAX_RULES - 2, MAX_RULES - 1]
