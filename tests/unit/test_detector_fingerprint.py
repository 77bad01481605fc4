"""Fingerprints: parsing samples, rendering pcap-filter expressions, and agreeing with libpcap.

libpcap's own interpreter (bpfnet.ddos.pcap) is the reference: a fingerprint's Python
`matches` must give the same verdict as its rendered expression on the same frame.
"""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from bpfnet.ddos.fingerprint import (
    DST_PORT,
    SOURCE_PREFIXES,
    SRC_PORT,
    TCP_FLAGS,
    TTL,
    Destination,
    Fingerprint,
    PacketFields,
    ParseError,
    PayloadWord,
    Predicate,
    search_fields,
)
from bpfnet.ddos.pcap import CompiledFilter, PcapError, compile_filter

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def frame(pkt) -> bytes:
    return bytes(ETH / pkt)


def pcap_matches(expr: str, data: bytes) -> bool:
    return CompiledFilter.from_expr(expr).matches(data)


def test_parse_ipv4_udp():
    data = frame(IP(src="192.0.2.7", dst="198.51.100.1", ttl=47, id=0x1234, flags="DF")
                 / UDP(sport=53, dport=40000) / Raw(b"\xde\xad\xbe\xef" * 3))
    p = PacketFields.from_frame(data)
    assert (p.family, p.protocol, p.ttl) == (4, 17, 47)
    assert (str(p.src_address), str(p.dst_address)) == ("192.0.2.7", "198.51.100.1")
    assert (p.ip_length, p.ip_id, p.frag) == (20 + 8 + 12, 0x1234, 0x4000)
    assert (p.src_port, p.dst_port, p.tcp_flags) == (53, 40000, None)
    assert p.payload == b"\xde\xad\xbe\xef" * 3


def test_parse_ipv4_tcp_with_options_and_vlan():
    data = bytes(ETH / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.0.0.2", ihl=6, options=b"\x01\x01\x01\x00")
                 / TCP(sport=1234, dport=80, flags="SA", options=[("MSS", 1460), ("NOP", None)])
                 / Raw(b"GET /"))
    p = PacketFields.from_frame(data)
    assert (p.protocol, p.src_port, p.dst_port, p.tcp_flags, p.vlan) == (6, 1234, 80, 0x12, 7)
    assert p.payload == b"GET /"
    # Rules are plain pcap-filter expressions: like libpcap, a fingerprint never matches a tagged frame.
    fp = Fingerprint(Destination.of(p))
    assert not fp.matches(p) and not pcap_matches(fp.expression(), data)
    untagged = PacketFields.from_frame(bytes(ETH / IP(bytes(IP(data[18:])))))
    assert untagged.vlan is None and fp.matches(untagged)


def test_parse_ipv4_non_first_fragment_has_no_transport_fields():
    fragment = IP(src="10.0.0.1", dst="10.0.0.2", frag=100, proto=17) / Raw(b"x" * 16)
    p = PacketFields.from_frame(frame(fragment))
    assert (p.frag, p.src_port, p.dst_port, p.payload) == (100, None, None, b"")


def test_parse_ipv6_tcp_and_extension_header():
    p = PacketFields.from_frame(frame(IPv6(src="2001:db8::7", dst="2001:db8::1", hlim=33)
                                      / TCP(sport=5, dport=443, flags="S")))
    assert (p.family, p.protocol, p.ttl, p.ip_length, p.tcp_flags, p.dst_port) == (6, 6, 33, 20, 0x02, 443)
    assert str(p.src_address) == "2001:db8::7" and p.ip_id is None and p.frag is None
    ext = PacketFields.from_frame(frame(IPv6(src="2001:db8::7", dst="2001:db8::1") / IPv6ExtHdrHopByHop()
                                        / UDP(sport=1, dport=2)))
    assert (ext.protocol, ext.src_port) == (0, None)


def test_parse_truncated_sample_keeps_header_fields():
    data = frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"z" * 400))[:128]
    p = PacketFields.from_frame(data)
    assert p.ip_length == 20 + 8 + 400 and len(p.payload) == 128 - 14 - 28


@pytest.mark.parametrize("data,message", [
    (b"\x00" * 10, "shorter than an Ethernet header"),
    (bytes(Ether(type=0x0806) / Raw(b"\x00" * 28)), "ethertype 0x0806"),
    (frame(IP(dst="10.0.0.1") / UDP())[:24], "truncated IPv4 header"),
    (bytes(Ether(type=0x0800)) + b"\x65" + b"\x00" * 19, "bad IPv4 version"),
    (bytes(Ether(type=0x86DD)) + b"\x60" + b"\x00" * 20, "truncated IPv6 header"),
])
def test_parse_rejects_malformed(data, message):
    with pytest.raises(ParseError, match=message):
        PacketFields.from_frame(data)


