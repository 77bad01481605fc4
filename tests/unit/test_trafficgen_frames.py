"""The generator's frames in Python (numpy) against scapy, for any flows; bad flows are refused."""

import ipaddress
import socket

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether

from bpfnet.bench.trafficgen import FlowFrames, Flows, PacketBatches, udp_frame


def build(l4, src):
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst="192.0.2.10", id=3)
                 / l4 / (b"y" * 11))


@given(first=st.integers(0x0A000000, 0x0AFFFF00), addresses=st.integers(1, 200),
       first_port=st.integers(1, 60000), ports=st.integers(1, 300), start=st.integers(0, 10**6),
       tcp=st.booleans(), udp_checksum=st.booleans())
def test_every_frame_is_what_scapy_builds_for_its_flow(first, addresses, first_port, ports, start, tcp,
                                                        udp_checksum):
    flows = Flows(socket.inet_ntoa(first.to_bytes(4, "big")), addresses, first_port, ports)
    l4 = TCP(sport=7, dport=80, flags="S") if tcp else UDP(sport=7, dport=53, chksum=None if udp_checksum else 0)
    frames = FlowFrames(build(l4.copy(), "10.0.0.1"), flows)
    rows = frames.rows(start, 5)
    for offset, row in enumerate(rows):
        flow = (start + offset) % flows.count
        want = l4.copy()
        want.sport = first_port + (flow // addresses) % ports
        assert row.tobytes() == build(want, socket.inet_ntoa((first + flow % addresses).to_bytes(4, "big")))


def test_udp_frame_matches_scapy():
    built = udp_frame(b"\x02" * 6, b"\x04" * 6, "192.0.2.1", "192.0.2.2", 1024, 9, b"abc")
    assert built == bytes(Ether(src="02:02:02:02:02:02", dst="04:04:04:04:04:04")
                          / IP(src="192.0.2.1", dst="192.0.2.2", ttl=64, id=0, flags=0) / UDP(sport=1024, dport=9)
                          / b"abc")


@pytest.mark.parametrize("flows, problem", [
    (dict(addresses=0), "at least 1"),
    (dict(first_port=65000, ports=600), "leave 1..65535"),
    (dict(first_port=0), "leave 1..65535"),
    (dict(first_address="255.255.255.250", addresses=10), "leave IPv4"),
])
def test_flows_outside_what_a_frame_can_carry_are_refused(flows, problem):
    with pytest.raises(ValueError, match=problem):
        Flows(**flows)


def test_icmp_frames_vary_only_the_source_address():
    flows = Flows("198.51.100.7", addresses=5)
    template = build(ICMP(type=3, code=3), "10.0.0.1")
    for index, row in enumerate(FlowFrames(template, flows).rows(3, 7)):
        assert row.tobytes() == build(ICMP(type=3, code=3), f"198.51.100.{7 + (3 + index) % 5}")


def test_templates_the_generator_cannot_vary_are_refused():
    with pytest.raises(ValueError, match="TCP, UDP or ICMP"):
        FlowFrames(bytes(Ether() / IP(proto=47) / (b"z" * 20)), Flows())
    with pytest.raises(ValueError, match="ICMP has no ports"):
        FlowFrames(build(ICMP(), "10.0.0.1"), Flows(ports=4))


# --- IPv6 -----------------------------------------------------------------------------------------

def build6(l4, src, payload=b"y" * 11):
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IPv6(src=src, dst="2001:db8:ffff::10", hlim=51, fl=0x12345) / l4 / payload)


@given(net=st.integers(0, (1 << 64) - 1), first=st.integers(0, (1 << 64) - 1 - 300), addresses=st.integers(1, 300),
       first_port=st.integers(1, 60000), ports=st.integers(1, 300), start=st.integers(0, 10**6),
       tcp=st.booleans())
