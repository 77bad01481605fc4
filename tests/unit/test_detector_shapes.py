"""The detector on synthetic sampled traffic: four attack shapes, negatives, guard rails.

Frames are built with scapy once per pool (deterministic seeds) and drawn from the pools at
exact rates in simulated time, so every run feeds the detector the same stream: the tests assert
on decisions, never on wall-clock timing. Every rule expression is checked with libpcap's own
interpreter (bpfnet.ddos.pcap) on the pools' full frames: that is the reference for coverage and
collateral.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfnet.ddos.detector import Detector
from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.detector_events import Event, EventKind
from bpfnet.ddos.fingerprint import Destination, PacketFields, search_fields
from bpfnet.ddos.normal_traffic import NormalTraffic
from bpfnet.ddos.pcap import CompiledFilter, compile_filter
from bpfnet.ddos.signature import search_signature

SERVER = "198.51.100.10"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
SAMPLE_BYTES = 128  # the data plane samples the first 128 bytes of a frame
TCP_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


@dataclass(frozen=True)
class Pool:
    """Frames of one kind of traffic and their parsed (sample-truncated) fields."""

    name: str
    frames: tuple[bytes, ...]
    fields: tuple[PacketFields, ...] = field(repr=False)

    @classmethod
    def build(cls, name: str, make: Callable[[random.Random], object], size: int, seed: int) -> Pool:
        rng = random.Random(seed)
        frames = tuple(bytes(ETH / make(rng)) for _ in range(size))
        return cls(name, frames, tuple(PacketFields.from_frame(f[:SAMPLE_BYTES]) for f in frames))

    def match_share(self, expression: str) -> float:
        """Share of the pool's full frames libpcap's interpreter accepts (the reference)."""
        compiled = CompiledFilter.from_expr(expression)
        return sum(compiled.matches(f) for f in self.frames) / len(self.frames)


def _client(rng: random.Random, base: str) -> str:
    return str(ipaddress.ip_address(base) + rng.randrange(1, 1 << 16))


def legit_packet(rng: random.Random, clients: list[str]):
    """A client of the server: HTTP over TCP 80 (60%), DNS queries to UDP 53 (35%), pings (5%)."""
    src = rng.choice(clients)
    ip = IP(src=src, dst=SERVER, ttl=rng.choice([64, 128]) - rng.randrange(4, 20), id=rng.randrange(65536),
            flags="DF")
    kind = rng.random()
    if kind < 0.60:
        flags = rng.choice(["S", "A", "A", "PA", "PA", "FA"])
        options = TCP_OPTIONS if flags == "S" else [("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]
        payload = rng.randbytes(rng.randrange(1, 1400)) if flags == "PA" else b""
        return ip / TCP(sport=rng.randrange(32768, 61000), dport=80, flags=flags, seq=rng.randrange(1 << 32),
                        window=rng.choice([64240, 65535, 502]), options=options) / Raw(payload)
    if kind < 0.95:
        name = rng.choice(["example.com", "www.example.org", "api.example.net", "cdn.example.com"])
        return ip / UDP(sport=rng.randrange(1024, 65536), dport=53) / DNS(id=rng.randrange(65536),
                                                                           qd=DNSQR(qname=name))
    return ip / ICMP(id=rng.randrange(65536)) / Raw(rng.randbytes(56))


@cache
def legit_clients(seed: int = 1, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [_client(rng, "100.64.0.0") if i % 2 else _client(rng, "172.16.0.0") for i in range(count)]


@cache
def legit_pool() -> Pool:
    clients = legit_clients()
    return Pool.build("legit", lambda rng: legit_packet(rng, clients), 800, seed=2)


@cache
def flash_crowd_pool() -> Pool:
    """Legitimate traffic from a new population of clients (same behaviour, other addresses)."""
    clients = legit_clients(seed=99, count=600)
    return Pool.build("flash crowd", lambda rng: legit_packet(rng, clients), 600, seed=3)


def _random_source(rng: random.Random) -> str:
    return str(ipaddress.ip_address(rng.randrange(1 << 24, 223 << 24)))


@cache
def dns_reflection_pool(source_port: int = 53) -> Pool:
    """Responses from many reflectors (fixed source port) to random ports of the server."""
    def make(rng):
        if source_port == 53:
            answer = DNSRR(rrname="example.com", type="TXT", rdata="x" * rng.randrange(200, 1200))
            payload = bytes(DNS(id=rng.randrange(65536), qr=1, rd=1, ra=1,
                                qd=DNSQR(qname="example.com", qtype=255), an=answer))
        else:  # NTP monlist-style responses
            payload = b"\xd7\x00\x03\x2a" + rng.randbytes(rng.choice([436, 440, 448]))
        return (IP(src=_random_source(rng), dst=SERVER, ttl=rng.randrange(30, 250), id=rng.randrange(65536))
                / UDP(sport=source_port, dport=rng.randrange(1024, 65536)) / Raw(payload))
    return Pool.build(f"udp reflection from port {source_port}", make, 500, seed=10 + source_port)


@cache
def syn_flood_pool() -> Pool:
    """SYNs without options from random sources, random TTL/id/window, to TCP 80."""
    def make(rng):
        return (IP(src=_random_source(rng), dst=SERVER, ttl=rng.randrange(30, 250), id=rng.randrange(65536))
                / TCP(sport=rng.randrange(1024, 65536), dport=80, flags="S", seq=rng.randrange(1 << 32),
                      window=rng.randrange(1, 65536)))
    return Pool.build("syn flood", make, 500, seed=20)


@cache
def payload_flood_pool() -> Pool:
    """A fixed payload pattern from random sources and source ports to UDP 53."""
    def make(rng):
        return (IP(src=_random_source(rng), dst=SERVER, ttl=rng.randrange(30, 250), id=rng.randrange(65536))
                / UDP(sport=rng.randrange(1024, 65536), dport=53)
                / Raw(b"\x13\x37\xca\xfe" + rng.randbytes(rng.randrange(20, 400))))
    return Pool.build("payload flood", make, 500, seed=30)


ATTACK_NETS = ("203.0.113.0", "192.0.2.0", "198.18.7.0")


@cache
def ttl_flood_pool() -> Pool:
    """TCP ACK+PSH to port 80 (looks like HTTP) from three /24s, fixed TTL and length."""
    def make(rng):
        src = ipaddress.ip_address(rng.choice(ATTACK_NETS)) + rng.randrange(1, 255)
        return (IP(src=str(src), dst=SERVER, ttl=47, id=rng.randrange(65536), flags="DF")
                / TCP(sport=rng.randrange(1024, 65536), dport=80, flags="PA", seq=rng.randrange(1 << 32),
                      window=rng.randrange(1, 65536)) / Raw(rng.randbytes(512)))
    return Pool.build("fixed ttl flood", make, 500, seed=40)


SERVER6 = "2001:db8:100::10"


@cache
def legit6_pool() -> Pool:
    """IPv6 clients: DNS queries to UDP 53 and HTTPS over TCP 443."""
    def make(rng):
        ip = IPv6(src=f"2001:db8:{rng.randrange(1, 1 << 16):x}::{rng.randrange(1, 1 << 16):x}", dst=SERVER6,
                  hlim=rng.choice([64, 128]) - rng.randrange(4, 20))
        if rng.random() < 0.5:
            return (ip / UDP(sport=rng.randrange(1024, 65536), dport=53)
                    / DNS(id=rng.randrange(65536), qd=DNSQR(qname="example.com")))
        return (ip / TCP(sport=rng.randrange(32768, 61000), dport=443, flags=rng.choice(["S", "A", "PA"]),
                         options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
                / Raw(rng.randbytes(40)))
    return Pool.build("legit ipv6", make, 400, seed=60)


@cache
def ipv6_flood_pool() -> Pool:
    """UDP to port 53 over IPv6 from random sources, fixed hop limit and payload."""
    def make(rng):
        src = f"2a00:{rng.randrange(1 << 16):x}::{rng.randrange(1 << 16):x}"
        return (IPv6(src=src, dst=SERVER6, hlim=51) / UDP(sport=rng.randrange(1024, 65536), dport=53)
                / Raw(b"\x00\x00\x01\x00" + b"\x00" * 30))
    return Pool.build("ipv6 flood", make, 500, seed=61)


@cache
def heavy_client_pool() -> Pool:
    """One known client uploading at full speed (bulk HTTP POST data)."""
    src = legit_clients()[0]

    def make(rng):
        return (IP(src=src, dst=SERVER, ttl=52, id=rng.randrange(65536), flags="DF")
                / TCP(sport=40000, dport=80, flags="A", seq=rng.randrange(1 << 32), window=502,
                      options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
                / Raw(rng.randbytes(1448)))
    return Pool.build("heavy client", make, 300, seed=50)


@dataclass
class Source:
    """`pool` sending at `pps` packets/s (on the wire) during [start, stop)."""

    pool: Pool
    pps: float | Callable[[float], float]
    start: float = 0.0
    stop: float = float("inf")


class Simulation:
    """Feeds a detector the samples of several sources, `tick` seconds at a time, exactly
    1 in `sample_every` packets (fractional samples carry over, so rates are exact)."""

    def __init__(self, detector: Detector, sources: list[Source], tick: float = 0.05, seed: int = 7) -> None:
        self.detector = detector
        self.sources = sources
        self.tick = tick
        self.now = 0.0
        self.events: list[Event] = []
        self._rng = random.Random(seed)
        self._carry = [0.0] * len(sources)

    def run_until(self, end: float) -> list[Event]:
        new: list[Event] = []
        n = self.detector.config.sample_every
        while self.now < end - 1e-9:
            self.now = round(self.now + self.tick, 9)
            batch: list[PacketFields] = []
            for i, src in enumerate(self.sources):
                if not src.start < self.now <= src.stop:  # the tick covers (now - tick, now]
                    continue
                pps = src.pps(self.now) if callable(src.pps) else src.pps
                self._carry[i] += pps * self.tick / n
                count = int(self._carry[i])
                self._carry[i] -= count
                batch += self._rng.choices(src.pool.fields, k=count)
            self._rng.shuffle(batch)
            self.detector.observe(batch, self.now)
            new += self.detector.decide(self.now)
        self.events += new
        return new


# --- the pools are what they claim -------------------------------------------------------------


def test_pools_parse_and_target_the_server():
    pools = (legit_pool(), syn_flood_pool(), payload_flood_pool(), ttl_flood_pool(), dns_reflection_pool(53))
    for pool in pools:
        assert len(pool.fields) == len(pool.frames)
        assert all(str(p.dst_address) == SERVER for p in pool.fields)


def test_attack_pools_share_no_source_with_legit_clients():
    clients = {int(ipaddress.ip_address(c)) for c in legit_clients()}
    for pool in (syn_flood_pool(), payload_flood_pool(), ttl_flood_pool(), dns_reflection_pool(53)):
        assert not clients & {p.src for p in pool.fields}


def test_reference_shares_from_libpcap():
    assert syn_flood_pool().match_share("tcp[tcpflags] = tcp-syn") == 1.0
    assert legit_pool().match_share("udp src port 53") < 0.01
    assert 0.5 < legit_pool().match_share("tcp dst port 80") < 0.7


# --- attack shapes --------------------------------------------------------------------------------

CONFIG = DetectorConfig(sample_every=10, window=0.25, learning_time=5, hold_time=2, rule_ttl=10)
LEGIT_PPS, ATTACK_PPS = 2000, 30000
START, STOP, END = 10.0, 13.0, 20.0


def simulate(*attacks: Source, config: DetectorConfig = CONFIG, end: float = END,
             legit_pps: float = LEGIT_PPS) -> Simulation:
    sim = Simulation(Detector(config), [Source(legit_pool(), legit_pps), *attacks])
    sim.run_until(end)
    return sim


def kinds(events: list[Event]) -> list[str]:
    return [e.kind.value for e in events]


def of_kind(events: list[Event], kind: EventKind) -> list[Event]:
    return [e for e in events if e.kind == kind]


SHAPES = {
    "dns reflection": (lambda: dns_reflection_pool(53), "udp src port 53", "198.51.100.10 udp"),
    "ntp reflection": (lambda: dns_reflection_pool(123), "udp src port 123", "198.51.100.10 udp"),
    "syn flood": (syn_flood_pool, "tcp[tcpflags] = tcp-syn", "198.51.100.10 tcp port 80"),
    "payload flood": (payload_flood_pool, "udp[8:4] = 0x1337cafe", "198.51.100.10 udp port 53"),
    "fixed ttl flood": (ttl_flood_pool, "ip[8] = 47", "198.51.100.10 tcp port 80"),
}


def test_ipv6_flood_gets_a_precise_rule():
    sim = Simulation(Detector(CONFIG), [Source(legit_pool(), LEGIT_PPS), Source(legit6_pool(), LEGIT_PPS),
                                        Source(ipv6_flood_pool(), ATTACK_PPS, START, STOP)])
    sim.run_until(END)
    assert kinds(sim.events) == ["attack_started", "rule_added", "rule_removed", "attack_ended"]
    rule = sim.events[1].rule
    assert rule.destination == "[2001:db8:100::10] udp port 53"
    assert rule.expression.startswith("dst host 2001:db8:100::10 and ip6[6] = 17 and udp dst port 53 and ")
    assert "ip6[7] = 51" in rule.expression
    assert ipv6_flood_pool().match_share(rule.expression) >= 0.95
    assert legit6_pool().match_share(rule.expression) <= 0.01
    assert legit_pool().match_share(rule.expression) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_attack_shape_gets_a_precise_rule_that_is_removed_after_the_attack(shape):
    make_pool, expected_term, destination = SHAPES[shape]
    pool = make_pool()
    sim = simulate(Source(pool, ATTACK_PPS, START, STOP))

    assert kinds(sim.events) == ["attack_started", "rule_added", "rule_removed", "attack_ended"]
    started, added, removed, ended = sim.events
    assert started.destination == added.destination == destination
    assert START < added.time <= START + 2 * CONFIG.window  # the first full window over the threshold
    rule = added.rule
    assert expected_term in rule.expression
    compile_filter(rule.expression)  # libpcap accepts it
    assert pool.match_share(rule.expression) >= 0.95
    assert legit_pool().match_share(rule.expression) <= 0.01
    assert added.evidence.rate_pps > CONFIG.attack_factor * added.evidence.baseline_pps
    chosen = [c for c in added.evidence.candidates if c.verdict == "chosen"]
    assert [c.expression for c in chosen] == [rule.expression]
    assert chosen[0].collateral <= CONFIG.max_collateral
    # Removed once the rate stayed below the threshold for hold_time (measured from the first quiet window).
    assert removed.rule.name == rule.name
    assert STOP + CONFIG.hold_time <= removed.time <= STOP + CONFIG.hold_time + 2 * CONFIG.window
    assert sim.detector.rules() == []


def test_python_fingerprint_agrees_with_libpcap_on_the_pools():
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, STOP), end=START + 1)
    [owned] = [o for t in sim.detector._tracks.values() if t.attack for o in t.attack.rules]
    compiled = CompiledFilter.from_expr(owned.rule.expression)
    for pool in (syn_flood_pool(), legit_pool()):
        for data in pool.frames:
            sampled = PacketFields.from_frame(data[:SAMPLE_BYTES])
            assert owned.fingerprint.matches(sampled) == compiled.matches(data)


def test_rule_is_extended_while_the_attack_lasts():
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, 40.0), end=45.0)
    added = of_kind(sim.events, EventKind.RULE_ADDED)
    extended = of_kind(sim.events, EventKind.RULE_EXTENDED)
    assert len(added) == 1 and len(extended) >= 5
    expiries = [added[0].rule.expires_at] + [e.rule.expires_at for e in extended]
    times = [added[0].time] + [e.time for e in extended]
    # Never allowed to lapse: each extension happens before the previous expiry.
    assert all(t < previous for t, previous in zip(times[1:], expiries, strict=False))
    assert of_kind(sim.events, EventKind.RULE_REMOVED)[0].time >= 40.0 + CONFIG.hold_time


def test_mutating_attack_is_refined_with_a_second_rule():
    sim = simulate(Source(dns_reflection_pool(53), ATTACK_PPS, START, STOP),
                   Source(dns_reflection_pool(123), ATTACK_PPS, START + 1.5, STOP))
    added = of_kind(sim.events, EventKind.RULE_ADDED)
    assert len(added) == 2
    assert "udp src port 53" in added[0].rule.expression and "udp src port 123" in added[1].rule.expression
    assert START + 1.5 < added[1].time <= START + 1.5 + CONFIG.refine_interval + 2 * CONFIG.window
    assert {e.rule.name for e in of_kind(sim.events, EventKind.RULE_REMOVED)} == {r.rule.name for r in added}


# --- negatives ----------------------------------------------------------------------------------


def test_flash_crowd_of_legitimate_clients_gets_no_rule():
    sim = simulate(Source(flash_crowd_pool(), 10000, START, STOP))
    assert of_kind(sim.events, EventKind.ATTACK_STARTED)  # the surge is real ...
    assert not of_kind(sim.events, EventKind.RULE_ADDED)  # ... but nothing separates it from normal traffic
    for event in of_kind(sim.events, EventKind.NO_SIGNATURE):
        assert all(c.verdict != "chosen" for c in event.evidence.candidates)
        assert any(c.verdict == "collateral" for c in event.evidence.candidates)


def test_heavy_legitimate_client_gets_no_rule():
    sim = simulate(Source(heavy_client_pool(), 20000, START, STOP))
    assert not of_kind(sim.events, EventKind.RULE_ADDED)
    [refusal] = of_kind(sim.events, EventKind.NO_SIGNATURE)
    assert any(c.verdict == "known sources" for c in refusal.evidence.candidates)


def test_slow_ramp_of_real_traffic_is_learned_not_flagged():
    config = CONFIG.model_copy(update={"window": 1.0, "sample_every": 100})
    ramp = Source(legit_pool(), lambda t: 1000 + 4000 * min(t / 240, 1.0))  # 1000 -> 5000 pps over 4 min
    sim = Simulation(Detector(config), [ramp], tick=0.5)
    sim.run_until(260)
    assert sim.events == []
    baseline = sim.detector.baseline(Destination(4, int(ipaddress.ip_address(SERVER)), 6, 80))
    assert 0.5 * 0.6 * 5000 < baseline <= 0.6 * 5000  # follows the ramp (60% of traffic is TCP 80)


# --- guard rails ----------------------------------------------------------------------------------


@pytest.mark.parametrize("allowed,excluded", [
    ("203.0.113.0/24", None),  # a whole attacking /24: left out of the signature
    ("192.0.2.0/28", "not src net 192.0.2.0/28"),  # part of an attacking /24: carved out of it
])
def test_allow_listed_sources_are_never_matched(allowed, excluded):
    net = ipaddress.ip_network(allowed)
    config = CONFIG.model_copy(update={"allow_list": (net,)})
    sim = simulate(Source(ttl_flood_pool(), ATTACK_PPS, START, STOP), config=config)
    [added] = of_kind(sim.events, EventKind.RULE_ADDED)
    expression = added.rule.expression
    if excluded:
        assert expression.endswith(excluded)
    compiled = CompiledFilter.from_expr(expression)
    pool = ttl_flood_pool()
    allowed_frames = [f for f, p in zip(pool.frames, pool.fields, strict=False) if p.src_address in net]
    not_allowed = [f for f, p in zip(pool.frames, pool.fields, strict=False) if p.src_address not in net]
    assert allowed_frames and not any(compiled.matches(f) for f in allowed_frames)
    assert sum(compiled.matches(f) for f in not_allowed) >= 0.95 * len(not_allowed)


def test_rule_longer_than_the_compiler_accepts_is_not_chosen():
    # Each allow-listed prefix is carved out of a random-source rule: 60 of them do not fit in 1024 chars.
    allow = tuple(ipaddress.ip_network(f"10.{i}.0.0/16") for i in range(60))
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, STOP),
                   config=CONFIG.model_copy(update={"allow_list": allow}))
    assert not of_kind(sim.events, EventKind.RULE_ADDED)
    [refusal] = of_kind(sim.events, EventKind.NO_SIGNATURE)
    assert {c.verdict for c in refusal.evidence.candidates} >= {"too long"}


def test_rule_cap_is_respected():
    config = CONFIG.model_copy(update={"max_rules": 1})
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, STOP),
                   Source(payload_flood_pool(), ATTACK_PPS, START, STOP), config=config)
    assert len(of_kind(sim.events, EventKind.RULE_ADDED)) == 1
    refused = of_kind(sim.events, EventKind.RULE_REFUSED)
    assert refused and "rule cap reached (1/1)" in refused[0].message
    assert refused[0].evidence.candidates  # the refused signature is still reported


def test_dry_run_reports_and_deploys_nothing():
    config = CONFIG.model_copy(update={"dry_run": True})
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, STOP), config=config)
    assert kinds(sim.events) == ["attack_started", "rule_proposed", "attack_ended"]
    assert "tcp[tcpflags] = tcp-syn" in sim.events[1].rule.expression
    assert sim.detector.status()["dry_run"] is True


def test_status_and_counters():
    sim = simulate(Source(syn_flood_pool(), ATTACK_PPS, START, STOP), end=START + 1)
    status = sim.detector.status()
    assert [a["destination"] for a in status["attacks"]] == ["198.51.100.10 tcp port 80"]
    assert [r["name"] for r in status["rules"]] == ["auto-1"]
    assert status["counters"]["attack_started"] == 1 and status["counters"]["rule_added"] == 1
    assert status["counters"]["samples"] > 0
    assert json.loads(json.dumps([e.to_dict() for e in sim.events]))[1]["kind"] == "rule_added"


# --- property: a chosen signature never matches allow-listed traffic nor exceeds the collateral cap --


def _normal_traffic(destination: Destination, config: DetectorConfig) -> NormalTraffic:
    normal = NormalTraffic(search_fields(config.payload_offsets, with_dst_port=destination.port is None),
                           config.normal_samples)
    for p in legit_pool().fields:
        if destination.contains(p):
            normal.add(p)
    return normal


@given(shape=st.sampled_from(sorted(SHAPES)), picks=st.lists(st.integers(0, 499), min_size=1, max_size=4),
       lengths=st.lists(st.sampled_from([8, 16, 24, 28, 32]), min_size=4, max_size=4),
       legit_share=st.sampled_from([0.0, 0.1, 0.3]))
@settings(max_examples=40, deadline=None)
def test_chosen_signature_never_matches_allow_listed_samples(shape, picks, lengths, legit_share):
    pool = SHAPES[shape][0]()
    allow = tuple(ipaddress.ip_network(f"{pool.fields[i].src_address}/{n}", strict=False)
                  for i, n in zip(picks, lengths, strict=False))
    config = CONFIG.model_copy(update={"allow_list": allow})
    scope = Destination.of(pool.fields[0], with_port="reflection" not in shape)
    legit = [i for i, p in enumerate(legit_pool().fields) if scope.contains(p)]
    legit_count = int(legit_share * 400)
    attack = list(pool.fields[:400]) + [legit_pool().fields[i] for i in legit[:legit_count]]
    result = search_signature(scope, attack, _normal_traffic(scope, config), legit_count, config)
    if result.chosen is None:
        return
    in_allow = [i for i, p in enumerate(pool.fields) if any(p.src_address in net for net in allow)]
    assert not any(result.chosen.matches(pool.fields[i]) for i in in_allow)
    compiled = CompiledFilter.from_expr(result.chosen.expression())
    assert not any(compiled.matches(pool.frames[i]) for i in in_allow)
    chosen = next(c for c in result.candidates if c.verdict == "chosen")
    assert chosen.collateral <= config.max_collateral
    assert legit_pool().match_share(result.chosen.expression()) <= config.max_collateral


# --- property: invariants of whole runs -------------------------------------------------------------

POOLS = {"syn flood": syn_flood_pool, "payload flood": payload_flood_pool, "fixed ttl flood": ttl_flood_pool,
         "dns reflection": dns_reflection_pool, "flash crowd": flash_crowd_pool}


@given(attacks=st.lists(st.tuples(st.sampled_from(sorted(POOLS)), st.sampled_from([3000, 20000, 60000]),
                                  st.floats(6.0, 9.0), st.floats(0.5, 3.0)), min_size=1, max_size=3),
       max_rules=st.integers(0, 2), dry_run=st.booleans(),
       allowed=st.sampled_from([(), ("203.0.113.0/24",), ("192.0.2.0/25", "0.0.0.0/2")]))
@settings(max_examples=10, deadline=None)
def test_whole_runs_keep_the_guard_rails(attacks, max_rules, dry_run, allowed):
    allow = tuple(ipaddress.ip_network(n) for n in allowed)
    config = CONFIG.model_copy(update={"max_rules": max_rules, "dry_run": dry_run, "allow_list": allow})
    sources = [Source(POOLS[name](), pps, start, start + length) for name, pps, start, length in attacks]
    sim = Simulation(Detector(config), [Source(legit_pool(), LEGIT_PPS), *sources])
    owned: set[str] = set()
    while sim.now < 20.0:
        for event in sim.run_until(sim.now + 1.0):
            if event.kind in (EventKind.RULE_ADDED, EventKind.RULE_PROPOSED):
                assert event.kind == (EventKind.RULE_PROPOSED if dry_run else EventKind.RULE_ADDED)
                owned.add(event.rule.name)  # (dry run: proposals are never withdrawn, only forgotten)
                compiled = CompiledFilter.from_expr(event.rule.expression)
                for pool in {s.pool for s in sources} | {legit_pool()}:
                    for frame, p in zip(pool.frames, pool.fields, strict=False):
                        if any(p.src_address in net for net in allow):
                            assert not compiled.matches(frame)  # allow-listed: never
                assert legit_pool().match_share(event.rule.expression) <= config.max_collateral
            elif event.kind == EventKind.RULE_REMOVED:
                owned.remove(event.rule.name)
            assert not (dry_run and event.kind in (EventKind.RULE_EXTENDED, EventKind.RULE_REMOVED))
            assert len(sim.detector.rules()) <= max_rules
    assert sim.detector.rules() == []  # every attack ended ...
    assert dry_run or owned == set()  # ... and every deployed rule was withdrawn


# --- SYN floods with no narrow signature: syncookie ------------------------------------------------


@cache
def client_like_syn_flood_pool() -> Pool:
    """SYNs from random spoofed sources that look like the real clients' SYNs: the same options,
    windows and TTLs, to TCP 80 — nothing separates them from a real client's SYN."""
    def make(rng):
        return (IP(src=_random_source(rng), dst=SERVER, ttl=rng.choice([64, 128]) - rng.randrange(4, 20),
                   id=rng.randrange(65536), flags="DF")
                / TCP(sport=rng.randrange(32768, 61000), dport=80, flags="S", seq=rng.randrange(1 << 32),
                      window=rng.choice([64240, 65535, 502]), options=TCP_OPTIONS))
    return Pool.build("client-like syn flood", make, 500, seed=70)