V4_UDP = Destination(4, int(ipaddress.ip_address("198.51.100.1")), 17, 40000)
V6_TCP = Destination(6, int(ipaddress.ip_address("2001:db8::1")), 6, 443)


@pytest.mark.parametrize("fp,expected", [
    (Fingerprint(V4_UDP), "dst host 198.51.100.1 and udp and udp dst port 40000"),
    (Fingerprint(V4_UDP, (Predicate(SRC_PORT, frozenset({53})), Predicate(TTL, frozenset({47})))),
     "dst host 198.51.100.1 and udp and udp dst port 40000 and udp src port 53 and ip[8] = 47"),
    (Fingerprint(V4_UDP, (Predicate(SOURCE_PREFIXES[1], frozenset({0xC00002, 0xC00003})),)),
     "dst host 198.51.100.1 and udp and udp dst port 40000"
     " and (src net 192.0.2.0/24 or src net 192.0.3.0/24)"),
    (Fingerprint(V4_UDP, (Predicate(PayloadWord(0), frozenset({0xDEADBEEF})),),
                 (ipaddress.ip_network("10.0.0.0/8"),)),
     "dst host 198.51.100.1 and udp and udp dst port 40000 and udp[8:4] = 0xdeadbeef"
     " and not src net 10.0.0.0/8"),
    (Fingerprint(V6_TCP, (Predicate(TCP_FLAGS, frozenset({2})), Predicate(TTL, frozenset({64})))),
     "dst host 2001:db8::1 and ip6[6] = 6 and tcp dst port 443 and ip6[53] = 0x02 and ip6[7] = 64"),
    (Fingerprint(Destination(4, 1, 6, None), (Predicate(TCP_FLAGS, frozenset({0x12})),
                                              Predicate(SOURCE_PREFIXES[0], frozenset({2})))),
     "dst host 0.0.0.1 and tcp and tcp[tcpflags] = tcp-syn|tcp-ack and src host 0.0.0.2"),
])
def test_expression_rendering(fp, expected):
    assert fp.expression() == expected
    assert compile_filter(expected)


def test_excluding_only_adds_overlapping_networks_of_the_family():
    fp = Fingerprint(V4_UDP, (Predicate(SOURCE_PREFIXES[1], frozenset({0xC00002})),))
    nets = [ipaddress.ip_network(n)
            for n in ("192.0.2.128/25", "192.0.0.0/16", "203.0.113.0/24", "2001:db8::/32")]
    assert fp.excluding(nets).excluded == (nets[0], nets[1])
    assert Fingerprint(V4_UDP).excluding(nets).excluded == tuple(nets[:3])


def test_search_fields_order_and_names():
    names = [f.name for f in search_fields([0, 8], with_dst_port=False)]
    assert names == ["src/32/128", "src/24/64", "src/16/48", "src/8/32", "src port", "ttl", "ip length",
                     "tcp flags", "ip id", "frag", "fragment", "fragment offset", "ip flags", "more fragments",
                     "fragment next header", "tcp window", "tcp data offset", "udp length mismatch", "icmp type",
                     "icmp code", "payload[0:4]", "payload[8:4]"]
    assert "dst port" in [f.name for f in search_fields([], with_dst_port=True)]


# --- agreement with libpcap on random packets and fingerprints -----------------------------------

V4_ADDRS = ["198.51.100.1", "192.0.2.7", "192.0.2.200", "10.1.2.3", "203.0.113.9"]
V6_ADDRS = ["2001:db8::1", "2001:db8::7", "2001:db8:0:1::9", "2001:db9::5"]


