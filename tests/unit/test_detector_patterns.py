"""Signatures over bit patterns and ranges (issue 19): attacks that share no exact field value,
only a pattern of bits (fragments, odd TCP flag combinations) or a range (lengths, TCP windows),
mixed into the legitimate traffic of test_detector_shapes; and the new fields and predicate
families held to libpcap's own interpreter."""

from __future__ import annotations

import ipaddress
import random
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfnet.ddos.detector import Detector
from bpfnet.ddos.detector_events import EventKind
from bpfnet.ddos.fingerprint import (
    DST_PORT,
    FRAGMENT,
    FRAGMENT_NEXT_HEADER,
    FRAGMENT_OFFSET,
    ICMP_CODE,
    ICMP_TYPE,
    IP_FLAGS,
    IP_ID,
    IP_LENGTH,
    MORE_FRAGMENTS,
    SRC_PORT,
    TCP_DATA_OFFSET,
    TCP_FLAGS,
    TCP_WINDOW,
    TTL,
    UDP_LENGTH_MISMATCH,
    BitsPredicate,
    Destination,
    Fingerprint,
    PacketFields,
    Predicate,
    RangePredicate,
)
from bpfnet.ddos.pcap import CompiledFilter, PcapError, compile_filter
from unit.test_detector_shapes import (
    ATTACK_PPS,
    CONFIG,
    END,
    LEGIT_PPS,
    SAMPLE_BYTES,
    SERVER,
    SERVER6,
    START,
    STOP,
    TCP_OPTIONS,
    Pool,
    Simulation,
    Source,
    kinds,
    legit6_pool,
    legit_pool,
    of_kind,
)

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))


def _source(rng: random.Random) -> str:
    return str(ipaddress.ip_address(rng.randrange(1 << 24, 223 << 24)))


def _legit_ttl(rng: random.Random) -> int:
    return rng.choice([64, 128]) - rng.randrange(4, 20)  # as the legitimate clients'


# --- attacks that only a bit pattern or a range describes --------------------------------------


@cache
def fragment_pool() -> Pool:
    """Non-first UDP fragments: random offsets, sources, ids, lengths and MF bits."""
    def make(rng):
        return (IP(src=_source(rng), dst=SERVER, ttl=rng.randrange(30, 250), id=rng.randrange(65536),
                   flags=rng.choice(["", "MF"]), frag=rng.randrange(1, 8000), proto=17)
                / Raw(rng.randbytes(rng.randrange(8, 1400))))
    return Pool.build("udp fragments", make, 500, seed=70)


@cache
def syn_fin_pool() -> Pool:
    """SYN+FIN with random PSH/URG/ECE/CWR bits (16 flag values), otherwise like the clients'
    ACKs: DF, their TTLs, windows and timestamp option (IP length 52)."""
    def make(rng):
        extra = rng.choice([0, PSH, URG, ECE, CWR]) | rng.choice([0, PSH, URG, ECE, CWR])
        return (IP(src=_source(rng), dst=SERVER, ttl=_legit_ttl(rng), id=rng.randrange(65536), flags="DF")
                / TCP(sport=rng.randrange(32768, 61000), dport=80, flags=SYN | FIN | extra, seq=rng.randrange(1 << 32),
                      window=rng.choice([64240, 65535, 502]),
                      options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]))
    return Pool.build("syn+fin", make, 500, seed=71)


@cache
def length_range_pool() -> Pool:
    """UDP to the DNS port, 1100-1400 bytes long, random payload, sources, ports and ids."""
    def make(rng):
        return (IP(src=_source(rng), dst=SERVER, ttl=_legit_ttl(rng), id=rng.randrange(65536), flags="DF")
                / UDP(sport=rng.randrange(1024, 65536), dport=53) / Raw(rng.randbytes(rng.randrange(1072, 1372))))
    return Pool.build("length range", make, 500, seed=72)


@cache
def window_range_pool() -> Pool:
    """SYNs exactly like the clients' (options, DF, TTLs) but with windows in 1024-4096."""
    def make(rng):
        return (IP(src=_source(rng), dst=SERVER, ttl=_legit_ttl(rng), id=rng.randrange(65536), flags="DF")
                / TCP(sport=rng.randrange(32768, 61000), dport=80, flags="S", seq=rng.randrange(1 << 32),
                      window=rng.randrange(1024, 4097), options=TCP_OPTIONS))
    return Pool.build("window range", make, 500, seed=73)


