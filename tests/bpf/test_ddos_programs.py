"""The shapes of generated rule-set programs in the kernel (BPF_PROG_TEST_RUN): one straight program
for a small set, value runs (consecutive rules of one shape as one table lookup) for sets grouping
cannot hold, the head's binary search over keys for grouped sets, exact verdicts and counters,
equivalence with libpcap's first match, and the atomic swap between a straight program and a big
tail-called set under traffic through the XDP chain."""

import collections
import random
import struct
import threading
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from bpfnet.ddos.config import DdosState, Rule
from bpfnet.ddos.dataplane import DdosDataplane, compile_rule
from bpfnet.ddos.pcap import CompiledFilter
from bpfnet.ddos.ruleset import MAX_RULES, VALUE_RUN_SIZE, VALUE_RUNS, ValueRun, straight_items
from bpfnet.ebpf.chain import XdpChain

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def rules(*specs: dict) -> list[Rule]:
    return DdosState(rules=[Rule(**spec) for spec in specs]).rules


def udp(dport: int, ttl: int = 64, size: int = 0) -> bytes:
    return bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2", ttl=ttl) / UDP(sport=40000, dport=dport) / (b"x" * size))


@pytest.fixture
def dp():
    with DdosDataplane.load() as plane:
        yield plane


def run(dp: DdosDataplane, frame: bytes) -> int:
    result = dp.entry.test_run(frame)
    assert result.data == frame
    return result.retval


def test_a_small_set_is_one_straight_program_that_counts_exactly(dp):
    dp.deploy(rules({"id": 1, "expr": "udp dst port 53", "action": "drop"},
                    {"id": 2, "expr": "ip[8] = 1", "action": "pass"},
                    {"id": 3, "expr": "udp", "action": "drop"}))
    assert (dp.active().chunks, dp.active().groups) == (1, 0)
    table = [(udp(53), XDP_DROP, 1), (udp(53, ttl=1), XDP_DROP, 1), (udp(80, ttl=1, size=10), XDP_PASS, 2),
             (udp(80, size=100), XDP_DROP, 3), (bytes(ETH / IP() / TCP()), XDP_PASS, 0)]
    start = time.monotonic_ns()
    for frame, verdict, _ in table:
        assert run(dp, frame) == verdict
    end = time.monotonic_ns()
    for rule_id in (1, 2, 3):
        sent = [len(frame) for frame, _, rule in table if rule == rule_id]
        counters = dp.counters(rule_id)
        assert (counters.packets, counters.bytes) == (len(sent), sum(sent))
        # the time of the match, kept in jiffies, reads back as monotonic ns to within a tick or two
        assert start - 20_000_000 <= counters.last_ns <= end + 20_000_000
    totals = dp.total_counts()
    assert totals["drop_rule"] == {"packets": 3, "bytes": sum(len(f) for f, v, r in table if v == XDP_DROP)}
    assert totals["pass_rule"]["packets"] == 1 and totals["pass_no_match"]["packets"] == 1


def test_consecutive_rules_of_one_shape_are_one_value_run(dp):
    """200 TTL rules in one group: one straight program, one table lookup whose entries are the
    first rule for each value (the duplicate TTL 7 keeps rule 8's word, not rule 200's)."""
    ttl_rules = [{"id": i, "expr": f"ip[8] = {i - 1}", "action": "drop" if i % 2 else "pass"} for i in range(1, 200)]
    ruleset = rules(*ttl_rules, {"id": 200, "expr": "ip[8] = 7", "action": "drop"},
                    {"id": 201, "expr": "udp", "action": "drop"})
    dp.deploy(ruleset)
    assert dp.active().chunks == 1
    nonzero = [(index, word) for index, word in ((struct.unpack("<I", k)[0], struct.unpack("<I", v)[0])
                                                for k, v in dp.values.items_batch()) if word]
    assert len(nonzero) == 199  # values 0..198 from rules 1..199; rule 200 repeats 7
    assert {index % VALUE_RUN_SIZE: word & 0xFFFF for index, word in nonzero}[7] == 8
    assert run(dp, udp(9, ttl=7)) == XDP_PASS and dp.counters(8).packets == 1  # rule 8: pass
    assert run(dp, udp(9, ttl=6)) == XDP_DROP and dp.counters(7).packets == 1
    assert run(dp, udp(9, ttl=250)) == XDP_DROP and dp.counters(201).packets == 1  # past the run: "udp"
    assert dp.counters(200).packets == 0


