"""The generator's frames are exactly what scapy builds for each flow, checksums included, whichever
backend sends them; each backend this kernel allows delivers every frame, in order, through a veth."""

import ipaddress
import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether

from bpfnet.bench.trafficgen import (
    Backend,
    FlowFrames,
    Flows,
    LiveFrames,
    TrafficGenerator,
    choose_backend,
    live_frames_denied,
)
from bpfnet.netns import Topology, inside

pytestmark = pytest.mark.root

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # not in the socket module
FLOWS = Flows(first_address="198.51.100.1", addresses=3, first_port=2000, ports=2)
# IPv6: the low 64 bits vary (and carry into the third word), the template's /64 is replaced
FLOWS6 = Flows(first_address="2001:db8:aa:bb::fffe", addresses=3, first_port=2000, ports=2)


def frame(l4, src="10.0.0.1", src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02"):
    if ":" in src:
        ip = IPv6(src=src, dst="2001:db8:ffff::10", hlim=64, tc=0x10, fl=0xbeef)
    else:
        ip = IP(src=src, dst="192.0.2.10", ttl=64, id=7)
    return bytes(Ether(src=src_mac, dst=dst_mac) / ip / l4 / (b"x" * 18))


def expected(l4, index, flows=FLOWS, **macs):
    """Frame `index` as scapy builds it: the flow's source address and port, fresh checksums."""
    flow = index % flows.count
    want = l4.copy()
    if isinstance(want, (TCP, UDP)):  # (not an ICMP error quoting a UDP header)
        want.sport = flows.first_port + (flow // flows.addresses) % flows.ports
    first = ipaddress.ip_address(flows.first_address)
    return frame(want, src=str(first + flow % flows.addresses), **macs)


L4 = [UDP(sport=1111, dport=53), TCP(sport=1111, dport=80, flags="S", seq=5)]
# (l4, template source, flows): IPv4 and IPv6; the IPv6 template's /64 is not the flows'
CASES = [
    pytest.param(L4[0], "10.0.0.1", FLOWS, id="udp"),
    pytest.param(L4[1], "10.0.0.1", FLOWS, id="tcp"),
    pytest.param(L4[0], "2001:db8::1", FLOWS6, id="udp6"),
    pytest.param(L4[1], "2001:db8::1", FLOWS6, id="tcp6"),
    pytest.param(ICMPv6DestUnreach(code=4) / IPv6(src="2001:db8:ffff::10", dst="2001:db8::9") / UDP(),
                 "2001:db8::1", Flows("2001:db8:aa:bb::fffe", addresses=3), id="icmp6"),
]


@pytest.mark.parametrize("l4, source, flows", CASES)
def test_the_live_frames_program_writes_the_same_bytes_as_the_frames_in_python(l4, source, flows):
    """The live backend's program (run once per frame, without live frames: any kernel allows that)
    and the frames the packet backend precomputes agree byte for byte, and both are scapy's."""
    frames = FlowFrames(frame(l4.copy(), src=source), flows)
    live = LiveFrames(frames)
    try:
        for index in range(8):
            live.seek(index)
            want = expected(l4, index, flows)
            assert live.program.test_run(frames.template).data == frames.frame(index) == want, index
    finally:
        live.close()


def test_icmp_templates_get_their_flow_s_source_from_either_backend():
    """ICMP has no ports: only the source address and the IPv4 checksum change, in the live
    program as in the frames computed in Python."""
    flows = Flows(first_address="198.51.100.1", addresses=3)
    frames = FlowFrames(frame(ICMP(type=3, code=3) / (b"y" * 8)), flows)
    live = LiveFrames(frames)
    try:
        for index in range(4):
            live.seek(index)
            want = frame(ICMP(type=3, code=3) / (b"y" * 8), src=f"198.51.100.{1 + index % 3}")
            assert live.program.test_run(frames.template).data == frames.frame(index) == want, index
    finally:
        live.close()


@pytest.mark.parametrize("template, flows", [(frame(UDP(sport=1111, dport=53)), Flows()),
                                             (frame(TCP(dport=80), src="2001:db8::1"), Flows("2001:db8::1"))],
                         ids=["udp", "tcp6"])
def test_headers_are_restored_from_the_template_whatever_the_page_holds(template, flows):
    live = LiveFrames(FlowFrames(template, flows))
    try:
        live.seek(0)
        clean = live.program.test_run(template).data
        live.seek(0)
        # e.g. an encapsulating LB moved the headers: every restored word is written back (80
        # bytes: Ethernet + IPv6 + TCP is 74)
        restored = min(len(template), 80) // 8 * 8
        corrupted = bytes(restored) + template[restored:]
        assert live.program.test_run(corrupted).data == clean
    finally:
        live.close()


def test_rejects_non_ipv4_templates():
    with pytest.raises(ValueError, match="IPv4"):
        TrafficGenerator(b"\0" * 60)


def test_auto_picks_live_frames_exactly_when_the_kernel_allows_them():
    assert choose_backend() is (Backend.PACKET if live_frames_denied() else Backend.LIVE)
    with pytest.raises(ValueError, match="choose one of auto, live, packet"):
        choose_backend("afxdp-ish")


def available_backends():
    return [pytest.param(b, marks=pytest.mark.skipif(b is Backend.LIVE and live_frames_denied() is not None,
                                                     reason=f"this kernel refuses XDP live frames "
                                                            f"({live_frames_denied()})"))
            for b in Backend]


@pytest.fixture
def veth():
    """gen:g0 <-> rx:r0, no IPv6 (its neighbour discovery would add frames)."""
    with Topology("tgt") as topology:
        gen, rx = topology.netns("gen"), topology.netns("rx")
        for ns in (gen, rx):
            topology.run(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                              "net.ipv6.conf.default.disable_ipv6=1"])
        topology.veth("g0", "r0", ns=gen, peer_ns=rx)
        yield topology, gen, rx


def capture(rx: str, dev: str) -> socket.socket:
    with inside(rx):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        sock.bind((dev, ETH_P_ALL))
    sock.settimeout(2)
    return sock


def received(sock: socket.socket, want: int) -> list[bytes]:
    frames, deadline = [], time.monotonic() + 5
    while len(frames) < want and time.monotonic() < deadline:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            break
        if data[12:14] in (b"\x08\x00", b"\x86\xdd"):  # (IPv6 is off on the receiving end: no ND)
            frames.append(data)
    return frames


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("l4, source, flows", CASES[:4])
def test_each_backend_delivers_every_frame_in_order_with_its_flow_and_checksums(veth, backend, l4, source, flows):
    topology, gen, rx = veth
    macs = {"src_mac": topology.mac("g0", ns=gen), "dst_mac": topology.mac("r0", ns=rx)}
    count = 5000 + 7  # more than one TX ring, not a whole number of rings or of flows
    sock = capture(rx, "r0")
    try:
        with TrafficGenerator(frame(l4.copy(), src=source, **macs), flows, backend) as generator:
            assert generator.backend is backend
            with inside(gen):
                generator.send(topology.ifindex("g0", ns=gen), count - 7)
                generator.send(topology.ifindex("g0", ns=gen), 7)  # goes on where the last call stopped
                generator.send(topology.ifindex("g0", ns=gen), 3, start=4)
        got = received(sock, count + 3)
    finally:
        sock.close()
    assert len(got) == count + 3
    want = [expected(l4, i, flows, **macs) for i in range(6)]
    assert got[:count] == [want[i % 6] for i in range(count)]
    assert got[count:] == [want[i % 6] for i in (4, 5, 6)]


def test_the_generator_sends_only_out_of_a_veth():
    with TrafficGenerator(frame(UDP(sport=1, dport=2))) as generator, \
            pytest.raises(ValueError, match="only out of a veth"):
        generator.send(socket.if_nametoindex("lo"), 1)