@cache
def udp_length_mismatch_pool() -> Pool:
    """UDP to the DNS port whose UDP length field lies (random), payload like a DNS query's."""
    def make(rng):
        payload = rng.randbytes(rng.randrange(20, 60))
        return (IP(src=_source(rng), dst=SERVER, ttl=_legit_ttl(rng), id=rng.randrange(65536), flags="DF")
                / UDP(sport=rng.randrange(1024, 65536), dport=53, len=rng.randrange(200, 60000)) / Raw(payload))
    return Pool.build("udp length mismatch", make, 500, seed=74)


@cache
def icmp_type_pool() -> Pool:
    """ICMP timestamp requests (type 13), random codes, sources and lengths."""
    def make(rng):
        return (IP(src=_source(rng), dst=SERVER, ttl=_legit_ttl(rng), id=rng.randrange(65536), flags="DF")
                / ICMP(type=13, code=rng.randrange(4), id=rng.randrange(65536))
                / Raw(rng.randbytes(rng.randrange(12, 200))))
    return Pool.build("icmp type", make, 500, seed=75)


PATTERN_SHAPES = {
    # name: (pool, a term the rule must hold, the destination it is for)
    "fragments": (fragment_pool, "ip[6:2] & 0x1fff != 0", "198.51.100.10 udp"),
    "syn+fin": (syn_fin_pool, "tcp[tcpflags] & (tcp-fin|tcp-syn) = (tcp-fin|tcp-syn)", "198.51.100.10 tcp port 80"),
    "length range": (length_range_pool, "ip[2:2] >= ", "198.51.100.10 udp port 53"),
    "window range": (window_range_pool, "tcp[14:2] >= ", "198.51.100.10 tcp port 80"),
    "udp length mismatch": (udp_length_mismatch_pool, "udp[4:2] != ip[2:2] - ((ip[0] & 0xf) << 2)",
                            "198.51.100.10 udp port 53"),
    "icmp type": (icmp_type_pool, "icmp[icmptype] = 13", "198.51.100.10 icmp"),
}


def test_pattern_pools_share_no_exact_value_the_old_fields_could_use():
    """What makes these shapes new: the field that defines each takes many values."""
    assert len({p.frag for p in fragment_pool().fields}) > 100
    assert len({p.tcp_flags for p in syn_fin_pool().fields}) > 4
    assert len({p.ip_length for p in length_range_pool().fields}) > 100
    assert len({p.tcp_window for p in window_range_pool().fields}) > 100
    # and libpcap agrees that the term describes the whole attack and none of the clients
    for make, term, _ in PATTERN_SHAPES.values():
        if term.endswith(">= "):
            continue
        assert make().match_share(term) == 1.0, term
        assert legit_pool().match_share(term) == 0.0, term


@pytest.mark.parametrize("shape", PATTERN_SHAPES)
def test_pattern_attack_gets_a_rule_from_its_pattern_or_range(shape):
    make_pool, term, destination = PATTERN_SHAPES[shape]
    pool = make_pool()
    sim = Simulation(Detector(CONFIG), [Source(legit_pool(), LEGIT_PPS), Source(pool, ATTACK_PPS, START, STOP)])
    sim.run_until(END)

    assert kinds(sim.events) == ["attack_started", "rule_added", "rule_removed", "attack_ended"]
    started, added = sim.events[:2]
    assert started.destination == added.destination == destination
    assert START < added.time <= START + 2 * CONFIG.window
    expression = added.rule.expression
    assert term in expression
    compile_filter(expression)
    # the done-when of issue 19, on libpcap's verdicts over the full frames
    assert pool.match_share(expression) >= 0.99, expression
    assert legit_pool().match_share(expression) <= 0.001, expression
    chosen = next(c for c in added.evidence.candidates if c.verdict == "chosen")
    assert chosen.collateral <= CONFIG.max_collateral


