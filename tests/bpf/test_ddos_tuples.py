"""Tuple runs in the kernel (BPF_PROG_TEST_RUN): rules of mixed fields (source and destination
networks, IPv4 and IPv6, with protocols and ports) run as one LPM lookup per tuple shape, and the
data plane's first match and per-rule counters equal libpcap's first match: on random rule sets
(hypothesis), with rules the walk cannot summarise interleaved, and on the compiler corpus."""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from bpfnet.ddos import ruleset as ruleset_module
from bpfnet.ddos.config import DdosState, Rule
from bpfnet.ddos.dataplane import DdosDataplane, compile_rule
from bpfnet.ddos.grouping import rule_conjunctions
from bpfnet.ddos.pcap import CompiledFilter
from bpfnet.ddos.ruleset import TupleRun, straight_items

from .test_ddos_compiler import CORPUS, FRAMES

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

SUMMARISED = ["src net 10.{a}.0.0/16 and udp", "src net 10.{a}.{b}.0/24 and dst port {p}",
              "dst net 10.{a}.{b}.0/24 and tcp", "src host 10.{a}.{b}.7 and tcp dst port {p}",
              "src net 2001:db8:{a}::/48 and udp dst port {p}", "ip6 src net 2001:db8:{a}:{b}::/64",
              "src net 2001:db8::/32 and dst net 2001:db8:{b}::/48", "ip6 dst host 2001:db8:{a}:{b}::1",
              "src net 10.{a}.0.0/16", "udp dst port {p}", "tcp", "icmp", "ip6 and tcp src port {p}",
              "src net 10.{a}.{b}.0/24 and dst net 10.{b}.0.0/16 and udp src port {p}", "arp src host 10.{a}.{b}.7",
              "ip proto 47 and src net 10.{a}.0.0/16"]
LINEAR = ["not src net 10.{a}.0.0/16", "port {p}", "tcp[tcpflags] & tcp-syn != 0", "udp dst portrange 50-60",
          "ip[8] < 32", "src net 10.{a}.0.0/16 or dst port {p}", "vlan and udp"]
PORTS = [53, 80, 123]


def rules(*specs: dict) -> list[Rule]:
    return DdosState(rules=[Rule(**spec) for spec in specs]).rules


def frame(kind: int, a: int, b: int, host: int, port: int, sport: int, cut: int | None, vlan: bool) -> bytes:
    l4 = [UDP(sport=sport, dport=port), TCP(sport=sport, dport=port), ICMP()][kind % 3]
    if kind < 3:
        l3 = IP(src=f"10.{a}.{b}.{host}", dst=f"10.{b}.{a}.1", frag=0 if host != 9 else 4)
    elif kind < 6:
        l3 = IPv6(src=f"2001:db8:{a}:{b}::{host}", dst=f"2001:db8:{b}:{a}::1")
    else:
        return bytes(ETH / ARP(psrc=f"10.{a}.{b}.{host}", pdst="10.0.0.2"))[:cut]
    layers = ETH / Dot1Q(vlan=3) / l3 / l4 if vlan else ETH / l3 / l4
    return bytes(layers)[:cut]


FRAME = st.builds(frame, st.integers(0, 6), st.integers(0, 2), st.integers(0, 2), st.sampled_from([1, 7, 8, 9]),
                  st.sampled_from([*PORTS, 9]), st.sampled_from([*PORTS, 9]),
                  st.one_of(st.none(), st.integers(14, 60)), st.booleans())
RULE = st.tuples(st.sampled_from(SUMMARISED + SUMMARISED + LINEAR), st.integers(0, 2), st.integers(0, 2),
                 st.sampled_from(PORTS), st.sampled_from(["drop", "pass"]))


def as_rules(drawn: list[tuple]) -> list[Rule]:
    return rules(*[{"id": i + 1, "expr": expr.format(a=a, b=b, p=p), "action": action}
                   for i, (expr, a, b, p, action) in enumerate(drawn)])


def assert_first_libpcap_match(dp: DdosDataplane, ruleset: list[Rule], frames: list[bytes]) -> None:
    """Every frame gets the verdict of the first rule libpcap matches, and the per-rule counters
    count exactly those first matches."""
    matchers = [(rule, CompiledFilter.from_expr(rule.expr)) for rule in ruleset]
    before = {r.id: dp.counters(r.id).packets for r in ruleset}  # (an unchanged rule keeps its counters)
    expected = collections.Counter(before)
    for frame_ in frames:
        first = next((rule for rule, matcher in matchers if matcher.matches(frame_)), None)
        if first is not None:
            expected[first.id] += 1
        verdict = XDP_DROP if first is not None and first.action == "drop" else XDP_PASS
        assert dp.entry.test_run(frame_).retval == verdict, (frame_.hex(), first)
    assert {r.id: dp.counters(r.id).packets for r in ruleset} == {r.id: expected[r.id] for r in ruleset}


def tuple_entries(dp: DdosDataplane) -> int:
    """Entries of tuple shapes in the trie and the hash maps."""
    return sum(len(list(table.keys())) for table in (dp.tuples, *dp._tuple_hashes()))


