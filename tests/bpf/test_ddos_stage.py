"""The ddos XDP stage in the kernel (BPF_PROG_TEST_RUN through the entry program): rule order,
actions, counters, rate limits, sampling, capture, 1000 rules, and the atomic rule-set swap."""

import collections
import random
import threading
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from bpfnet.ddos import dataplane as dataplane_module
from bpfnet.ddos.config import DdosState, Rule
from bpfnet.ddos.dataplane import CAPTURE_DROP, DdosDataplane, DeployError
from bpfnet.ddos.pcap import CompiledFilter
from bpfnet.ddos.samples import SampleReader

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp(dport: int, src: str = "10.0.0.1", size: int = 0) -> bytes:
    return bytes(ETH / IP(src=src, dst="10.0.0.2") / UDP(sport=40000, dport=dport) / (b"x" * size))


def tcp(dport: int, flags: str = "S") -> bytes:
    return bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=dport, flags=flags))


def rules(*specs: dict) -> list[Rule]:
    return DdosState(rules=[Rule(**spec) for spec in specs]).rules


@pytest.fixture
def dp():
    with DdosDataplane.load() as plane:
        yield plane


def run(dp: DdosDataplane, frame: bytes) -> int:
    result = dp.entry.test_run(frame)
    assert result.data == frame  # the stage never rewrites packets
    return result.retval


def test_without_rules_everything_passes_unmatched(dp):
    assert run(dp, udp(53)) == XDP_PASS
    assert dp.total_counts()["pass_no_match"] == {"packets": 1, "bytes": len(udp(53))}


def test_first_match_decides_and_pass_exempts(dp):
    dp.deploy(rules({"id": 1, "expr": "tcp dst port 22", "action": "pass"},
                    {"id": 2, "expr": "tcp", "action": "drop"},
                    {"id": 3, "expr": "udp dst port 53", "action": "drop"},
                    {"id": 4, "expr": "udp", "action": "pass"}))
    table = [(tcp(22), XDP_PASS, 1), (tcp(80), XDP_DROP, 2), (udp(53), XDP_DROP, 3), (udp(54), XDP_PASS, 4),
             (bytes(ETH / IPv6() / UDP(sport=1, dport=53)), XDP_DROP, 3),  # "udp" covers IPv6
             (bytes(ETH / Dot1Q(vlan=5) / IP() / UDP(sport=1, dport=53)), XDP_PASS, 0)]  # no "vlan": none
    sent: dict[int, list[int]] = {}
    for frame, verdict, rule in table:
        assert run(dp, frame) == verdict, (frame.hex(), rule)
        sent.setdefault(rule, []).append(len(frame))
    for rule_id in (1, 2, 3, 4):
        counters = dp.counters(rule_id)
        assert (counters.packets, counters.bytes) == (len(sent[rule_id]), sum(sent[rule_id]))
        assert counters.last_ns > 0
    totals = dp.total_counts()
    assert totals["pass_rule"]["packets"] == 2 and totals["drop_rule"]["packets"] == 3
    assert totals["pass_no_match"]["packets"] == 1


def test_limit_rule_passes_its_burst_then_drops(dp):
    dp.deploy(rules({"id": 7, "expr": "udp", "action": "limit", "rate": 0, "burst": 5}))
    verdicts = [run(dp, udp(1000 + i)) for i in range(12)]
    assert verdicts == [XDP_PASS] * 5 + [XDP_DROP] * 7  # no refill at rate 0
    totals = dp.total_counts()
    assert totals["pass_limit"]["packets"] == 5 and totals["drop_limit"]["packets"] == 7
    assert dp.counters(7).packets == 12


def test_limit_refills_at_its_rate(dp):
    dp.deploy(rules({"id": 7, "expr": "udp", "action": "limit", "rate": 1, "burst": 3}))
    start = time.monotonic()
    passed = sum(run(dp, udp(1000)) == XDP_PASS for _ in range(40))
    elapsed = time.monotonic() - start
    # 3 from the full bucket, plus one per whole second that went by (1 pps)
    assert 3 <= passed <= 3 + int(elapsed) + 1


