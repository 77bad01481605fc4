"""lb.bpf.c through BPF_PROG_TEST_RUN, Katran style: input frame, expected verdict, exact output frame.

The configuration follows Katran's fixtures (reference/katran.md section 4): reals 10.0.0.1-3 and
fc00::1-3 with weight 1, the same VIP shapes, gateway MAC 00:00:de:ad:be:af. Where Katran's vectors
name the real a flow goes to, the expected frames hard-code it (bit compatibility); elsewhere the
real comes from the Python twin of the hash (bpfnet.lb.hashing / maglev).
"""

import ipaddress
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from bpfnet.ebpf import ObjectSpec
from bpfnet.lb.config import LbState
from bpfnet.lb.dataplane import Dataplane, lb_spec
from bpfnet.lb.hashing import flow_hash
from bpfnet.lb.maglev import build_ring

pytestmark = pytest.mark.root

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
VERDICTS = {XDP_DROP: "DROP", XDP_PASS: "PASS", XDP_TX: "TX"}
GATEWAY = "00:00:de:ad:be:af"
LB_MAC = "00:ff:de:ad:be:af"
CLIENT_MAC = "02:00:00:00:00:01"
V4_REALS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
V6_REALS = ["fc00::1", "fc00::2", "fc00::3"]
GUE_SRC_V4, GUE_SRC_V6, GUE_PORT = "10.0.13.37", "fc00:2307::1337", 9886


def reals(addresses):
    return [{"address": a, "weight": 1} for a in addresses]


def katran_state(**settings) -> LbState:
    v4, v6 = reals(V4_REALS), reals(V6_REALS)
    return LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": GATEWAY, "max_vips": 16, "max_reals": 64,
                     "conn_table_size": 1024, **settings},
        "vips": [
            {"address": "10.200.1.1", "port": 80, "protocol": "tcp", "reals": v4},
            {"address": "10.200.1.1", "port": 80, "protocol": "udp", "reals": v4},
            {"address": "10.200.1.2", "port": 0, "protocol": "tcp", "reals": v4},
            {"address": "10.200.1.4", "port": 0, "protocol": "tcp", "reals": v4, "flags": ["hash_dport_only"]},
            {"address": "10.200.1.3", "port": 80, "protocol": "tcp", "reals": v6},
            {"address": "fc00:1::1", "port": 80, "protocol": "tcp", "reals": v6},
            {"address": "10.200.1.5", "port": 443, "protocol": "udp", "reals": v4, "flags": ["hash_no_src_port"]},
            {"address": "10.200.1.6", "port": 80, "protocol": "tcp", "reals": v4, "flags": ["lru_bypass"]},
            {"address": "10.200.1.99", "port": 80, "protocol": "tcp"},
            {"address": "fc00:1::11", "port": 80, "protocol": "udp"},
        ]})


class LoadedLb:
    """lb.o loaded with a state; run() feeds one frame through the program."""

    def __init__(self, state: LbState):
        self.state = state
        self.obj = lb_spec(state.settings).load()
        self.program = self.obj.programs["xdp_lb"]
        self.dataplane = Dataplane(self.obj, state.settings)
        self.dataplane.apply(state)

    def reset(self):
        """Back to the initial state: config (only changed ring slots are written), no flows, zero counters."""
        self.dataplane.apply(self.state)
        self.dataplane.conn_table.map.clear()
        for name in ("lb_stats", "vip_stats", "real_stats"):
            m = self.obj.maps[name]
            zero = bytes(m.value_size)
            for key in range(m.max_entries):
                m.update(key.to_bytes(4, "little"), zero)

    def run(self, frame) -> tuple[int, bytes]:
        result = self.program.test_run(bytes(frame))
        return result.retval, result.data

    def close(self):
        self.obj.close()


@pytest.fixture(scope="module")
def lb():
    loaded = LoadedLb(katran_state())
    yield loaded
    loaded.close()


@pytest.fixture
def fresh_lb(lb):
    """The module's load balancer, reset before and after the test."""
    lb.reset()
    yield lb
    lb.reset()


# --- frame builders ------------------------------------------------------------------------------

def eth():
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def v4(dst, src="192.168.1.1", **kw):
    return eth() / IP(src=src, dst=dst, **kw)


def v6(dst, src="fc00:2::1", **kw):
    return eth() / IPv6(src=src, dst=dst, **kw)


def payload(n=10):
    return Raw(b"katran test pkt"[:n].ljust(n, b"."))


def outer_source_v4(client, sport):
    a = ipaddress.ip_address(client).packed[-4:]
    return str(ipaddress.IPv4Address(bytes([172, 16, a[2] ^ (sport & 0xFF), a[3] ^ (sport >> 8)])))


def outer_source_v6(client, sport):
    a = ipaddress.ip_address(client).packed[-4:]
    suffix = bytes([a[0] ^ (sport >> 8), a[1] ^ (sport & 0xFF), a[2], a[3]])
    return str(ipaddress.IPv6Address(b"\x01" + bytes(11) + suffix))


def ipip(inner, real, src=None):
    """The frame the LB sends: inner IP packet in IPv4 (real v4) or IPv6 (real v6) towards the gateway."""
    inner_ip = inner.payload  # everything after Ethernet
    client, sport = _client(inner)
    tos = inner_ip.tos if inner_ip.version == 4 else inner_ip.tc
    head = Ether(dst=GATEWAY, src=LB_MAC)
    if ipaddress.ip_address(real).version == 4:
        outer = IP(src=src or outer_source_v4(client, sport), dst=real, id=0, ttl=64, tos=tos, flags=0,
                   proto=4)
    else:
        outer = IPv6(src=src or outer_source_v6(client, sport), dst=real, hlim=64, tc=tos, fl=0,
                     nh=4 if inner_ip.version == 4 else 41)
    return head / outer / Raw(bytes(inner_ip))


