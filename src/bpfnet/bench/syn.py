"""SYN flood: what it costs a host to answer SYNs from spoofed sources with a cookie, bpfnet's
`syncookie` rule in XDP against the kernel's own answers (nftables SYNPROXY, and a listener with
`tcp_syncookies=2`), next to dropping the flood in XDP (the floor: what no answer costs).

Each peer runs in the sink namespace as its users would set it up: bpfnet's ddos stage on the veth
with one `tcp dst port 80` syncookie rule; nftables with the SYNs to the port untracked and sent to
SYNPROXY (the kernel's SYN proxy, answering from netfilter's input hook); a plain listening socket
with `net.ipv4.tcp_syncookies=2` (the TCP stack answers every SYN with a cookie). Every answer goes
back out of the veth to the generator's namespace, which drops it (the spoofed sources are not its
own), so the receiver's CPU per SYN includes building and sending the SYN-ACK."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpfnet.bench.baseline import SINK_ADDRESS, Bench, test_run_ns
from bpfnet.bench.harness import Sample, Scenario
from bpfnet.bench.trafficgen import Flows
from bpfnet.ddos.config import Rule
from bpfnet.ddos.dataplane import DdosDataplane
from bpfnet.netns import inside

PORT = 80
# 65,536 spoofed (address, port) pairs: a cache keyed by the source would not help any peer
FLOOD = Flows(first_address="198.51.100.1", addresses=4096, first_port=1024, ports=16)
RULE_ID = 1
RULE = Rule(id=RULE_ID, expr=f"tcp dst port {PORT}", action="syncookie")
GATEWAY = "192.0.2.1"  # the generator's address: where the sink routes its answers
NFT_SYNPROXY = f"""table inet benchsyn {{
    chain pre {{
        type filter hook prerouting priority raw; policy accept;
        tcp dport {PORT} tcp flags & (syn | ack) == syn counter notrack
    }}
    chain in {{
        type filter hook input priority filter; policy accept;
        tcp dport {PORT} ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm
    }}
}}
"""


def syn_template(bench: Bench) -> bytes:
    """A SYN as Linux sends it (window 64240, MSS, SACK, timestamps, window scale 7)."""
    topology = bench.topology
    return bytes(Ether(src=topology.mac("g0", ns=bench.gen), dst=topology.mac("s0", ns=bench.sink))
                 / IP(src=FLOOD.first_address, dst=SINK_ADDRESS, ttl=64, flags="DF")
                 / TCP(sport=FLOOD.first_port, dport=PORT, flags="S", seq=1000, window=64240,
                       options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                                ("WScale", 7)]))


class SynBench:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.generator = bench.traffic(FLOOD, syn_template(bench))
        bench.topology.run(bench.sink, ["ip", "route", "add", "default", "via", GATEWAY])
        self.stage = DdosDataplane.load()
        self.stage.deploy([RULE])

    def netstat(self, name: str) -> int:
        """A TcpExt counter of the sink namespace (/proc/net/netstat: a header line, a value line)."""
        lines = self.bench.topology.run(self.bench.sink, ["cat", "/proc/net/netstat"]).stdout.splitlines()
        for header, values in zip(lines[::2], lines[1::2], strict=True):
            if header.startswith("TcpExt:"):
                return int(dict(zip(header.split(), values.split(), strict=True))[name])
        raise RuntimeError("no TcpExt counters in /proc/net/netstat")

    def xdp_drop(self, frames: int) -> Sample:
        kernel = test_run_ns(self.bench.sink_objects.programs["xdp_count_drop"], self.generator.frame(0))
        with self.bench.xdp("xdp_count_drop"):
            return self.bench.rate(self.generator, frames, self.bench.seen, kernel)

    def bpfnet(self, frames: int) -> Sample:
        # (no in-kernel figure: the program turns the frame into its answer, so repeated test runs
        # would not see the same packet)
        with inside(self.bench.sink), self.stage.attach(self.bench.s0):
            return self.bench.rate(self.generator, frames, lambda: self.stage.counters(RULE_ID).packets)

    def nft_synproxy(self, frames: int) -> Sample:
        topology, sink = self.bench.topology, self.bench.sink
        topology.run(sink, ["nft", "-f", "-"], input=NFT_SYNPROXY)
        try:
            return self.bench.rate(self.generator, frames, self.synproxy_syns)
        finally:
            topology.run(sink, ["nft", "delete", "table", "inet", "benchsyn"])

    def synproxy_syns(self) -> int:
        """SYNs SYNPROXY answered: its `syn_received`, summed over CPUs (/proc/net/stat/synproxy:
        a header, then a row of hex numbers per CPU)."""
        lines = self.bench.topology.run(self.bench.sink, ["cat", "/proc/net/stat/synproxy"]).stdout.split("\n")
        column = lines[0].split().index("syn_received")
        return sum(int(row.split()[column], 16) for row in lines[1:] if row.strip())

    def listener(self, frames: int) -> Sample:
        with self._listening():
            return self.bench.rate(self.generator, frames, lambda: self.netstat("SyncookiesSent"))

    @contextlib.contextmanager
    def _listening(self) -> Iterator[None]:
        topology, sink = self.bench.topology, self.bench.sink
        before = topology.run(sink, ["sysctl", "-n", "net.ipv4.tcp_syncookies"]).stdout.strip()
        topology.run(sink, ["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        with inside(sink):
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            server.bind((SINK_ADDRESS, PORT))
            server.listen(4096)
            yield
        finally:
            server.close()
            topology.run(sink, ["sysctl", "-qw", f"net.ipv4.tcp_syncookies={before}"])

    def close(self) -> None:
        self.stage.close()


def scenarios(bench: SynBench, frames: int) -> list[Scenario]:
    def each(measure: Callable[[int], Sample]) -> Callable[[], Sample]:
        return lambda: measure(frames)

    return [Scenario("XDP drop (no answer)", each(bench.xdp_drop), note="reference: the floor"),
            Scenario("bpfnet syncookie rule (XDP)", each(bench.bpfnet),
                     note="kernel cookie, SYN-ACK rewritten in place, XDP_TX"),
            Scenario("nftables SYNPROXY", each(bench.nft_synproxy),
                     note="SYNs untracked, answered by SYNPROXY at input"),
            Scenario("Linux listener, tcp_syncookies=2", each(bench.listener),
                     note="the TCP stack answers every SYN with a cookie")]