def test_per_source_limit_gives_each_source_its_bucket(dp):
    dp.deploy(rules({"id": 9, "expr": "udp dst port 53", "action": "limit", "rate": 0, "burst": 2,
                     "per_source": True}))
    a = [run(dp, udp(53, src="192.0.2.1")) for _ in range(5)]
    b = [run(dp, udp(53, src="192.0.2.2")) for _ in range(5)]
    v6 = [run(dp, bytes(ETH / IPv6(src="2001:db8::7") / UDP(sport=1, dport=53))) for _ in range(3)]
    assert a == b == [XDP_PASS] * 2 + [XDP_DROP] * 3
    assert v6 == [XDP_PASS, XDP_PASS, XDP_DROP]
    assert run(dp, udp(54, src="192.0.2.1")) == XDP_PASS  # not matched: not limited
    totals = dp.total_counts()
    assert totals["pass_limit"]["packets"] == 6 and totals["drop_limit_source"]["packets"] == 7


def test_sampling_sends_rule_verdict_and_first_128_bytes(dp):
    dp.deploy(rules({"id": 3, "expr": "udp dst port 53", "action": "drop"}))
    dp.set_config(sample_every=1)
    big, small = udp(53, size=400), udp(80)
    with SampleReader(dp.samples) as reader:
        run(dp, big)
        run(dp, small)
        samples = reader.read(timeout_ms=1000)
        dp.set_config(sample_every=0)
        run(dp, big)
        assert reader.read() == []
    assert [(s.rule, s.action, s.verdict, s.pkt_len) for s in samples] == [
        (3, "drop", "drop", len(big)), (0, "none", "pass", len(small))]
    assert samples[0].frame == big[:128] and samples[1].frame == small
    fields = samples[0].fields
    assert (str(fields.src_address), fields.dst_port, fields.protocol) == ("10.0.0.1", 53, 17)
    assert dp.total_counts()["sampled"]["packets"] == 2


def test_one_in_n_sampling_samples_about_one_in_n(dp):
    dp.set_config(sample_every=4)
    with SampleReader(dp.samples) as reader:
        for _ in range(400):
            run(dp, udp(80))
        count = len(reader.read())
    assert count == dp.total_counts()["sampled"]["packets"]
    assert 40 <= count <= 200  # binomial(400, 1/4): mean 100, these bounds are > 10 sigma away


def test_capture_of_drops_keeps_whole_frames(dp):
    dp.deploy(rules({"id": 5, "expr": "udp dst port 53", "action": "drop"}))
    dp.set_config(capture=CAPTURE_DROP)
    frame = udp(53, size=1400)
    with SampleReader(dp.captures) as reader:
        run(dp, frame)
        run(dp, udp(80))  # passed: not captured
        records = reader.read(timeout_ms=1000)
    assert [(r.rule, r.verdict, r.frame) for r in records] == [(5, "drop", frame)]


def test_a_thousand_rules_in_one_list_load_and_the_last_one_matches(dp):
    many = [{"id": i, "expr": f"udp[8:2] = {i}", "action": "pass"} for i in range(1, 1000)]  # any key
    dp.deploy(rules(*many, {"id": 1000, "expr": "udp and ip[8] = 64", "action": "drop"}))
    assert (dp.active().chunks, dp.active().groups) == (4, 0)
    assert run(dp, udp(9)) == XDP_DROP  # TTL 64 and no payload for udp[8:2]: only the last rule
    assert run(dp, bytes(ETH / IP() / UDP(sport=1, dport=9) / b"\x02\xbc")) == XDP_PASS  # 700
    assert dp.counters(1000).packets == 1 and dp.counters(700).packets == 1


def test_a_thousand_port_rules_are_one_value_lookup_in_a_straight_program(dp):
    many = [{"id": i, "expr": f"udp dst port {10000 + i}", "action": "pass"} for i in range(1, 1000)]
    dp.deploy(rules(*many, {"id": 1000, "expr": "udp dst port 9", "action": "drop"}))
    # (was grouped by port, 1,000 chunks behind the head's search: one value run costs less)
    assert (dp.active().chunks, dp.active().groups) == (1, 0)
    assert run(dp, udp(9)) == XDP_DROP
    assert run(dp, bytes(ETH / IPv6() / UDP(sport=1, dport=9))) == XDP_DROP
    assert run(dp, udp(10000 + 700)) == XDP_PASS
    assert run(dp, udp(8)) == XDP_PASS
    assert dp.counters(1000).packets == 2 and dp.counters(700).packets == 1
    assert dp.total_counts()["pass_no_match"]["packets"] == 1