def gue(inner, real):
    inner_ip = inner.payload
    client, sport = _client(inner)
    a = ipaddress.ip_address(client).packed[-4:]
    tos = inner_ip.tos if inner_ip.version == 4 else inner_ip.tc
    head = Ether(dst=GATEWAY, src=LB_MAC)
    if ipaddress.ip_address(real).version == 4:
        gue_sport = bytes([a[2] ^ (sport & 0xFF), a[3] ^ (sport >> 8)])
        outer = IP(src=GUE_SRC_V4, dst=real, id=0, ttl=64, tos=tos, flags=0, proto=17)
    else:
        gue_sport = bytes([a[0] ^ (sport >> 8), a[1] ^ (sport & 0xFF)]) if inner_ip.version == 6 \
            else bytes([a[2] ^ (sport >> 8), a[3] ^ (sport & 0xFF)])
        outer = IPv6(src=GUE_SRC_V6, dst=real, hlim=64, tc=tos, fl=0, nh=17)
    # over IPv6 the UDP checksum is computed (scapy: None), over IPv4 it is 0 (docs/lb.md)
    udp = UDP(sport=int.from_bytes(gue_sport, "big"), dport=GUE_PORT, chksum=None if outer.version == 6 else 0)
    return head / outer / udp / Raw(bytes(inner_ip))


def _client(frame):
    """(client address, client port) of a frame, or of the flow an ICMP error quotes."""
    ip_layer = frame.payload
    l4 = ip_layer.payload
    if isinstance(l4, (ICMP, ICMPv6PacketTooBig, ICMPv6DestUnreach)):
        quoted = l4.payload
        return quoted.dst, quoted.payload.dport
    return ip_layer.src, l4.sport


def ring_real(addresses, client, sport, dport):
    ring = build_ring([(a, 1) for a in addresses])
    return addresses[ring[flow_hash(client, sport, dport) % 65537]]


# --- the fixture table ---------------------------------------------------------------------------

TCP_V4 = v4("10.200.1.1") / TCP(sport=31337, dport=80, flags="A") / payload()
UDP_V4 = v4("10.200.1.1") / UDP(sport=31337, dport=80) / payload()
TOS_V4 = v4("10.200.1.1", tos=0x8C) / TCP(sport=31337, dport=80, flags="A") / payload()
PORTLESS = v4("10.200.1.2") / TCP(sport=31337, dport=42, flags="A") / payload()
FOUR_IN_SIX = v4("10.200.1.3") / TCP(sport=31337, dport=80, flags="A") / payload()
TCP_V6 = v6("fc00:1::1") / TCP(sport=31337, dport=80, flags="A") / payload()
TC_V6 = v6("fc00:1::1", tc=0x8C) / TCP(sport=31337, dport=80, flags="A") / payload()
DPORT_ONLY = v4("10.200.1.4") / TCP(sport=31337, dport=42, flags="A") / payload()
DPORT_ONLY_OTHER = v4("10.200.1.4", src="10.11.12.13") / TCP(sport=1234, dport=42, flags="A") / payload()
NO_SRC_PORT = v4("10.200.1.5") / UDP(sport=31337, dport=443) / payload()
NO_SRC_PORT_OTHER = v4("10.200.1.5") / UDP(sport=1111, dport=443) / payload()
SYN_V4 = v4("10.200.1.1", src="192.168.1.2") / TCP(sport=5000, dport=80, flags="S")
BIGGEST = v4("10.200.1.1") / TCP(sport=31337, dport=80, flags="A") / payload(1514 - 54)
TOO_BIG = v4("10.200.1.1") / TCP(sport=31337, dport=80, flags="A") / payload(1515 - 54)
ICMP_FRAG_NEEDED = (v4("10.200.1.1", src="10.99.0.1") / ICMP(type=3, code=4, nexthopmtu=1400)
                    / IP(src="10.200.1.1", dst="192.168.1.1") / TCP(sport=80, dport=31337, flags="A"))
ICMP6_TOO_BIG = (v6("fc00:1::1", src="fc00:99::1") / ICMPv6PacketTooBig(mtu=1280)
                 / IPv6(src="fc00:1::1", dst="fc00:2::1") / TCP(sport=80, dport=31337, flags="A"))
ECHO_V4 = v4("10.200.1.1") / ICMP(type=8, id=0x1234, seq=7) / payload(32)
ECHO_V6 = v6("fc00:1::1") / ICMPv6EchoRequest(id=0x1234, seq=7) / payload(32)

EXPECTED_ECHO_V4 = (Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src="10.200.1.1", dst="192.168.1.1", ttl=64)
                    / ICMP(type=0, id=0x1234, seq=7) / payload(32))
EXPECTED_ECHO_V6 = (Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src="fc00:1::1", dst="fc00:2::1", hlim=64)
                    / ICMPv6EchoReply(id=0x1234, seq=7) / payload(32))