def test_a_set_grouping_cannot_hold_folds_into_value_runs(dp):
    """3,000 port rules need more programs than a bank holds when grouped; as value runs they are
    one straight program. IPv4, IPv6, VLAN-tagged, non-first fragments and truncated frames decide
    as libpcap's first match does."""
    rng = random.Random(7)
    ports = [rng.randrange(1, 65536) for _ in range(3000)]
    specs = [{"id": i + 1, "expr": f"udp dst port {port}", "action": rng.choice(["drop", "pass"])}
             for i, port in enumerate(ports)]
    specs.append({"id": 3001, "expr": "tcp dst port 22", "action": "pass"})
    specs.append({"id": 3002, "expr": "tcp", "action": "drop"})
    ruleset = rules(*specs)
    dp.deploy(ruleset)
    assert dp.active().chunks == 1
    frames = []
    for _ in range(300):
        port = rng.choice(ports) if rng.random() < 0.7 else rng.randrange(1, 65536)
        l4 = UDP(sport=5000, dport=port) if rng.random() < 0.8 else TCP(sport=5000, dport=rng.choice([22, port]))
        l3 = IP(src="10.0.0.1", dst="10.0.0.2", frag=rng.choice([0, 0, 0, 5])) if rng.random() < 0.7 else IPv6()
        frame = bytes(ETH / l3 / l4) if rng.random() < 0.9 else bytes(ETH / Dot1Q(vlan=3) / l3 / l4)
        frames.append(frame[:rng.randrange(30, len(frame))] if rng.random() < 0.05 else frame)
    assert_first_libpcap_match(dp, ruleset, frames)


RUN_SHAPES = ["udp dst port {v}", "tcp dst port {v}", "dst port {v}", "src port {v}", "ip[8] = {t}",
              "udp[8:2] = {v}", "ip6 and udp dst port {v}"]
PLAIN = ["icmp", "ip[8] < 32", "tcp[tcpflags] & tcp-syn != 0", "port {v}", "not ip", "vlan",
         "udp dst port {v} and ip[8] = {t}"]
VALUES = [22, 53, 80, 123, 443, 5000]
TTLS = [1, 32, 64, 128]


def random_set(rng: random.Random, runs: int, stretch: int) -> list[Rule]:
    """Stretches of one shape (value runs) with plain rules between them, values drawn so that
    many frames hit and some values repeat inside a run."""
    specs: list[dict] = []
    for _ in range(runs):
        shape = rng.choice(RUN_SHAPES)
        for _ in range(rng.randrange(2, stretch)):
            specs.append({"expr": shape.format(v=rng.choice(VALUES), t=rng.choice(TTLS))})
        for _ in range(rng.randrange(0, 3)):
            specs.append({"expr": rng.choice(PLAIN).format(v=rng.choice(VALUES), t=rng.choice(TTLS))})
    for i, spec in enumerate(specs):
        spec.update(id=i + 1, action=rng.choice(["drop", "pass"]))
    return rules(*specs)


def random_frame(rng: random.Random) -> bytes:
    ttl = rng.choice(TTLS + [200])
    l3 = IP(src="10.0.0.1", dst="10.0.0.2", ttl=ttl) if rng.random() < 0.7 else IPv6(hlim=ttl)
    a, b = rng.choice(VALUES + [9]), rng.choice(VALUES + [9])
    l4 = rng.choice([UDP(sport=a, dport=b) / b"\x00\x16hi", TCP(sport=a, dport=b, flags=rng.choice(["S", "A"]))])
    frame = bytes(ETH / l3 / l4) if rng.random() < 0.9 else bytes(ETH / Dot1Q(vlan=3) / l3 / l4)
    return frame[:rng.randrange(20, len(frame))] if rng.random() < 0.05 else frame