def test_every_ipv6_frame_is_what_scapy_builds_for_its_flow(net, first, addresses, first_port, ports, start, tcp):
    """The source varies in its low 64 bits (the /64 stays the template flows'), the L4 checksum
    over the IPv6 pseudo-header follows it; there is no header checksum."""
    flows = Flows(str(ipaddress.IPv6Address(net << 64 | first)), addresses, first_port, ports)
    l4 = TCP(sport=7, dport=80, flags="S", window=1234) if tcp else UDP(sport=7, dport=53)
    frames = FlowFrames(build6(l4.copy(), "2001:db8::1"), flows)
    for offset, row in enumerate(frames.rows(start, 5)):
        flow = (start + offset) % flows.count
        want = l4.copy()
        want.sport = first_port + (flow // addresses) % ports
        assert row.tobytes() == build6(want, str(ipaddress.IPv6Address(net << 64 | first + flow % addresses)))


def test_ipv6_udp_checksums_that_come_out_zero_are_sent_as_ffff():
    """A UDP checksum that computes to 0 is sent as 0xffff (0 would mean "none", which IPv6 forbids):
    the flows below are chosen so that some frames' checksums compute to 0 (scapy writes 0xffff)."""
    template = build6(UDP(sport=7, dport=53), "2001:db8::1", payload=b"")
    frames = FlowFrames(template, Flows("2001:db8::1", addresses=1, first_port=1, ports=65535))
    rows = frames.rows(0, 65535)
    checks = rows[:, 60].astype(int) << 8 | rows[:, 61]
    assert 0 not in checks
    # a port where the one's complement sum is all ones: the checksum field is 0xffff
    port = int(np.flatnonzero(checks == 0xFFFF)[0]) + 1
    assert frames.frame(port - 1) == build6(UDP(sport=port, dport=53), "2001:db8::1", payload=b"")


def test_icmpv6_frames_vary_the_source_and_the_checksum_over_it():
    flows = Flows("2001:db8:7::fffe", addresses=5)
    template = build6(ICMPv6EchoRequest(id=9, seq=3), "2001:db8:7::1")
    for index, row in enumerate(FlowFrames(template, flows).rows(3, 7)):
        source = ipaddress.IPv6Address("2001:db8:7::fffe") + (3 + index) % 5
        assert row.tobytes() == build6(ICMPv6EchoRequest(id=9, seq=3), str(source)), index


@pytest.mark.parametrize("template, flows, problem", [
    (lambda: build6(UDP(sport=7, dport=53), "2001:db8::1"), Flows("10.0.0.1"), "flows' first address must be IPv6"),
    (lambda: build(UDP(sport=7, dport=53), "10.0.0.1"), Flows("2001:db8::1"), "must be IPv4 too"),
    (lambda: bytes(Ether() / IPv6() / IPv6ExtHdrFragment() / UDP()), Flows("::1"), "no extension headers"),
    (lambda: build6(UDP(sport=7, dport=53, chksum=0), "2001:db8::1"), Flows("2001:db8::1"), "IPv6 requires one"),
    (lambda: build6(ICMPv6EchoRequest(), "2001:db8::1"), Flows("2001:db8::1", ports=2), "ICMP has no ports"),
    (lambda: build6(UDP(), "2001:db8::1")[:60], Flows("2001:db8::1"), "too short for its L4 header"),
])
def test_ipv6_templates_the_generator_cannot_vary_are_refused(template, flows, problem):
    with pytest.raises(ValueError, match=problem):
        FlowFrames(template(), flows)


@pytest.mark.parametrize("flows, problem", [
    (dict(first_address="2001:db8::ffff:ffff:ffff:fff0", addresses=17), "leave its /64"),
    (dict(first_address="2001:db8::zz"), "not an IPv4 or IPv6 address"),
])
def test_ipv6_flows_that_leave_their_slash_64_are_refused(flows, problem):
    with pytest.raises(ValueError, match=problem):
        Flows(**flows)
    assert Flows("2001:db8::ffff:ffff:ffff:fff0", addresses=16).family == 6  # the last address fits


def test_the_packet_backend_s_ipv6_image_holds_scapy_s_frame_for_every_row():
    """PacketBatches precomputes one row per flow plus a batch that wraps around to flow 0."""
    flows = Flows("2001:db8:1:2::ffff:fffe", addresses=5, first_port=40000, ports=3)
    template = build6(UDP(sport=7, dport=53), "2001:db8::1")
    image = PacketBatches(FlowFrames(template, flows))
    try:
        for row in [*range(flows.count + 2), flows.count + 1023]:
            flow = row % flows.count
            source = ipaddress.IPv6Address("2001:db8:1:2::ffff:fffe") + flow % 5
            want = build6(UDP(sport=40000 + flow // 5, dport=53), str(source))
            assert image.image[row, :len(template)].tobytes() == want, row
    finally:
        image.close()