def test_counters_survive_redeploys_of_the_same_rule_and_reset_when_it_changes(dp):
    dp.deploy(rules({"id": 1, "expr": "udp", "action": "drop"}))
    run(dp, udp(1))
    dp.deploy(rules({"id": 2, "expr": "tcp", "action": "drop"}, {"id": 1, "expr": "udp", "action": "drop"}))
    assert dp.counters(1).packets == 1
    dp.deploy([])
    dp.deploy(rules({"id": 1, "expr": "udp", "action": "drop"}))  # removed and back unchanged
    assert dp.counters(1).packets == 1
    dp.deploy(rules({"id": 1, "expr": "udp", "action": "pass"}))
    assert dp.counters(1).packets == 0
    dp.deploy([])
    assert run(dp, udp(1)) == XDP_PASS and dp.counters(1).packets == 0


def test_a_failed_deploy_leaves_the_previous_set(dp, monkeypatch):
    dp.deploy(rules({"id": 1, "expr": "udp", "action": "drop"}))
    before = dp.active()
    real, calls = dataplane_module.chunk_program, []

    def second_chunk_broken(*args):
        calls.append(args)
        code = real(*args)
        return code[:-8] if len(calls) == 2 else code  # drop the final exit: the verifier refuses it

    monkeypatch.setattr(dataplane_module, "chunk_program", second_chunk_broken)
    many = [{"id": i, "expr": f"ip[8] = {i % 256} and tcp", "action": "pass"} for i in range(1, 400)]
    with pytest.raises(DeployError, match="verifier"):
        dp.deploy(rules(*many))
    assert dp.active() == before
    assert run(dp, udp(1)) == XDP_DROP and dp.counters(1).packets == 1


def test_swap_is_atomic_no_packet_sees_a_mix(dp):
    """Set A matches UDP in its second chunk (rule 300, drop); set B matches it in its first chunk
    (rule 1000, pass) and has a decoy "udp" rule (2000) in its second chunk that only a packet
    which started in A's first chunk and continued in B's second chunk could reach."""
    filler = [{"id": i, "expr": f"ip[8] = {i % 256} and tcp", "action": "pass"} for i in range(1, 257)]
    set_a = rules(*filler, {"id": 300, "expr": "udp", "action": "drop"})
    set_b = rules({"id": 1000, "expr": "udp", "action": "pass"},
                  *[{"id": 1000 + i, "expr": f"ip[8] = {i} and tcp", "action": "pass"} for i in range(1, 256)],
                  {"id": 2000, "expr": "udp", "action": "drop"})
    dp.deploy(set_a)
    frame, stop, runs, repeat = udp(53), threading.Event(), [], 200

    def traffic():  # each run executes the stage `repeat` times in the kernel, without the GIL
        while not stop.is_set():
            runs.append(dp.entry.test_run(frame, repeat=repeat).retval)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        for flip in range(20):
            dp.deploy(set_b if flip % 2 == 0 else set_a)
    finally:
        stop.set()
        sender.join()
    assert dp.counters(2000).packets == 0
    assert dp.counters(300).packets + dp.counters(1000).packets == len(runs) * repeat


POOL = ["udp dst port {port}", "tcp dst port {port}", "dst port {port}", "ip6 and udp dst port {port}",
        "udp dst port {port} and src net 10.0.0.0/8", "tcp dst port {port} and tcp[tcpflags] & tcp-syn != 0",
        "icmp", "ip[8] < 64", "tcp[tcpflags] & tcp-syn != 0", "ip6 and udp", "vlan", "not ip",
        "udp[8:2] = 0x6869", "src host 10.0.0.1"]
PORTS = [22, 53, 80, 123, 443, 8080]


def random_frame(rng: random.Random) -> bytes:
    src = rng.choice(["10.0.0.1", "10.2.3.4", "192.0.2.1"])
    l3 = IP(src=src, dst="10.0.0.2", ttl=rng.choice([32, 64, 128])) if rng.random() < 0.7 else IPv6()
    port = rng.choice(PORTS)
    l4 = rng.choice([UDP(sport=5000, dport=port) / b"hi", TCP(sport=5000, dport=port, flags=rng.choice(["S", "A"])),
                     UDP(sport=port, dport=5000)])
    frame = ETH / l3 / l4 if rng.random() < 0.9 else ETH / Dot1Q(vlan=3) / l3 / l4
    return bytes(frame)