@st.composite
def packets(draw):
    family = draw(st.sampled_from([4, 6]))
    addrs = V4_ADDRS if family == 4 else V6_ADDRS
    src, dst = draw(st.sampled_from(addrs)), draw(st.sampled_from(addrs[:2]))
    ttl = draw(st.sampled_from([47, 64, 128]))
    proto = draw(st.sampled_from(["udp", "tcp", "icmp"]))
    sport, dport = draw(st.sampled_from([53, 123, 40000])), draw(st.sampled_from([53, 443]))
    payload = draw(st.sampled_from([b"", b"\xde\xad\xbe\xef" * 4, b"GET / HTTP/1.1\r\n", b"\x00" * 6]))
    if proto == "udp":
        l4 = UDP(sport=sport, dport=dport) / Raw(payload)
    elif proto == "tcp":
        opts = draw(st.sampled_from([[], [("MSS", 1460), ("NOP", None), ("WScale", 7)]]))
        l4 = TCP(sport=sport, dport=dport, flags=draw(st.sampled_from(["S", "SA", "A", "PA", "R"])),
                 options=opts) / Raw(payload)
    else:
        l4 = ICMP() / Raw(payload)
    if family == 4:
        ip = IP(src=src, dst=dst, ttl=ttl, id=draw(st.sampled_from([1, 0x1234])),
                flags=draw(st.sampled_from(["", "DF"])), frag=draw(st.sampled_from([0, 0, 0, 64])))
    else:
        if proto == "icmp":
            l4 = UDP(sport=sport, dport=dport) / Raw(payload)
        ip = IPv6(src=src, dst=dst, hlim=ttl)
    return frame(ip / l4)


@st.composite
def fingerprints_and_packets(draw):
    """A fingerprint built from one packet's fields (some values swapped for others), and packets."""
    data = draw(st.lists(packets(), min_size=1, max_size=6))
    base = PacketFields.from_frame(data[0])
    scope = Destination.of(base, with_port=draw(st.booleans()))
    preds = []
    for f in search_fields([0, 4], with_dst_port=scope.port is None):
        value = f.value(base)
        if value is None or (f in (SRC_PORT, DST_PORT) and base.protocol not in (6, 17)):
            continue
        if f in (TCP_FLAGS, PayloadWord(0), PayloadWord(4)) and base.protocol not in (6, 17):
            continue
        if draw(st.integers(0, 3)) == 0:  # keep about a quarter of the fields
            other = PacketFields.from_frame(draw(st.sampled_from(data)))
            alternatives = {value} | ({f.value(other)} - {None} if other.family == base.family else set())
            preds.append(Predicate(f, frozenset(alternatives)))
    nets = [ipaddress.ip_network(n) for n in draw(st.lists(
        st.sampled_from(["192.0.2.0/24", "10.0.0.0/8", "2001:db8::7/128", "203.0.113.9/32"]), max_size=2))]
    return Fingerprint(scope, tuple(preds)).excluding(nets), data


@given(fingerprints_and_packets())
@settings(max_examples=250, deadline=None)
def test_python_match_agrees_with_libpcap(case):
    fp, data = case
    try:
        compiled = CompiledFilter.from_expr(fp.expression())
    except PcapError as e:  # libpcap's optimiser proved the filter empty: so must Python's
        assert "rejects all packets" in str(e)
        assert not any(fp.matches(PacketFields.from_frame(d)) for d in data)
        return
    for d in data:
        assert fp.matches(PacketFields.from_frame(d)) == compiled.matches(d), fp.expression()


def test_every_field_agrees_with_libpcap_on_its_own_value():
    """Each field, rendered with the value read from the packet, matches that packet in libpcap."""
    frames = [
        frame(IP(src="192.0.2.7", dst="198.51.100.1", ttl=47, id=7, flags="MF") / UDP(sport=123, dport=53)
              / Raw(b"\x17\x00\x03\x2a" + b"\x00" * 8)),
        frame(IP(src="192.0.2.7", dst="198.51.100.1")
              / TCP(sport=9, dport=80, flags="S", options=[("MSS", 1460)]) / Raw(b"abcdefgh")),
        frame(IPv6(src="2001:db8::7", dst="2001:db8::1", hlim=3) / UDP(sport=53, dport=5) / Raw(b"12345678")),
        frame(IPv6(src="2001:db8::7", dst="2001:db8::1")
              / TCP(sport=1, dport=443, flags="PA", options=[("NOP", None)] * 4) / Raw(b"GET /abc")),
    ]
    for d in frames:
        p = PacketFields.from_frame(d)
        scope = Destination.of(p, with_port=False)
        for f in search_fields([0, 4], with_dst_port=True):
            value = f.value(p)
            if value is None:
                continue
            fp = Fingerprint(scope, (Predicate(f, frozenset({value})),))
            assert pcap_matches(fp.expression(), d), fp.expression()
            miss = Fingerprint(scope, (Predicate(f, frozenset({(value + 1) % 256 if f in (TTL, TCP_FLAGS)
                                                                else value + 1})),))
            assert not pcap_matches(miss.expression(), d), miss.expression()