def test_ten_thousand_port_rules_with_ids_up_to_the_limit_deploy_and_count_exactly(dp):
    """Rule ids run up to MAX_RULES - 1 (the match word's 16 bits; every per-rule map holds them
    all): 10,000 port rules, the last with id 65535, one value run; each counts its own packets."""
    specs = [{"id": 6 * i + 1, "expr": f"udp dst port {10000 + i}", "action": "drop"} for i in range(9999)]
    specs.append({"id": MAX_RULES - 1, "expr": "udp dst port 9", "action": "drop"})
    ruleset = rules(*specs)
    dp.deploy(ruleset)
    assert dp.active().chunks == 1
    assert run(dp, udp(9)) == XDP_DROP and dp.counters(MAX_RULES - 1).packets == 1
    assert run(dp, udp(10000 + 9998)) == XDP_DROP and dp.counters(6 * 9998 + 1).packets == 1
    assert run(dp, udp(8)) == XDP_PASS and dp.total_counts()["pass_no_match"]["packets"] == 1
    with pytest.raises(ValueError, match=f"less than {MAX_RULES}"):
        Rule(id=MAX_RULES, expr="udp")


@pytest.mark.parametrize("seed", range(3))
def test_straight_programs_with_value_runs_decide_like_the_first_libpcap_match(seed):
    """Random stretches of one shape among plain rules, behind 2,100 port rules no frame matches
    (more groups than a bank holds, so the set runs as one straight program whose first value run
    is those ports): verdicts and per-rule counters are libpcap's first match."""
    rng = random.Random(seed)
    filler = [{"expr": f"udp dst port {20000 + i}", "action": "drop"} for i in range(2100)]
    ruleset = rules(*[{**spec, "id": i + 1} for i, spec in enumerate(filler)],
                    *[{"id": 2100 + rule.number, "expr": rule.expr, "action": rule.action}
                      for rule in random_set(rng, runs=VALUE_RUNS + 1, stretch=12)])
    with DdosDataplane.load() as plane:
        plane.deploy(ruleset)
        assert plane.active().chunks == 1
        assert_first_libpcap_match(plane, ruleset, [random_frame(rng) for _ in range(500)])
    items = straight_items([compile_rule(rule) for rule in ruleset])
    assert isinstance(items[0], ValueRun) and len(items[0].rules) == 2100
    assert sum(isinstance(item, ValueRun) for item in items) <= VALUE_RUNS


@pytest.mark.parametrize("seed", range(2))
def test_portless_value_runs_in_one_straight_program_decide_like_libpcap(seed):
    rng = random.Random(100 + seed)
    specs = []
    for shape in rng.sample(["ip[8] = {t}", "udp[8:2] = {v}", "ip[1] = {t}", "ether[14] = {e}"], 4):
        for _ in range(rng.randrange(2, 30)):
            specs.append({"expr": shape.format(t=rng.choice(TTLS), v=rng.choice([22, 53, 0x0016]),
                                               e=rng.choice([0x45, 0x46, 0x60]))})
        specs.append({"expr": rng.choice(["icmp", "not ip", "ip[8] < 32"])})
    for i, spec in enumerate(specs):
        spec.update(id=i + 1, action=rng.choice(["drop", "pass"]))
    ruleset = rules(*specs)
    with DdosDataplane.load() as plane:
        plane.deploy(ruleset)
        assert plane.active().chunks == 1
        assert_first_libpcap_match(plane, ruleset, [random_frame(rng) for _ in range(800)])