@pytest.fixture
def always_tuples(monkeypatch):
    """Every stretch of two or more summarisable rules becomes a tuple run, whatever it costs."""
    monkeypatch.setattr(ruleset_module, "ALWAYS_TUPLE_RUNS", True)


@pytest.mark.parametrize(("forced", "hashing"), [(False, "default"), (True, "default"), (True, "trie"),
                                                (True, "expand")], ids=["by-cost", "always", "always-trie",
                                                                       "always-expanded"])
def test_random_mixed_rule_sets_decide_like_the_first_libpcap_match(monkeypatch, forced, hashing):
    """Random ordered sets of rules of mixed fields, some the walk cannot summarise in between,
    on random frames (IPv4, IPv6, ARP, VLAN, fragments, truncated anywhere): the data plane's
    verdicts and per-rule counters are libpcap's first match. Shapes are hashed where their
    prefixes have one length after a little expansion (default), or all in the trie, or hashed
    after any expansion (a /16 and a /24 of one shape: 257 entries)."""
    if forced:
        monkeypatch.setattr(ruleset_module, "ALWAYS_TUPLE_RUNS", True)
    if hashing == "trie":
        monkeypatch.setattr(ruleset_module, "HASH_TUPLES", False)
    elif hashing == "expand":
        monkeypatch.setattr(ruleset_module, "HASH_SLACK", 1 << 17)
    seen = collections.Counter()
    with DdosDataplane.load() as dp:

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(RULE, min_size=2, max_size=40), st.lists(FRAME, min_size=40, max_size=80))
        def check(drawn, frames):
            ruleset = as_rules(drawn)
            items = straight_items([compile_rule(r) for r in ruleset])
            seen.update(type(item).__name__ for item in items)
            for run in (item for item in items if isinstance(item, TupleRun)):
                seen["hashed"] += len(run.hashed)
                seen["trie"] += len(run.shapes) - len(run.hashed)
                seen["expanded"] += sum(len(entries) for _, entries in run.hashed.values()) > sum(
                    1 for key in run.entries if key[0] in run.hashed)
            dp.deploy(ruleset)
            assert_first_libpcap_match(dp, ruleset, frames)

        check()
    if forced:
        assert seen["TupleRun"] > 0
        assert seen["trie"] > 0 if hashing == "trie" else seen["hashed"] > 0
    if hashing == "trie":
        assert seen["hashed"] == 0
    if hashing == "expand":
        assert seen["expanded"] > 0


def test_a_thousand_mixed_rules_are_a_few_lookups(dp_tuples):
    """1,000 rules of six shapes (networks with protocols and ports, IPv4 and IPv6) fold into one
    tuple run of a few shapes (grouped by port, a few per group); the last rule's packet is counted
    by it alone."""
    shapes = SUMMARISED[:6]
    specs = [{"id": i + 1, "expr": shapes[i % 6].format(a=100 + i // 256, b=i % 256, p=1000 + i % 7),
              "action": "drop"} for i in range(999)]
    specs.append({"id": 1000, "expr": "src net 10.1.2.0/24 and udp dst port 53", "action": "pass"})
    ruleset = rules(*specs)
    items = straight_items([compile_rule(r) for r in ruleset])
    assert len(items) == 1 and isinstance(items[0], TupleRun) and len(items[0].shapes) <= 8
    dp_tuples.deploy(ruleset)  # (grouped by port: each group's rules are a tuple run or two)
    assert dp_tuples.active().chunks < 100
    hit = bytes(ETH / IP(src="10.1.2.3", dst="10.0.0.2") / UDP(sport=1, dport=53))
    assert dp_tuples.entry.test_run(hit).retval == XDP_PASS and dp_tuples.counters(1000).packets == 1
    assert sum(dp_tuples.counters(i).packets for i in range(1, 1000)) == 0
    assert tuple_entries(dp_tuples) > 1000
    assert dp_tuples._written_filters[dp_tuples.active().bank]  # the shapes' address filters are set


@pytest.fixture
def dp_tuples():
    with DdosDataplane.load() as plane:
        yield plane


@pytest.mark.parametrize("group", range(0, 120, 40), ids=lambda g: f"rules{g}-{g + 39}")
def test_corpus_rules_as_tuple_runs_decide_like_libpcap(always_tuples, dp_tuples, group):
    """The compiler corpus's expressions that the walk summarises, 40 a set in corpus order (after
    the first set, every three of them followed by one it cannot summarise): first matches and
    counters equal libpcap's on 2,500 of the corpus's frames."""
    summarised = [expr for expr, prog in CORPUS if rule_conjunctions(prog) is not None]
    others = [expr for expr, prog in CORPUS if rule_conjunctions(prog) is None]
    assert len(summarised) >= 60
    chosen = summarised[group:group + 40]
    if group:  # stretches of three summarised rules, one that is not after each
        chosen = [e for i in range(0, len(chosen), 3) for e in [*chosen[i:i + 3], others[(group + i) % len(others)]]]
    ruleset = rules(*[{"id": i + 1, "expr": expr, "action": "drop" if i % 3 else "pass"}
                      for i, expr in enumerate(chosen)])
    dp_tuples.deploy(ruleset)
    assert tuple_entries(dp_tuples) > 0
    assert_first_libpcap_match(dp_tuples, ruleset, FRAMES[::4])