# id 0, seq 0, no data: the reply sums to +0, so its only valid checksum is 0xffff (issue 17 item 7)
ZERO_ECHO_V4 = v4("10.200.1.1") / ICMP(type=8, id=0, seq=0)
ZERO_ECHO_V6 = v6("fc00:1::1") / ICMPv6EchoRequest(id=0, seq=0)
EXPECTED_ZERO_ECHO_V4 = (Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src="10.200.1.1", dst="192.168.1.1", ttl=64)
                         / ICMP(type=0, id=0, seq=0))
EXPECTED_ZERO_ECHO_V6 = (Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src="fc00:1::1", dst="fc00:2::1", hlim=64)
                         / ICMPv6EchoReply(id=0, seq=0))

OPTIONS = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]

CASES = [
    # (description, input, verdict, expected output; None = the input unchanged)
    ("v4 TCP to VIP -> IPIP to 10.0.0.3 (Katran #1)", TCP_V4, XDP_TX, ipip(TCP_V4, "10.0.0.3", "172.16.104.123")),
    ("v4 UDP to VIP -> same real (ports, not protocol, are hashed)", UDP_V4, XDP_TX,
     ipip(UDP_V4, "10.0.0.3", "172.16.104.123")),
    ("ToS copied to the outer header", TOS_V4, XDP_TX, ipip(TOS_V4, "10.0.0.3")),
    ("port-less VIP hashes dport 0 -> 10.0.0.2 (Katran #4)", PORTLESS, XDP_TX, ipip(PORTLESS, "10.0.0.2")),
    ("v4 VIP, v6 reals -> 4in6 to fc00::1 (Katran #5)", FOUR_IN_SIX, XDP_TX,
     ipip(FOUR_IN_SIX, "fc00::1", "100::bac1:101")),
    ("v6 TCP -> IP6IP6 to fc00::3 (Katran #6)", TCP_V6, XDP_TX, ipip(TCP_V6, "fc00::3", "100::7a69:1")),
    ("v6 traffic class copied", TC_V6, XDP_TX, ipip(TC_V6, "fc00::3")),
    ("hash dport only -> 10.0.0.2 (Katran #19)", DPORT_ONLY, XDP_TX, ipip(DPORT_ONLY, "10.0.0.2")),
    ("hash dport only: any client, same real", DPORT_ONLY_OTHER, XDP_TX, ipip(DPORT_ONLY_OTHER, "10.0.0.2")),
    ("hash without source port, outer source from port 0", NO_SRC_PORT, XDP_TX,
     ipip(NO_SRC_PORT, ring_real(V4_REALS, "192.168.1.1", 0, 443), "172.16.1.1")),
    ("hash without source port: other port, same real", NO_SRC_PORT_OTHER, XDP_TX,
     ipip(NO_SRC_PORT_OTHER, ring_real(V4_REALS, "192.168.1.1", 0, 443), "172.16.1.1")),
    ("SYN takes the ring", SYN_V4, XDP_TX, ipip(SYN_V4, ring_real(V4_REALS, "192.168.1.2", 5000, 80))),
    ("frame of 1514 bytes is forwarded", BIGGEST, XDP_TX, ipip(BIGGEST, "10.0.0.3")),
    ("frame of 1515 bytes to a VIP: drop too_big", TOO_BIG, XDP_DROP, None),
    ("ICMP frag-needed about a VIP flow -> that flow's real", ICMP_FRAG_NEEDED, XDP_TX,
     ipip(ICMP_FRAG_NEEDED, "10.0.0.3", "172.16.104.123")),
    ("ICMPv6 packet-too-big about a VIP flow -> that flow's real", ICMP6_TOO_BIG, XDP_TX,
     ipip(ICMP6_TOO_BIG, "fc00::3", "100::7a69:1")),
    ("ICMP echo to a VIP answered", ECHO_V4, XDP_TX, EXPECTED_ECHO_V4),
    ("ICMPv6 echo to a VIP answered", ECHO_V6, XDP_TX, EXPECTED_ECHO_V6),
    ("ICMP echo id 0 seq 0 no data: reply checksum 0xffff, never 0", ZERO_ECHO_V4, XDP_TX, EXPECTED_ZERO_ECHO_V4),
    ("ICMPv6 echo id 0 seq 0 no data answered", ZERO_ECHO_V6, XDP_TX, EXPECTED_ZERO_ECHO_V6),
    ("ICMP echo to another address passes", v4("10.1.1.1") / ICMP(type=8) / payload(), XDP_PASS, None),
    ("ICMP timestamp to a VIP passes", v4("10.200.1.1") / ICMP(type=13), XDP_PASS, None),
    ("ICMPv6 neighbor solicitation passes", v6("fc00:1::1") / Raw(bytes([135, 0, 0, 0]) + bytes(20)),
     XDP_PASS, None),
    ("ICMP error about a non-VIP flow passes", v4("10.200.1.1", src="10.99.0.1") / ICMP(type=3, code=4)
     / IP(src="10.200.1.1", dst="192.168.1.1") / TCP(sport=8080, dport=31337), XDP_PASS, None),
    ("ICMP error quoting a VIP flow, sent elsewhere, passes", v4("10.1.1.1", src="10.99.0.1")
     / ICMP(type=3, code=4) / IP(src="10.200.1.1", dst="192.168.1.1") / TCP(sport=80, dport=31337),
     XDP_PASS, None),
    ("VIP address, other port -> pass", v4("10.200.1.1") / TCP(sport=31337, dport=8080), XDP_PASS, None),
    ("not a VIP address -> pass", v4("10.1.1.1") / TCP(sport=31337, dport=80), XDP_PASS, None),
    ("v6 not a VIP -> pass", v6("fc00:9::1") / UDP(sport=1, dport=80), XDP_PASS, None),
    ("ARP passes", Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.200.1.1"), XDP_PASS, None),
    ("GRE to a VIP address passes", v4("10.200.1.1", proto=47) / payload(), XDP_PASS, None),
    ("IPIP (already encapsulated) to a VIP address passes", v4("10.200.1.1") / IP(dst="10.0.0.1") / UDP(),
     XDP_PASS, None),
    ("IPv4 options to a VIP: drop ip_options", v4("10.200.1.1", options=OPTIONS) / TCP(dport=80), XDP_DROP, None),
    ("IPv4 options to another address pass", v4("10.1.1.1", options=OPTIONS) / TCP(dport=80), XDP_PASS, None),
    ("first fragment to a VIP: drop fragment", v4("10.200.1.1", flags="MF") / TCP(dport=80) / payload(),
     XDP_DROP, None),
    ("later fragment to a VIP: drop fragment", v4("10.200.1.1", frag=100) / payload(), XDP_DROP, None),
    ("fragment to another address passes", v4("10.1.1.1", flags="MF") / TCP(dport=80), XDP_PASS, None),
    ("IPv6 fragment to a VIP: drop fragment", v6("fc00:1::1") / IPv6ExtHdrFragment(m=1) / TCP(dport=80),
     XDP_DROP, None),
    ("VIP without reals: drop no_real", v4("10.200.1.99") / TCP(sport=1, dport=80, flags="A"), XDP_DROP, None),
    ("v6 VIP without reals: drop no_real", v6("fc00:1::11") / UDP(sport=1, dport=80), XDP_DROP, None),
    ("truncated TCP header to a VIP: drop malformed", v4("10.200.1.1", proto=6) / Raw(b"\x7a\x69\x00\x50"),
     XDP_DROP, None),
    ("truncated TCP header elsewhere passes", v4("10.1.1.1", proto=6) / Raw(b"\x7a\x69"), XDP_PASS, None),
    ("IPv4 total length beyond the frame to a VIP: drop malformed",
     v4("10.200.1.1", len=400) / TCP(dport=80), XDP_DROP, None),
    ("truncated IPv4 header passes", Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x0800) / Raw(bytes(10)),
     XDP_PASS, None),
]


