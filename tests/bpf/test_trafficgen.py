"""The generator's frames are exactly what scapy builds for each flow, checksums included."""

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.trafficgen import Flows, TrafficGenerator

pytestmark = pytest.mark.root


def frame(l4, src="10.0.0.1"):
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                 IP(src=src, dst="192.0.2.10", ttl=64, id=7) / l4 / (b"x" * 18))


@pytest.mark.parametrize("l4", [UDP(sport=1111, dport=53), TCP(sport=1111, dport=80, flags="S", seq=5)],
                         ids=["udp", "tcp"])
def test_each_flow_gets_its_address_port_and_valid_checksums(l4):
    flows = Flows(first_address="198.51.100.1", addresses=3, first_port=2000, ports=2)
    with TrafficGenerator(frame(l4.copy()), flows) as generator:
        for index in range(8):
            flow = index % 6
            expected = l4.copy()
            expected.sport = 2000 + (flow // 3) % 2
            want = frame(expected, src=f"198.51.100.{1 + flow % 3}")
            assert generator.frame(index) == want, index


def test_rejects_non_ipv4_templates():
    with pytest.raises(ValueError, match="IPv4"):
        TrafficGenerator(b"\0" * 60)


def test_headers_are_restored_from_the_template_whatever_the_page_holds():
    template = frame(UDP(sport=1111, dport=53))
    with TrafficGenerator(template) as generator:
        clean = generator.frame(0)
        generator._object.maps["sequence"].update(b"\0" * 4, b"\0" * 8)
        corrupted = bytes(42) + template[42:]  # e.g. an encapsulating LB moved the headers
        assert generator.program.test_run(corrupted).data == clean