@pytest.mark.parametrize("seed", range(3))
def test_grouped_rule_sets_decide_like_the_first_libpcap_match(dp, seed):
    """Random ordered rule sets (port rules get grouped, the rest is any-key) against libpcap's
    first match on every frame: same verdict, and exactly the same per-rule counters."""
    rng = random.Random(seed)
    specs = [{"id": i, "expr": rng.choice(POOL).format(port=rng.choice(PORTS)),
              "action": rng.choice(["drop", "pass"])} for i in range(1, 61)]
    ruleset = rules(*specs)
    dp.deploy(ruleset)
    assert dp.active().groups > 0
    assert_first_libpcap_match(dp, ruleset, [random_frame(rng) for _ in range(1500)])


def assert_first_libpcap_match(dp: DdosDataplane, ruleset: list[Rule], frames: list[bytes]) -> None:
    """Every frame gets the verdict of the first rule libpcap matches, and the per-rule counters
    count exactly those first matches."""
    matchers = [(rule, CompiledFilter.from_expr(rule.expr)) for rule in ruleset]
    expected_counts = collections.Counter()
    for frame in frames:
        first = next((rule for rule, matcher in matchers if matcher.matches(frame)), None)
        if first is not None:
            expected_counts[first.id] += 1
        expected = XDP_DROP if first is not None and first.action == "drop" else XDP_PASS
        assert run(dp, frame) == expected, (frame.hex(), first)
    assert {r.id: dp.counters(r.id).packets for r in ruleset} == {r.id: expected_counts[r.id] for r in ruleset}


NET_POOL = ["src net 10.{a}.0.0/16", "src net 10.{a}.{b}.0/24", "src host 10.{a}.{b}.7", "ip src net 10.{a}.0.0/16",
            "arp src host 10.{a}.{b}.7", "udp dst port 53", "tcp", "not src net 10.{a}.0.0/16"]


def source_frame(rng: random.Random) -> bytes:
    src = f"10.{rng.randrange(3)}.{rng.randrange(3)}.{rng.choice([7, 8])}"
    kind = rng.random()
    if kind < 0.15:
        frame = bytes(ETH / ARP(op=rng.choice([1, 2]), psrc=src, pdst="10.0.0.2"))
    elif kind < 0.2:
        frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x8035)
                      / ARP(psrc=src, pdst="10.0.0.2"))  # RARP: ARP's layout
    else:
        l4 = rng.choice([UDP(sport=5000, dport=rng.choice([53, 54])), TCP(sport=5000, dport=80)])
        frame = bytes(ETH / IP(src=src, dst="10.0.0.2") / l4)
    if rng.random() < 0.1:  # truncated inside or just after the source address
        frame = frame[:rng.randrange(14, 34)]
    return frame


@pytest.mark.parametrize("seed", range(3))
def test_source_network_runs_decide_like_the_first_libpcap_match(dp, seed):
    """Rule sets full of nested source networks (run as prefix lookups) mixed with other rules:
    same verdict as libpcap's first match on every frame, ARP, RARP and truncated ones included,
    and exactly the same per-rule counters."""
    rng = random.Random(seed)
    specs = [{"id": i, "expr": rng.choice(NET_POOL).format(a=rng.randrange(3), b=rng.randrange(3)),
              "action": rng.choice(["drop", "drop", "pass"])} for i in range(1, 41)]
    ruleset = rules(*specs)
    dp.deploy(ruleset)
    assert_first_libpcap_match(dp, ruleset, [source_frame(rng) for _ in range(1500)])
    assert len(list(dp.prefixes.keys())) > 0  # the runs really went through the lookup


def test_a_thousand_source_networks_are_one_lookup_and_a_redeploy_replaces_its_entries(dp):
    nets = [{"id": i + 1, "expr": f"src net 10.{i // 256}.{i % 256}.0/24"} for i in range(1000)]
    dp.deploy(rules(*nets, {"id": 1001, "expr": "udp dst port 53"}))
    assert dp.active().chunks == 2  # the port 53 group and the any-key group: a run and a rule each
    assert run(dp, udp(53, src="10.3.231.9")) == XDP_DROP and dp.counters(1000).packets == 1
    assert run(dp, udp(53, src="10.4.0.1")) == XDP_DROP and dp.counters(1001).packets == 1
    assert run(dp, udp(54, src="10.4.0.1")) == XDP_PASS
    entries = len(list(dp.prefixes.keys()))
    assert entries == 3 * 1000  # IPv4, ARP and RARP networks of one run shared by both groups
    dp.deploy(rules({"id": 1, "expr": "src net 10.0.0.0/24"}, {"id": 2, "expr": "src net 10.0.1.0/24"}))
    assert len(list(dp.prefixes.keys())) == entries + 6  # the old set's bank stays until the next flip
    dp.deploy(rules({"id": 1, "expr": "src net 10.0.0.0/24"}, {"id": 2, "expr": "src net 10.0.1.0/24"}))
    assert len(list(dp.prefixes.keys())) == 12
    assert run(dp, udp(54, src="10.0.1.200")) == XDP_DROP and run(dp, udp(54, src="10.3.231.9")) == XDP_PASS