@pytest.mark.parametrize("description, frame, verdict, expected", CASES, ids=[c[0] for c in CASES])
def test_fixture(lb, description, frame, verdict, expected):
    got_verdict, out = lb.run(frame)
    assert VERDICTS.get(got_verdict, got_verdict) == VERDICTS[verdict]
    want = bytes(frame) if expected is None else bytes(expected)
    assert out.hex() == want.hex()


def test_at_least_30_fixtures():
    assert len(CASES) >= 30


# --- state: connection table, ring changes ------------------------------------------------------

def weights(state: LbState, vip_name: str, **by_address) -> LbState:
    """A copy of state with some reals of one VIP re-weighted (keys: '10_0_0_3' style)."""
    data = state.model_dump(mode="json")
    for vip in data["vips"]:
        if state.vip(vip_name).name == LbState.model_validate({"vips": [vip]}).vips[0].name:
            for real in vip["reals"]:
                key = real["address"].replace(".", "_").replace(":", "_")
                if key in by_address:
                    real["weight"] = by_address[key]
    return LbState.model_validate(data)


def flow(src, sport, flags="A", dst="10.200.1.1", dport=80):
    return v4(dst, src=src) / TCP(sport=sport, dport=dport, flags=flags) / payload()


def real_of(out: bytes) -> str:
    return Ether(out)[IP].dst


def test_connection_table_keeps_flow_after_ring_change(fresh_lb):
    first = flow("192.168.1.1", 31337)
    verdict, out = fresh_lb.run(first)
    assert verdict == XDP_TX and real_of(out) == "10.0.0.3"
    # Drain 10.0.0.3: the ring no longer has it.
    fresh_lb.dataplane.apply(weights(fresh_lb.state, "10.200.1.1:80/tcp", **{"10_0_0_3": 0}))
    verdict, out = fresh_lb.run(first)
    assert verdict == XDP_TX and out == bytes(ipip(first, "10.0.0.3"))  # established flow stays
    # A SYN of the same 5-tuple ignores the table and takes the new ring...
    syn = flow("192.168.1.1", 31337, flags="S")
    verdict, out = fresh_lb.run(syn)
    new_real = ring_real(["10.0.0.1", "10.0.0.2"], "192.168.1.1", 31337, 80)
    assert verdict == XDP_TX and out == bytes(ipip(syn, new_real))
    # ...and rewrites the entry: the flow now follows its new real.
    verdict, out = fresh_lb.run(first)
    assert real_of(out) == new_real
    counters = fresh_lb.dataplane.counters()
    assert counters["conn_hit"]["packets"] == 2
    assert counters["conn_miss"]["packets"] == 1


def test_new_flow_after_drain_never_reaches_drained_real(fresh_lb):
    fresh_lb.dataplane.apply(weights(fresh_lb.state, "10.200.1.1:80/tcp", **{"10_0_0_3": 0}))
    seen = {real_of(fresh_lb.run(flow("192.168.7.7", port))[1]) for port in range(2000, 2200)}
    assert seen == {"10.0.0.1", "10.0.0.2"}