SYN_COOKIE_RULE = ("dst host 198.51.100.10 and tcp and tcp dst port 80 "
                   "and tcp[tcpflags] & (tcp-syn|tcp-ack) = (tcp-syn)")


def test_a_syn_flood_with_no_narrow_signature_gets_a_syncookie_rule():
    from bpfnet.ddos.autopilot import DeployedRules
    from bpfnet.ddos.synproxy import rule_ports

    sim = simulate(Source(client_like_syn_flood_pool(), ATTACK_PPS, START, STOP))
    assert kinds(sim.events) == ["attack_started", "rule_added", "rule_removed", "attack_ended"]
    rule = sim.events[1].rule
    assert (rule.action, rule.expression, rule.destination) == ("syncookie", SYN_COOKIE_RULE,
                                                                "198.51.100.10 tcp port 80")
    assert "syncookie" in sim.events[1].message and "no narrow signature" in sim.events[1].message
    # a drop rule would take the real clients' SYNs: the search refused every candidate
    assert all(c.verdict != "chosen" for c in sim.events[1].evidence.candidates)
    # libpcap: the rule takes the whole flood, and of the real traffic only SYNs (which connect)
    assert client_like_syn_flood_pool().match_share(rule.expression) == 1.0
    legit = legit_pool()
    compiled = CompiledFilter.from_expr(rule.expression)
    for frame, p in zip(legit.frames, legit.fields, strict=True):
        assert compiled.matches(frame) == (p.dst_port == 80 and p.tcp_flags == 0x02)
    # deployed as a syncookie rule the data plane accepts, protecting port 80 only
    deployed = DeployedRules()
    deployed.add(rule)
    [as_rule] = deployed.rules()
    assert as_rule.action == "syncookie" and rule_ports(as_rule.expr) == {80}


