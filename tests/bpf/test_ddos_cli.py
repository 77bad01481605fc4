"""`bpfnet ddos test EXPR -r FILE` (the compiled program in the kernel) prints the packets that
`tcpdump -r FILE EXPR` prints, on a capture written with scapy."""

import json
import random
import re
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap
from typer.testing import CliRunner

from bpfnet.ddos.cli import app

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump not installed")]

EXPRESSIONS = ["udp dst port 53", "tcp[tcpflags] & tcp-syn != 0 and not tcp[tcpflags] & tcp-ack != 0",
               "src net 10.1.0.0/16 and (udp or icmp)", "ip[8] < 64", "len > 200", "vlan and udp",
               "ip6 and tcp dst portrange 8000-8100", "udp[8:4] = 0xdeadbeef", "arp", "not ip"]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    rng = random.Random(7)
    packets = []
    for number in range(400):
        src = rng.choice(["10.1.2.3", "10.1.9.9", "192.0.2.5"])
        kind = rng.randrange(7)
        if kind == 0:
            pkt = (Ether() / IP(src=src, ttl=rng.choice([32, 64, 128])) / UDP(sport=1000, dport=rng.choice([53, 54]))
                   / Raw(rng.choice([b"\xde\xad\xbe\xef", b"x" * 300])))
        elif kind == 1:
            pkt = Ether() / IP(src=src) / TCP(sport=1000, dport=80, flags=rng.choice(["S", "SA", "A"]))
        elif kind == 2:
            pkt = Ether() / IP(src=src) / ICMP()
        elif kind == 3:
            pkt = Ether() / Dot1Q(vlan=rng.choice([1, 2])) / IP(src=src) / UDP(sport=1, dport=53)
        elif kind == 4:
            pkt = Ether() / IPv6() / TCP(sport=1, dport=rng.choice([8080, 9000]))
        elif kind == 5:
            pkt = Ether() / ARP(psrc=src)
        else:
            pkt = Ether() / IP(src=src) / UDP(sport=1, dport=53) / Raw(b"\xde\xad\xbe\xef")
            pkt = Ether(bytes(pkt)[:rng.randrange(14, len(pkt))])  # truncated frame
        pkt.time = 1_700_000_000 + number  # one distinct second per packet: how tcpdump names it
        packets.append(pkt)
    path = tmp_path_factory.mktemp("dd") / "capture.pcap"
    wrpcap(str(path), packets)
    return path


def tcpdump_matches(path, expr: str) -> list[int]:
    out = subprocess.run(["tcpdump", "-tt", "-n", "-r", str(path), expr], capture_output=True, text=True,
                         check=True).stdout
    return [int(re.match(r"(\d+)\.", line).group(1)) - 1_700_000_000 + 1 for line in out.splitlines()]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_ddos_test_equals_tcpdump(capture, expr):
    result = CliRunner().invoke(app, ["test", expr, "-r", str(capture), "-o", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["packets"] == 400
    expected = tcpdump_matches(capture, expr)
    assert report["matched"] == expected
    if expr not in ("udp[8:4] = 0xdeadbeef", "ip6 and tcp dst portrange 8000-8100"):
        assert expected  # the capture exercises the expression


def test_ddos_test_reports_libpcaps_error():
    result = CliRunner().invoke(app, ["test", "udp port fifty", "-r", "/dev/null"])
    assert result.exit_code == 1
    assert "unknown port 'fifty'" in result.output
