"""Detector configuration, baselines, windows and destination bookkeeping (no scapy needed:
samples are built as PacketFields directly)."""

import ipaddress

import pytest
from pydantic import ValidationError

from bpfnet.ddos import config as ddos_config
from bpfnet.ddos.detector import Detector
from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.detector_events import EventKind
from bpfnet.ddos.fingerprint import Destination, PacketFields
from bpfnet.ddos.signature import MAX_EXPRESSION_CHARS

SERVER = int(ipaddress.ip_address("198.51.100.10"))
CONFIG = DetectorConfig(sample_every=10, window=1.0, learning_time=5, hold_time=2, baseline_time_constant=10)


def sample(dport: int = 80, protocol: int = 6, src: int = 0x64400001, **fields) -> PacketFields:
    base = dict(family=4, protocol=protocol, src=src, dst=SERVER, ttl=64, ip_length=60, ip_id=1, frag=0x4000,
                src_port=40000, dst_port=dport, tcp_flags=0x10 if protocol == 6 else None)
    return PacketFields(**{**base, **fields})


def feed(detector: Detector, per_second: dict[int, int], start: float, end: float, **fields):
    """`per_second` samples/s to each destination port, in one batch per 1 s window."""
    events = []
    t = start
    while t < end:
        t += 1.0
        batch = [sample(dport=port, src=0x64400000 + i, **fields)
                 for port, n in per_second.items() for i in range(n)]
        detector.observe(batch, t)
        events += detector.decide(t)
    return events


@pytest.mark.parametrize("update,message", [
    ({"attack_factor": 1.0}, "attack_factor\n  Input should be greater than 1"),
    ({"sample_every": 0}, "sample_every\n  Input should be greater than or equal to 1"),
    ({"window": 0}, "window\n  Input should be greater than 0"),
    ({"max_collateral": 1.0}, "max_collateral\n  Input should be less than 1"),
    ({"min_coverage": 0.99, "target_coverage": 0.9}, "min_coverage (0.99) must be <= target_coverage (0.9)"),
    ({"payload_offsets": [0, 64]}, "payload_offsets.1\n  Input should be less than or equal to 48"),
    ({"payload_offsets": [4, 4]}, "payload_offsets has duplicates: [4, 4]"),
    ({"hold_time": 10, "rule_ttl": 15}, "rule_ttl (15 s) must be at least 2 x (hold_time + window) = 20.5 s"),
    ({"allow_list": ["10.0.0.1/8"]}, "allow_list.0"),
    ({"allow_list": ["not-a-prefix"]}, "allow_list.0"),
    ({"max_rule": 3}, "max_rule\n  Extra inputs are not permitted"),
])
def test_config_rejects_bad_values_naming_the_field(update, message):
    with pytest.raises(ValidationError) as info:
        DetectorConfig(**update)
    assert message in str(info.value)


def test_expression_limit_is_the_rule_compilers():
    assert MAX_EXPRESSION_CHARS == ddos_config.MAX_EXPRESSION_CHARS


def test_config_accepts_prefixes_of_both_families():
    config = DetectorConfig(allow_list=["10.0.0.0/8", "2001:db8::/32"])
    assert [n.version for n in config.allow_list] == [4, 6]


def test_baseline_converges_to_the_rate_per_destination():
    detector = Detector(CONFIG)
    feed(detector, {80: 30, 443: 10}, 0, 60)
    assert detector.baseline(Destination(4, SERVER, 6, 80)) == pytest.approx(300, rel=0.01)
    assert detector.baseline(Destination(4, SERVER, 6, 443)) == pytest.approx(100, rel=0.01)
    assert detector.baseline(Destination(4, SERVER, 6)) == pytest.approx(400, rel=0.01)  # the aggregate


def test_baseline_decays_when_traffic_stops():
    detector = Detector(CONFIG)
    feed(detector, {80: 30}, 0, 30)
    feed(detector, {}, 30, 40)
    # Ten windows at the 10 s time constant: e^-1 of the old rate is left (one window still pending).
    assert detector.baseline(Destination(4, SERVER, 6, 80)) == pytest.approx(300 * 0.3679, rel=0.15)


def test_no_attack_while_learning():
    detector = Detector(CONFIG)
    assert not feed(detector, {80: 2000}, 0, 4)


def test_attack_needs_both_factor_and_floor():
    config = CONFIG.model_copy(update={"attack_floor_pps": 5000})
    detector = Detector(config)
    feed(detector, {80: 10}, 0, 20)  # baseline 100 pps
    assert not feed(detector, {80: 400}, 20, 22)  # 40x the baseline but below the 5000 pps floor
    events = feed(detector, {80: 600}, 22, 23)
    assert [e.kind for e in events][:1] == [EventKind.ATTACK_STARTED]
    assert events[0].evidence.threshold_pps == 5000.0


def test_port_level_attack_suppresses_the_aggregate():
    detector = Detector(CONFIG)
    feed(detector, {80: 30, 443: 30}, 0, 20)
    events = feed(detector, {80: 1000, 443: 30}, 20, 21)
    started = [e.destination for e in events if e.kind == EventKind.ATTACK_STARTED]
    assert started == ["198.51.100.10 tcp port 80"]


def test_random_port_flood_is_seen_by_the_aggregate_beyond_the_port_cap():
    config = CONFIG.model_copy(update={"max_destinations": 50})
    detector = Detector(config)
    feed(detector, {53: 20}, 0, 20, protocol=17)
    flood = [sample(dport=1024 + i, protocol=17, src=(i * 2654435761) % (1 << 32), src_port=53)
             for i in range(3000)]
    detector.observe(flood, 20.5)
    events = detector.decide(21)
    assert [e.destination for e in events if e.kind == EventKind.ATTACK_STARTED] == ["198.51.100.10 udp"]
    assert [e.rule.expression for e in events if e.kind == EventKind.RULE_ADDED] == [
        "dst host 198.51.100.10 and udp and udp src port 53"]
    assert detector.counters["samples_port_untracked"] > 0


def test_idle_destinations_are_forgotten():
    config = CONFIG.model_copy(update={"forget_after": 30})
    detector = Detector(config)
    feed(detector, {80: 5, 443: 5}, 0, 10)
    feed(detector, {80: 5}, 10, 50)
    assert detector.baseline(Destination(4, SERVER, 6, 443)) is None
    assert detector.baseline(Destination(4, SERVER, 6, 80)) is not None
    assert detector.status()["destinations"] == 2  # port 80 and its aggregate


def test_decide_before_a_window_is_over_decides_nothing():
    detector = Detector(CONFIG)
    detector.observe([sample()] * 5000, 0.0)
    assert detector.decide(0.5) == []
    assert detector.counters["windows"] == 0