def test_syn_cookies_off_leaves_the_flood_without_a_rule():
    sim = simulate(Source(client_like_syn_flood_pool(), ATTACK_PPS, START, STOP),
                   config=CONFIG.model_copy(update={"syn_cookies": False}))
    assert not of_kind(sim.events, EventKind.RULE_ADDED)
    assert of_kind(sim.events, EventKind.NO_SIGNATURE)


def test_no_syncookie_rule_for_what_is_not_a_syn_flood():
    from bpfnet.ddos.signature import syn_flood_fingerprint

    scope = Destination.of(client_like_syn_flood_pool().fields[0])  # 198.51.100.10 tcp port 80
    normal = [p for p in legit_pool().fields if scope.contains(p)]
    flood = list(client_like_syn_flood_pool().fields)
    found = syn_flood_fingerprint(scope, flood, normal, 0, CONFIG)
    assert found is not None and found.coverage == 1.0 and found.fingerprint.expression() == SYN_COOKIE_RULE
    # a surge of real clients: as many SYNs as normal, no excess of them
    assert syn_flood_fingerprint(scope, normal * 5, normal, len(normal), CONFIG) is None
    # ACK floods (heavy client), UDP: not SYNs
    assert syn_flood_fingerprint(scope, list(heavy_client_pool().fields), normal, 0, CONFIG) is None
    udp_scope = Destination.of(payload_flood_pool().fields[0])
    assert syn_flood_fingerprint(udp_scope, list(payload_flood_pool().fields), [], 0, CONFIG) is None
    # a host-wide scope: the few ports that take the SYNs, or nothing when they are spread
    host = Destination.of(flood[0], with_port=False)
    found = syn_flood_fingerprint(host, flood, [], 0, CONFIG)
    assert found is not None and "tcp dst port 80" in found.fingerprint.expression()
    spread = [dataclasses.replace(p, dst_port=1024 + i) for i, p in enumerate(flood)]
    assert syn_flood_fingerprint(host, spread, [], 0, CONFIG) is None
    # fewer samples than the signature search needs: too few to judge (a first window the attack
    # only began in), as the search itself says
    few = flood[:CONFIG.min_attack_samples - 1]
    assert syn_flood_fingerprint(scope, few, normal, 0, CONFIG) is None
    assert syn_flood_fingerprint(scope, flood[:CONFIG.min_attack_samples], normal, 0, CONFIG) is not None