def test_portless_vips_are_looked_for_only_while_one_exists():
    """portless_vips[0] follows the state: with it set, a packet to another port of the address finds
    the port-less VIP; without port-less VIPs it is 0 and the same packet passes."""
    loaded = LoadedLb(katran_state())
    try:
        assert loaded.dataplane.portless_vips.lookup(b"\0\0\0\0").value == 1
        assert loaded.run(PORTLESS) == (XDP_TX, bytes(ipip(PORTLESS, "10.0.0.2")))
        data = loaded.state.model_dump(mode="json")
        data["vips"] = [v for v in data["vips"] if v["port"] != 0]
        loaded.dataplane.apply(LbState.model_validate(data))
        assert loaded.dataplane.portless_vips.lookup(b"\0\0\0\0").value == 0
        assert loaded.run(PORTLESS) == (2, bytes(PORTLESS))
        loaded.dataplane.apply(loaded.state)
        assert loaded.run(PORTLESS) == (XDP_TX, bytes(ipip(PORTLESS, "10.0.0.2")))
    finally:
        loaded.close()


def test_rst_creates_no_entry(fresh_lb):
    fresh_lb.run(flow("192.168.1.1", 31337, flags="R"))
    assert len(list(fresh_lb.dataplane.conn_table.keys())) == 0
    fresh_lb.run(flow("192.168.1.1", 31337, flags="A"))
    assert len(list(fresh_lb.dataplane.conn_table.keys())) == 1


def test_lru_bypass_follows_the_ring(fresh_lb):
    packet = flow("192.168.1.1", 31337, dst="10.200.1.6")
    assert real_of(fresh_lb.run(packet)[1]) == "10.0.0.3"
    assert len(list(fresh_lb.dataplane.conn_table.keys())) == 0
    fresh_lb.dataplane.apply(weights(fresh_lb.state, "10.200.1.6:80/tcp", **{"10_0_0_3": 0}))
    assert real_of(fresh_lb.run(packet)[1]) != "10.0.0.3"


def test_removed_real_entry_falls_back_to_ring(fresh_lb):
    packet = flow("192.168.1.1", 31337)
    assert real_of(fresh_lb.run(packet)[1]) == "10.0.0.3"
    data = fresh_lb.state.model_dump(mode="json")
    for vip in data["vips"]:
        vip["reals"] = [r for r in vip["reals"] if r["address"] != "10.0.0.3"]
    fresh_lb.dataplane.apply(LbState.model_validate(data))
    assert real_of(fresh_lb.run(packet)[1]) == ring_real(["10.0.0.1", "10.0.0.2"], "192.168.1.1", 31337, 80)


def test_real_taken_off_one_vip_loses_that_vips_flows_only(fresh_lb):
    tcp, udp = flow("192.168.1.1", 31337), v4("10.200.1.1") / UDP(sport=31337, dport=80) / payload()
    assert real_of(fresh_lb.run(tcp)[1]) == "10.0.0.3" and real_of(fresh_lb.run(udp)[1]) == "10.0.0.3"
    data = fresh_lb.state.model_dump(mode="json")
    tcp_vip = next(v for v in data["vips"] if v["address"] == "10.200.1.1" and v["protocol"] == "tcp")
    tcp_vip["reals"] = [r for r in tcp_vip["reals"] if r["address"] != "10.0.0.3"]
    fresh_lb.dataplane.apply(LbState.model_validate(data))
    assert real_of(fresh_lb.run(tcp)[1]) == ring_real(["10.0.0.1", "10.0.0.2"], "192.168.1.1", 31337, 80)
    assert real_of(fresh_lb.run(udp)[1]) == "10.0.0.3"  # still listed on the UDP VIP
    assert fresh_lb.dataplane.counters()["conn_hit"]["packets"] == 1


def test_udp_entries_expire():
    state = katran_state(udp_timeout=1e-9)  # every UDP entry is stale by the next packet
    loaded = LoadedLb(state)
    try:
        packet = v4("10.200.1.1") / UDP(sport=31337, dport=80) / payload()
        assert real_of(loaded.run(packet)[1]) == "10.0.0.3"
        loaded.dataplane.apply(weights(state, "10.200.1.1:80/udp", **{"10_0_0_3": 0}))
        assert real_of(loaded.run(packet)[1]) != "10.0.0.3"
    finally:
        loaded.close()


def test_counters_are_exact(fresh_lb):
    frames = [TCP_V4, TCP_V4, UDP_V4, TOO_BIG, ECHO_V4,
              v4("10.200.1.99") / TCP(sport=1, dport=80, flags="A"),
              v4("10.200.1.1", flags="MF") / TCP(dport=80),
              v4("10.200.1.1", options=OPTIONS) / TCP(dport=80),
              v4("10.200.1.1", proto=6) / Raw(b"\x7a\x69"),
              v4("10.1.1.1") / TCP(dport=80)]
    for frame in frames:
        fresh_lb.run(frame)
    c = {name: v["packets"] for name, v in fresh_lb.dataplane.counters().items()}
    assert c["rx"] == 10
    assert (c["tx"], c["drop"], c["pass"]) == (4, 5, 1)
    assert (c["drop_too_big"], c["drop_no_real"], c["drop_fragment"], c["drop_ip_options"],
            c["drop_malformed"]) == (1, 1, 1, 1, 1)
    assert c["icmp_echo"] == 1
    assert c["conn_miss"] == 3 and c["conn_hit"] == 1  # TCP miss, TCP hit, UDP miss, no-real VIP miss
    tables = fresh_lb.dataplane.tables
    vip_num = tables.vips[(ipaddress.ip_address("10.200.1.1"), 80, 6)].vip_num
    assert fresh_lb.dataplane.vip_counters(vip_num) == (3, 2 * len(TCP_V4) + len(TOO_BIG))
    real_id = next(i for i, a in tables.reals.items() if str(a) == "10.0.0.3")
    assert fresh_lb.dataplane.real_counters(real_id) == (3, 2 * len(TCP_V4) + len(UDP_V4))