# --- IPv6 rules as the detector writes them (issue 19) -----------------------------------------------
SERVER6 = "2001:db8:100::10"
DETECTOR_RULES6 = [
    "ip6 and src net 2001:db8::/64 and udp dst port 53",
    f"dst host {SERVER6} and ip6[6] = 17 and udp dst port 443 and src net 2001:db8:5300::/64 and ip6[7] = 111",
    f"dst host {SERVER6} and ip6[6] = 6 and tcp dst port 8080 and ip6[53] & 0x03 = 0x03",
    f"dst host {SERVER6} and ip6[6] = 17 and udp dst port 443 and ip6[4:2] >= 1100 and ip6[4:2] <= 1400",
]


def v6(l4, src="2001:db8::7", dst=SERVER6, hlim=64, payload=b"") -> bytes:
    return bytes(ETH / IPv6(src=src, dst=dst, hlim=hlim) / l4 / payload)


def test_ipv6_detector_rules_compile_and_drop_exactly_their_packets(dp):
    """The expressions the detector renders for IPv6 floods (a source /64 and a fixed field, a
    TCP flag pattern, a payload-length range) compile and drop exactly the frames they describe:
    a verdict table, then libpcap's first match on near misses (other /64, port, hop limit,
    flags, length, IPv4)."""
    ruleset = rules(*({"id": i, "expr": expr} for i, expr in enumerate(DETECTOR_RULES6, 1)))
    dp.deploy(ruleset)
    table = [
        (v6(UDP(sport=9, dport=53), src="2001:db8::ffff:1"), XDP_DROP, 1),
        (v6(UDP(sport=9, dport=53), src="2001:db8:0:1::1"), XDP_PASS, 0),  # next /64
        (v6(UDP(sport=9, dport=54)), XDP_PASS, 0),
        (v6(UDP(sport=9, dport=443), src="2001:db8:5300::abcd", hlim=111, payload=b"q" * 20), XDP_DROP, 2),
        (v6(UDP(sport=9, dport=443), src="2001:db8:5300::abcd", hlim=110, payload=b"q" * 20), XDP_PASS, 0),
        (v6(TCP(sport=9, dport=8080, flags="SF")), XDP_DROP, 3),
        (v6(TCP(sport=9, dport=8080, flags="SFPU")), XDP_DROP, 3),
        (v6(TCP(sport=9, dport=8080, flags="S")), XDP_PASS, 0),
        (v6(UDP(sport=9, dport=443), payload=bytes(1200)), XDP_DROP, 4),
        (v6(UDP(sport=9, dport=443), payload=bytes(1000)), XDP_PASS, 0),
        (bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=9, dport=53)), XDP_PASS, 0),
    ]
    for frame, verdict, rule in table:
        assert run(dp, frame) == verdict, (frame.hex(), rule)
    assert [dp.counters(i).packets for i in range(1, 5)] == [1, 1, 2, 1]
    rng = random.Random(6)
    near = [v6(rng.choice([UDP(sport=9, dport=rng.choice([53, 443])),
                           TCP(sport=9, dport=8080, flags=rng.randrange(256))]),
               src=rng.choice(["2001:db8::1", "2001:db8:5300::1", "2001:db8:5300:1::1"]),
               hlim=rng.choice([64, 111]), payload=bytes(rng.choice([0, 20, 1080, 1092, 1392, 1393])))
            for _ in range(300)]
    fresh = rules(*({"id": i + 10, "expr": expr} for i, expr in enumerate(DETECTOR_RULES6, 1)))  # zero counters
    dp.deploy(fresh)
    assert_first_libpcap_match(dp, fresh, near)
