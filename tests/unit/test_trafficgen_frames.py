"""The generator's frames in Python (numpy) against scapy, for any flows; bad flows are refused."""

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.trafficgen import FlowFrames, Flows, udp_frame


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