def test_ipv6_fragment_flood_gets_a_rule_on_the_fragment_header():
    def make(rng):
        src = f"2a00:{rng.randrange(1 << 16):x}::{rng.randrange(1 << 16):x}"
        return (IPv6(src=src, dst=SERVER6, hlim=rng.randrange(30, 250))
                / IPv6ExtHdrFragment(nh=17, offset=rng.randrange(1, 8000), m=rng.randrange(2),
                                     id=rng.randrange(1 << 32))
                / Raw(rng.randbytes(rng.randrange(8, 1200))))
    pool = Pool.build("ipv6 fragments", make, 500, seed=76)
    sim = Simulation(Detector(CONFIG), [Source(legit_pool(), LEGIT_PPS), Source(legit6_pool(), LEGIT_PPS),
                                        Source(pool, ATTACK_PPS, START, STOP)])
    sim.run_until(END)
    [added] = of_kind(sim.events, EventKind.RULE_ADDED)
    expression = added.rule.expression
    assert expression.startswith("dst host 2001:db8:100::10 and ip6[6] = 44")
    assert "ip6[40] = 17" in expression  # the fragments' next header
    assert pool.match_share(expression) >= 0.99
    assert legit6_pool().match_share(expression) == legit_pool().match_share(expression) == 0.0


def test_random_values_make_no_range():
    """A SYN flood's random windows, TTLs and ports fill their whole domain: no range describes them."""
    from unit.test_detector_shapes import syn_flood_pool
    sim = Simulation(Detector(CONFIG), [Source(legit_pool(), LEGIT_PPS), Source(syn_flood_pool(), ATTACK_PPS,
                                                                                 START, STOP)])
    sim.run_until(START + 1)
    [added] = of_kind(sim.events, EventKind.RULE_ADDED)
    for field in ("tcp[14:2]", "ip[8]", "portrange", "ip[4:2]"):
        assert field not in added.rule.expression


def test_range_is_widened_but_never_over_a_normal_value():
    from bpfnet.ddos.fingerprint import search_fields
    from bpfnet.ddos.normal_traffic import NormalTraffic
    from bpfnet.ddos.signature import search_signature
    scope = Destination(4, int(ipaddress.ip_address(SERVER)), 17, 53)
    normal = NormalTraffic(search_fields(CONFIG.payload_offsets, with_dst_port=False), CONFIG.normal_samples)
    for p in legit_pool().fields:
        if scope.contains(p):
            normal.add(p)
    attack = list(length_range_pool().fields)
    result = search_signature(scope, attack, normal, 0.0, CONFIG)
    [length] = [p for p in result.chosen.predicates if isinstance(p, RangePredicate) and p.field == IP_LENGTH]
    lengths = [p.ip_length for p in attack]
    assert length.low < min(lengths) and length.high > max(lengths)  # widened ...
    assert not any(length.low <= p.ip_length <= length.high for p in normal.samples)  # ... over no normal value


# --- rendering: every family and new field agrees with libpcap -----------------------------------


def frame(pkt) -> bytes:
    return bytes(ETH / pkt)


def test_rendering_of_the_new_families():
    v4_tcp = Destination(4, int(ipaddress.ip_address("198.51.100.1")), 6, 80)
    v4_udp = Destination(4, int(ipaddress.ip_address("198.51.100.1")), 17, None)
    cases = [
        (Fingerprint(v4_tcp, (BitsPredicate(TCP_FLAGS, SYN | FIN, SYN | FIN),)),
         "dst host 198.51.100.1 and tcp and tcp dst port 80 and tcp[tcpflags] & (tcp-fin|tcp-syn) = (tcp-fin|tcp-syn)"),
        (Fingerprint(v4_tcp, (BitsPredicate(TCP_FLAGS, ACK | RST, 0),)),
         "dst host 198.51.100.1 and tcp and tcp dst port 80 and tcp[tcpflags] & (tcp-rst|tcp-ack) = 0"),
        (Fingerprint(v4_udp, (Predicate(FRAGMENT, frozenset({1})), BitsPredicate(IP_FLAGS, 0b010, 0))),
         "dst host 198.51.100.1 and udp and ip[6:2] & 0x1fff != 0 and ip[6] & 0x40 = 0x0"),
        (Fingerprint(v4_udp, (RangePredicate(IP_LENGTH, 1200, 1400), RangePredicate(SRC_PORT, 1024, 2047),
                              RangePredicate(DST_PORT, 0, 1023))),
         "dst host 198.51.100.1 and udp and ip[2:2] >= 1200 and ip[2:2] <= 1400 and udp src portrange 1024-2047"
         " and udp dst portrange 0-1023"),
        (Fingerprint(v4_tcp, (RangePredicate(TCP_WINDOW, 0, 1023), Predicate(TCP_DATA_OFFSET, frozenset({5})))),
         "dst host 198.51.100.1 and tcp and tcp dst port 80 and tcp[14:2] <= 1023 and tcp[12] & 0xf0 = 0x50"),
        (Fingerprint(v4_udp, (RangePredicate(FRAGMENT_OFFSET, 1, 8191), Predicate(UDP_LENGTH_MISMATCH,
                                                                                 frozenset({1})))),
         "dst host 198.51.100.1 and udp and ip[6:2] & 0x1fff >= 1 and udp[4:2] != ip[2:2] - ((ip[0] & 0xf) << 2)"),
    ]
    for fp, expected in cases:
        assert fp.expression() == expected
        assert compile_filter(expected)