# --- GUE -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gue_lb():
    loaded = LoadedLb(katran_state(encap="gue", gue_port=GUE_PORT, gue_source_v4=GUE_SRC_V4,
                                   gue_source_v6=GUE_SRC_V6))
    yield loaded
    loaded.close()


GUE_CASES = [
    ("GUE v4 -> 10.0.0.3, sport 26747", TCP_V4, "10.0.0.3"),
    ("GUE v4 VIP, v6 real -> fc00::1", FOUR_IN_SIX, "fc00::1"),
    ("GUE v6 -> fc00::3", TCP_V6, "fc00::3"),
    ("GUE ICMP frag-needed steered", ICMP_FRAG_NEEDED, "10.0.0.3"),
]


@pytest.mark.parametrize("description, frame, real", GUE_CASES, ids=[c[0] for c in GUE_CASES])
def test_gue(gue_lb, description, frame, real):
    verdict, out = gue_lb.run(frame)
    assert verdict == XDP_TX
    assert out.hex() == bytes(gue(frame, real)).hex()


def test_gue_source_port_matches_katran(gue_lb):
    assert Ether(gue_lb.run(TCP_V4)[1])[UDP].sport == 26747


# --- GUE outer UDP checksum (issue 17 item 6): computed over IPv6, 0 over IPv4 -----------------------

def gue_checksum_state() -> LbState:
    v4, v6 = reals(V4_REALS), reals(V6_REALS)
    return LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": GATEWAY, "max_vips": 16, "max_reals": 64,
                     "conn_table_size": 1024, "encap": "gue", "gue_port": GUE_PORT, "gue_source_v4": GUE_SRC_V4,
                     "gue_source_v6": GUE_SRC_V6},
        "vips": [
            {"address": "10.200.2.1", "port": 53, "protocol": "udp", "reals": v6},
            {"address": "10.200.2.1", "port": 80, "protocol": "tcp", "reals": v6},
            {"address": "fc00:3::1", "port": 53, "protocol": "udp", "reals": v6},
            {"address": "fc00:3::1", "port": 80, "protocol": "tcp", "reals": v6},
            {"address": "10.200.2.2", "port": 53, "protocol": "udp", "reals": v4},
        ]})


@pytest.fixture(scope="module")
def gue_checksum_lb():
    loaded = LoadedLb(gue_checksum_state())
    yield loaded
    loaded.close()


# inner UDP payload lengths that take every path of the whole-packet sum (bits 1024 .. 1, 1472 the largest)
SIZES = [0, 1, 2, 3, 4, 5, 7, 13, 100, 255, 511, 512, 513, 1023, 1024, 1025, 1400, 1472]
GUE_CHECKSUM_CASES = [
    *[(f"inner IPv4 UDP without checksum, {n} bytes: summed whole",
       v4("10.200.2.1") / UDP(sport=31337, dport=53, chksum=0) / payload(n)) for n in SIZES],
    *[(f"inner IPv4 UDP, {n} bytes", v4("10.200.2.1") / UDP(sport=31337, dport=53) / payload(n))
      for n in (0, 1, 1472)],
    *[(f"inner IPv6 UDP, {n} bytes", v6("fc00:3::1") / UDP(sport=31337, dport=53) / payload(n))
      for n in (0, 3, 1452)],
    ("inner IPv4 TCP", v4("10.200.2.1", tos=0x8C) / TCP(sport=31337, dport=80, flags="PA") / payload(333)),
    ("inner IPv6 TCP", v6("fc00:3::1") / TCP(sport=31337, dport=80, flags="S")),
    ("inner ICMP frag-needed", v4("10.200.2.1", src="10.99.0.1") / ICMP(type=3, code=4, nexthopmtu=1400)
     / IP(src="10.200.2.1", dst="192.168.1.1") / TCP(sport=80, dport=31337, flags="A")),
    ("inner ICMPv6 packet-too-big", v6("fc00:3::1", src="fc00:99::1") / ICMPv6PacketTooBig(mtu=1280)
     / IPv6(src="fc00:3::1", dst="fc00:2::1") / TCP(sport=80, dport=31337, flags="A")),
]


@pytest.mark.parametrize("description, frame", GUE_CHECKSUM_CASES, ids=[c[0] for c in GUE_CHECKSUM_CASES])
def test_gue_over_ipv6_carries_the_udp_checksum_and_the_reals_decap_accepts_it(gue_checksum_lb, decap,
                                                                                description, frame):
    """The outer UDP checksum over IPv6 is the one scapy computes over the whole packet, whichever
    way the program sums the inner packet; the reals' decap strips it back to the client's frame."""
    client, sport = _client(frame)
    dport = 80 if frame.haslayer(ICMP) or frame.haslayer(ICMPv6PacketTooBig) else frame.payload.payload.dport
    real = ring_real(V6_REALS, client, sport, dport)
    verdict, out = gue_checksum_lb.run(frame)
    assert verdict == XDP_TX
    assert out.hex() == bytes(gue(frame, real)).hex()
    assert Ether(out)[UDP].chksum != 0
    result = decap.test_run(out)
    assert result.retval == XDP_PASS
    expected = Ether(dst=GATEWAY, src=LB_MAC, type=Ether(bytes(frame)).type) / Raw(bytes(frame.payload))
    assert result.data.hex() == bytes(expected).hex()