@pytest.mark.parametrize("count", [600, 1100])
def test_the_head_finds_the_group_of_every_key_and_falls_back_to_the_any_key_group(dp, count):
    """Port rules of both protocols (grouped: one chunk per port and protocol) and an any-key rule:
    the head's binary search sends each key to its own chunk, other keys to the any-key one (with
    600 chunks by direct tail calls, with 1,100 through one call by register)."""
    specs = [{"id": i + 1, "expr": f"{'udp' if i % 2 else 'tcp'} dst port {1000 + i}", "action": "drop"}
             for i in range(count)]
    ruleset = rules(*specs, {"id": count + 1, "expr": "ip[8] = 9", "action": "pass"})
    dp.deploy(ruleset)
    assert dp.active().groups == 2 * count and dp.active().chunks == count + 1
    frames = [bytes(ETH / l3 / (UDP if port % 2 else TCP)(sport=7, dport=port))
              for port in range(995, 1005 + count, 3) for l3 in (IP(ttl=9), IPv6(hlim=9))]
    frames += [bytes(ETH / IP(ttl=9) / UDP(sport=7, dport=1000 + i)) for i in range(0, count, 7)]  # other protocol
    assert_first_libpcap_match(dp, ruleset, frames)


def assert_first_libpcap_match(dp: DdosDataplane, ruleset: list[Rule], frames: list[bytes]) -> None:
    """Every frame gets the verdict of the first rule libpcap matches; the per-rule counters count
    exactly those first matches, and the totals the outcomes."""
    matchers = [(rule, CompiledFilter.from_expr(rule.expr)) for rule in ruleset]
    expected = collections.Counter()
    outcomes = collections.Counter()
    for frame in frames:
        first = next((rule for rule, matcher in matchers if matcher.matches(frame)), None)
        if first is not None:
            expected[first.id] += 1
        outcomes["pass_no_match" if first is None else f"{first.action}_rule"] += 1
        verdict = XDP_DROP if first is not None and first.action == "drop" else XDP_PASS
        assert run(dp, frame) == verdict, (frame.hex(), first)
    assert {r.id: dp.counters(r.id).packets for r in ruleset} == {r.id: expected[r.id] for r in ruleset}
    totals = dp.total_counts()
    assert {name: totals[name]["packets"] for name in ("pass_no_match", "pass_rule", "drop_rule")} == {
        name: outcomes[name] for name in ("pass_no_match", "pass_rule", "drop_rule")}


def test_swap_between_a_straight_program_and_a_big_tail_called_set_under_traffic():
    """Packets enter through the XDP chain's root while the stage flips 20 times between a straight
    program (rule 1, drop) and 300 any-key rules in two chunks (rule 1000 first, pass; a decoy drop
    rule 2000 in the second chunk that only a packet mixing the sets could reach). Every packet is
    counted by exactly one of the two first rules, and the root's verdicts agree."""
    small = rules({"id": 1, "expr": "udp", "action": "drop"})
    big = rules({"id": 1000, "expr": "udp", "action": "pass"},
                *[{"id": 1000 + i, "expr": f"ip[8] = {i} and tcp", "action": "pass"} for i in range(1, 300)],
                {"id": 2000, "expr": "udp", "action": "drop"})
    chain = XdpChain.open()
    try:
        with DdosDataplane.load(chain=chain) as stage:
            stage.deploy(small)
            assert stage.active().chunks == 1
            root = chain.root()
            frame, stop, verdicts, repeat = udp(53), threading.Event(), collections.Counter(), 100

            def traffic():
                while not stop.is_set():
                    verdicts[root.test_run(frame, repeat=repeat).retval] += repeat

            sender = threading.Thread(target=traffic)
            sender.start()
            try:
                for flip in range(20):
                    stage.deploy(big if flip % 2 == 0 else small)
                    assert stage.active().chunks == (2 if flip % 2 == 0 else 1)
            finally:
                stop.set()
                sender.join()
                root.close()
            assert stage.counters(2000).packets == 0
            total = stage.counters(1).packets + stage.counters(1000).packets
            assert total == sum(verdicts.values()) > 0
            # repeat runs in one call may straddle a flip: only the last run's verdict is returned,
            # so the verdicts bound the counters rather than equal them
            assert stage.total_counts()["drop_rule"]["packets"] == stage.counters(1).packets
            assert stage.total_counts()["pass_rule"]["packets"] == stage.counters(1000).packets
    finally:
        chain.detach()