def test_new_fields_read_what_libpcap_reads():
    frames = [
        frame(IP(src="192.0.2.7", dst="198.51.100.1", flags="MF", frag=0) / UDP(sport=1, dport=2, len=99)
              / Raw(b"x" * 20)),
        frame(IP(src="192.0.2.7", dst="198.51.100.1", flags="MF", frag=185, proto=17) / Raw(b"y" * 40)),
        frame(IP(src="192.0.2.7", dst="198.51.100.1", flags="evil+DF") / TCP(sport=9, dport=80, flags="SF",
                                                                             window=1234, options=[("MSS", 1460)])),
        frame(IP(src="192.0.2.7", dst="198.51.100.1") / ICMP(type=3, code=13) / Raw(b"z" * 28)),
        frame(IPv6(src="2001:db8::7", dst="2001:db8::1") / IPv6ExtHdrFragment(nh=6, offset=77, m=1) / Raw(b"w" * 16)),
        frame(IPv6(src="2001:db8::7", dst="2001:db8::1") / UDP(sport=5, dport=6, len=7) / Raw(b"v" * 16)),
        frame(IPv6(src="2001:db8::7", dst="2001:db8::1") / TCP(sport=5, dport=6, window=7, flags="R")),
    ]
    fields = (IP_FLAGS, FRAGMENT, FRAGMENT_OFFSET, MORE_FRAGMENTS, FRAGMENT_NEXT_HEADER, TCP_WINDOW, TCP_DATA_OFFSET,
              UDP_LENGTH_MISMATCH, ICMP_TYPE, ICMP_CODE)
    seen = set()
    for data in frames:
        p = PacketFields.from_frame(data)
        scope = Destination.of(p, with_port=False)
        for f in fields:
            value = f.value(p)
            if value is None:
                continue
            seen.add(f.name)
            other = value ^ 1
            for pred, expected in ((Predicate(f, frozenset({value})), True),
                                   (Predicate(f, frozenset({other})), False)):
                expression = Fingerprint(scope, (pred,)).expression()
                assert CompiledFilter.from_expr(expression).matches(data) == expected, expression
    assert seen == {f.name for f in fields}


# --- property: bit patterns and ranges match in Python as in libpcap -------------------------------


@st.composite
def packets(draw):
    family = draw(st.sampled_from([4, 4, 6]))
    dst = "198.51.100.1" if family == 4 else "2001:db8::1"
    src = "192.0.2.7" if family == 4 else "2001:db8::7"
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "fragment"]))
    payload = Raw(b"\x00" * draw(st.integers(0, 64)))
    if kind == "udp":
        udp_len = draw(st.sampled_from([None, 0, 8, 30, 1000]))
        l4 = UDP(sport=draw(st.integers(1, 65535)), dport=53, len=udp_len) / payload
    elif kind == "tcp":
        l4 = TCP(sport=draw(st.integers(1, 65535)), dport=80, flags=draw(st.integers(0, 255)),
                 window=draw(st.integers(0, 65535)),
                 options=draw(st.sampled_from([[], [("MSS", 1460)], TCP_OPTIONS]))) / payload
    elif kind == "icmp":
        l4 = (ICMP(type=draw(st.integers(0, 20)), code=draw(st.integers(0, 5))) if family == 4
              else Raw(bytes([draw(st.integers(128, 140)), draw(st.integers(0, 5))]) + b"\x00" * 6)) / payload
    else:
        l4 = payload
    if family == 4:
        ip = IP(src=src, dst=dst, ttl=draw(st.integers(1, 255)), id=draw(st.integers(0, 65535)),
                flags=draw(st.integers(0, 7)), frag=draw(st.sampled_from([0, 0, 1, 185, 8191])))
        if kind == "fragment":
            ip.proto = 17
        return frame(ip / l4)
    ip = IPv6(src=src, dst=dst, hlim=draw(st.integers(1, 255)))
    if kind == "icmp":
        ip.nh = 58
    if kind == "fragment":
        return frame(ip / IPv6ExtHdrFragment(nh=17, offset=draw(st.sampled_from([0, 1, 77, 8191])),
                                             m=draw(st.integers(0, 1))) / payload)
    return frame(ip / l4)