def test_gue_over_ipv4_keeps_a_zero_udp_checksum(gue_checksum_lb):
    frame = v4("10.200.2.2") / UDP(sport=31337, dport=53) / payload(100)
    verdict, out = gue_checksum_lb.run(frame)
    assert verdict == XDP_TX
    assert out.hex() == bytes(gue(frame, ring_real(V4_REALS, "192.168.1.1", 31337, 53))).hex()
    assert Ether(out)[UDP].chksum == 0


def test_gue_checksum_counts_the_inner_packet_not_the_frame_padding(gue_checksum_lb):
    """A short frame padded to 60 bytes: the checksum covers the IP packet only (as scapy's)."""
    frame = v4("10.200.2.1") / UDP(sport=31337, dport=53, chksum=0)
    padded = bytes(frame) + b"\xff" * (60 - len(frame))
    verdict, out = gue_checksum_lb.run(padded)
    assert verdict == XDP_TX
    real = ring_real(V6_REALS, "192.168.1.1", 31337, 53)
    assert out.hex() == (bytes(gue(frame, real)) + b"\xff" * (60 - len(frame))).hex()


# --- decap ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decap():
    spec = ObjectSpec.builtin("decap")
    spec.constants["gue_port"] = GUE_PORT
    with spec.load() as obj:
        yield obj.programs["xdp_decap"]


DECAP_CASES = [
    ("IPIP", ipip(TCP_V4, "10.0.0.3"), TCP_V4),
    ("IP6IP6", ipip(TCP_V6, "fc00::3"), TCP_V6),
    ("4in6", ipip(FOUR_IN_SIX, "fc00::1"), FOUR_IN_SIX),
    ("GUE v4", gue(TCP_V4, "10.0.0.3"), TCP_V4),
    ("GUE 4in6", gue(FOUR_IN_SIX, "fc00::1"), FOUR_IN_SIX),
    ("GUE v6", gue(TCP_V6, "fc00::3"), TCP_V6),
    ("ICMP in IPIP", ipip(ICMP_FRAG_NEEDED, "10.0.0.3"), ICMP_FRAG_NEEDED),
]


@pytest.mark.parametrize("description, encapsulated, inner", DECAP_CASES, ids=[c[0] for c in DECAP_CASES])
def test_decap_restores_the_client_frame(decap, description, encapsulated, inner):
    result = decap.test_run(bytes(encapsulated))
    assert result.retval == XDP_PASS
    # MACs are those of the encapsulated frame (gateway hop); the rest is the client's packet.
    expected = Ether(dst=GATEWAY, src=LB_MAC, type=Ether(bytes(inner)).type) / Raw(bytes(inner.payload))
    assert result.data.hex() == bytes(expected).hex()


@pytest.mark.parametrize("frame", [TCP_V4, TCP_V6, v4("10.0.0.3") / UDP(dport=53) / payload(),
                                   Ether() / ARP(), v4("10.0.0.3", flags="MF", proto=4) / payload()],
                         ids=["tcp", "tcp6", "udp-other-port", "arp", "ipip-fragment"])
def test_decap_passes_everything_else_untouched(decap, frame):
    result = decap.test_run(bytes(frame))
    assert result.retval == XDP_PASS and result.data == bytes(frame)


# --- fuzz: random and malformed frames; no crash, and the design's invariants on every frame --------

FRAMES = 100_000
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD


def vip_addresses(state: LbState) -> set[bytes]:
    return {vip.address.packed for vip in state.vips}


REAL_ADDRESSES = {ipaddress.ip_address(a).packed for a in V4_REALS + V6_REALS}