PATTERN_FIELDS = [f for f in (TTL, IP_LENGTH, IP_ID, SRC_PORT, DST_PORT, TCP_FLAGS, IP_FLAGS, FRAGMENT_OFFSET,
                              TCP_WINDOW) if f.bit_pattern or f.ranged]


@st.composite
def predicates(draw):
    f = draw(st.sampled_from(PATTERN_FIELDS))
    if f.bit_pattern and (not f.ranged or draw(st.booleans())):
        mask = draw(st.integers(1, f.max_value))
        return BitsPredicate(f, mask, draw(st.integers(0, f.max_value)) & mask)
    low = draw(st.integers(0, f.max_value - 1))
    high = draw(st.integers(low, min(f.max_value, low + draw(st.sampled_from([1, 10, 1000, 1 << 16])))))
    if low == 0 and high == f.max_value:
        high -= 1
    return RangePredicate(f, low, high)


@given(data=st.lists(packets(), min_size=1, max_size=6), preds=st.lists(predicates(), min_size=1, max_size=3),
       with_port=st.booleans())
@settings(max_examples=300, deadline=None)
def test_bit_patterns_and_ranges_agree_with_libpcap(data, preds, with_port):
    base = PacketFields.from_frame(data[0])
    scope = Destination.of(base, with_port=with_port)
    # as the detector builds them: over fields the packet the scope comes from has
    fp = Fingerprint(scope, tuple(p for p in preds if p.field.value(base) is not None))
    try:
        compiled = CompiledFilter.from_expr(fp.expression())
    except PcapError as e:  # libpcap's optimiser proved the filter empty: so must Python's
        assert "rejects all packets" in str(e)
        assert not any(fp.matches(PacketFields.from_frame(d)) for d in data)
        return
    for d in data:
        assert fp.matches(PacketFields.from_frame(d[:SAMPLE_BYTES])) == compiled.matches(d), fp.expression()


# --- property: a pattern or range signature keeps the collateral bound -----------------------------


@given(shape=st.sampled_from(sorted(PATTERN_SHAPES)), start=st.integers(0, 300), size=st.integers(30, 200),
       legit_share=st.sampled_from([0.0, 0.1, 0.3]))
@settings(max_examples=40, deadline=None)
def test_pattern_signature_keeps_the_collateral_bound(shape, start, size, legit_share):
    from bpfnet.ddos.fingerprint import search_fields
    from bpfnet.ddos.normal_traffic import NormalTraffic
    from bpfnet.ddos.signature import search_signature
    pool = PATTERN_SHAPES[shape][0]()
    scope = Destination.of(pool.fields[0], with_port=shape not in ("fragments", "icmp type"))
    normal = NormalTraffic(search_fields(CONFIG.payload_offsets, with_dst_port=scope.port is None),
                           CONFIG.normal_samples)
    legit = [p for p in legit_pool().fields if scope.contains(p)]
    for p in legit[:300]:
        normal.add(p)
    legit_count = int(legit_share * size)
    attack = list(pool.fields[start:start + size]) + legit[300:300 + legit_count]
    result = search_signature(scope, attack, normal, len(legit[300:300 + legit_count]), CONFIG)
    if result.chosen is None:
        return
    chosen = next(c for c in result.candidates if c.verdict == "chosen")
    assert chosen.collateral <= CONFIG.max_collateral
    # on frames the search never saw: libpcap's verdicts over all legitimate traffic of the scope
    assert legit_pool().match_share(result.chosen.expression()) <= 2 * CONFIG.max_collateral