def destination(frame: bytes) -> bytes | None:
    """The IP destination of an untagged frame, if its header is long enough to hold one."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_IPV4 and len(frame) >= 34:
        return frame[30:34]
    if ethertype == ETH_IPV6 and len(frame) >= 54:
        return frame[38:54]
    return None


def ipv4_checksum_ok(header: bytes) -> bool:
    total = sum(struct.unpack("!10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def check_encapsulation(frame: bytes, out: bytes) -> None:
    assert out[:6] == bytes.fromhex(GATEWAY.replace(":", "")) and out[6:12] == frame[0:6]
    ethertype = struct.unpack_from("!H", out, 12)[0]
    if ethertype == ETH_IPV4:
        header, real = out[14:34], out[30:34]
        assert ipv4_checksum_ok(header) and header[9] == 4  # IPIP
        assert struct.unpack_from("!H", header, 2)[0] == len(out) - 14 - (len(frame) - 14 - _ip_len(frame))
        inner = out[34:]
    else:
        assert ethertype == ETH_IPV6
        real = out[38:54]
        assert out[20] in (4, 41)
        inner = out[54:]
    assert real in REAL_ADDRESSES
    assert inner == frame[14:]  # the client's packet travels untouched


def _ip_len(frame: bytes) -> int:
    if struct.unpack_from("!H", frame, 12)[0] == ETH_IPV4:
        return struct.unpack_from("!H", frame, 16)[0]
    return struct.unpack_from("!H", frame, 18)[0] + 40


def ones_sum(data: bytes) -> int:
    padded = data + b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def check_echo_reply(frame: bytes, out: bytes) -> None:
    """Addresses and MACs swapped, the reply type; and, where the request's checksum was valid, a
    valid reply checksum that is never 0x0000."""
    assert len(out) == len(frame)
    assert out[0:6] == frame[6:12] and out[6:12] == frame[0:6]
    if struct.unpack_from("!H", frame, 12)[0] == ETH_IPV4:
        assert out[26:30] == frame[30:34] and out[30:34] == frame[26:30]
        assert frame[34] == 8 and out[34] == 0 and ipv4_checksum_ok(out[14:34])
        end = 14 + struct.unpack_from("!H", frame, 16)[0]
        message, request = out[34:end], frame[34:end]
        pseudo = b""
    else:
        assert out[22:38] == frame[38:54] and out[38:54] == frame[22:38]
        assert frame[54] == 128 and out[54] == 129
        end = 54 + struct.unpack_from("!H", frame, 18)[0]
        message, request = out[54:end], frame[54:end]
        pseudo = out[22:54] + struct.pack("!IxxxB", len(message), 58)
    assert out[end:] == frame[end:]
    if ones_sum(pseudo + request) == 0xFFFF:
        assert ones_sum(pseudo + message) == 0xFFFF and message[2:4] != b"\0\0", (frame.hex(), out.hex())


def templates() -> list[bytes]:
    return [bytes(case[1]) for case in CASES]


def mutate(rng: random.Random, base: bytes) -> bytes:
    frame = bytearray(base)
    choice = rng.random()
    if choice < 0.4:  # flip a few bytes in the headers
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(min(len(frame), 80))] = rng.randrange(256)
    elif choice < 0.6:  # truncate
        frame = frame[:rng.randint(14, len(frame))]
    elif choice < 0.75:  # grow (junk after the IP packet, or over the size limit)
        frame += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100, 1500])))
    elif choice < 0.9:  # set a header field to an edge value
        offset = rng.choice([14, 16, 20, 23, 34, 36, 46, 47, 54])  # ihl, len, frag, proto, ports, flags
        if offset < len(frame):
            frame[offset] = rng.choice([0, 1, 0x45, 0x46, 0x4F, 0x60, 0xFF, 6, 17, 1, 58, 44])
    else:  # random payload behind a real Ethernet/IP header
        frame = frame[:34] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 60)))
    return bytes(frame)


def random_frame(rng: random.Random) -> bytes:
    length = rng.randint(14, 200)
    frame = bytearray(rng.randbytes(length))
    if rng.random() < 0.7:
        frame[12:14] = struct.pack("!H", rng.choice([ETH_IPV4, ETH_IPV6]))
    return bytes(frame)


def test_fuzz_lb(fresh_lb):
    lb = fresh_lb
    rng = random.Random(20261127)
    bases = templates()
    vip_addrs = vip_addresses(lb.state)
    verdicts = {XDP_DROP: 0, XDP_PASS: 0, XDP_TX: 0}
    for i in range(FRAMES):
        frame = random_frame(rng) if i % 4 == 0 else mutate(rng, rng.choice(bases))
        verdict, out = lb.run(frame)
        assert verdict in verdicts, f"frame {frame.hex()}: verdict {verdict}"
        verdicts[verdict] += 1
        dst = destination(frame)
        if verdict in (XDP_PASS, XDP_DROP):
            assert out == frame, f"frame {frame.hex()} changed on {verdict}"
        if verdict != XDP_PASS:
            # Only traffic addressed to a VIP address is ever dropped or sent.
            assert dst in vip_addrs, f"frame {frame.hex()}: verdict {verdict} for a non-VIP address"
        if verdict == XDP_TX:
            if out[6:12] == frame[0:6] and out[0:6] == frame[6:12] and len(out) == len(frame):
                check_echo_reply(frame, out)
            else:
                check_encapsulation(frame, out)
    # The mix reached every verdict (the generator is not degenerate).
    assert all(count > 100 for count in verdicts.values()), verdicts
    # Counters agree with what we saw.
    counters = lb.dataplane.counters()
    assert counters["rx"]["packets"] == FRAMES
    assert counters["tx"]["packets"] == verdicts[XDP_TX]
    assert counters["drop"]["packets"] == verdicts[XDP_DROP]
    assert counters["pass"]["packets"] == verdicts[XDP_PASS]
    reasons = sum(counters[f"drop_{r}"]["packets"] for r in
                  ("malformed", "ip_options", "fragment", "too_big", "no_real", "no_route", "encap"))
    assert reasons == verdicts[XDP_DROP]


def test_fuzz_decap():
    spec = ObjectSpec.builtin("decap")
    rng = random.Random(7)
    bases = templates()
    with spec.load() as obj:
        program = obj.programs["xdp_decap"]
        for i in range(FRAMES // 5):
            frame = random_frame(rng) if i % 4 == 0 else mutate(rng, rng.choice(bases))
            result = program.test_run(frame)
            assert result.retval == XDP_PASS
            out = result.data
            if out != frame:
                # Decapsulated: MACs kept, one outer header removed, the rest untouched.
                assert out[:12] == frame[:12]
                stripped = len(frame) - len(out)
                assert stripped in (20, 40, 28, 48) and out[14:] == frame[14 + stripped:]
