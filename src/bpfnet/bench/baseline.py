"""Baseline: how fast each hook can drop what the traffic generator sends, XDP against tc,
nftables and iptables, all on one veth in the same run."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.harness import Scenario
from bpfnet.bench.trafficgen import Flows, TrafficGenerator
from bpfnet.ebpf import ObjectSpec
from bpfnet.netns import Topology, inside

SINK_ADDRESS = "192.0.2.2"


class Bench:
    """Two namespaces joined by a veth: `gen` sends with the in-kernel generator, `sink` drops."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.gen = topology.netns("gen")
        self.sink = topology.netns("sink")
        topology.veth("g0", "s0", ns=self.gen, peer_ns=self.sink)
        topology.addr("s0", f"{SINK_ADDRESS}/24", ns=self.sink)
        topology.addr("g0", "192.0.2.1/24", ns=self.gen)
        self.g0 = topology.ifindex("g0", ns=self.gen)
        self.s0 = topology.ifindex("s0", ns=self.sink)
        self.sink_objects = ObjectSpec.builtin("bench_sink").load()

    def template(self, l4=None) -> bytes:
        return bytes(Ether(src=self.topology.mac("g0", ns=self.gen), dst=self.topology.mac("s0", ns=self.sink))
                     / IP(src="198.51.100.1", dst=SINK_ADDRESS, ttl=64)
                     / (l4 or UDP(sport=1024, dport=9)) / (b"x" * 18))

    def rate(self, generator: TrafficGenerator, frames: int, counter: Callable[[], int]) -> float:
        """Mpps the sink processed while the generator sent `frames`."""
        before = counter()
        start = time.perf_counter()
        with inside(self.gen):
            generator.send(self.g0, frames)
        elapsed = time.perf_counter() - start
        return (counter() - before) / elapsed / 1e6

    def seen(self) -> int:
        return sum(struct.unpack("<Q", v)[0] for v in self.sink_objects.maps["seen"].lookup(b"\0" * 4))

    @contextmanager
    def xdp(self, program: str) -> Iterator[None]:
        with inside(self.sink), self.sink_objects.programs[program].attach_xdp(self.s0):
            yield

    @contextmanager
    def tcx(self, program: str) -> Iterator[None]:
        with inside(self.sink), self.sink_objects.programs[program].attach_tcx(self.s0, "ingress"):
            yield

    def close(self) -> None:
        self.sink_objects.close()


def nft_counter(topology: Topology, ns: str) -> int:
    ruleset = json.loads(topology.run(ns, ["nft", "-j", "list", "table", "netdev", "bench"]).stdout)
    return sum(expr["counter"]["packets"] for item in ruleset["nftables"] if "rule" in item
               for expr in item["rule"]["expr"] if "counter" in expr)


def iptables_counter(topology: Topology, ns: str) -> int:
    """Packets matched by the rules of the raw table's PREROUTING chain, all rules summed."""
    out = topology.run(ns, ["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"]).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())


NFT_DROP = """table netdev bench {
    chain in {
        type filter hook ingress device s0 priority 0;
        counter drop
    }
}
"""


def scenarios(bench: Bench, frames: int) -> list[Scenario]:
    topology, sink = bench.topology, bench.sink
    generator = TrafficGenerator(bench.template(), Flows(first_address="198.51.100.1", addresses=256))

    def xdp_drop() -> float:
        with bench.xdp("xdp_count_drop"):
            return bench.rate(generator, frames, bench.seen)

    def tc_drop() -> float:
        with bench.xdp("xdp_pass"), bench.tcx("tc_count_drop"):
            return bench.rate(generator, frames, bench.seen)

    def nftables_drop() -> float:
        topology.run(sink, ["nft", "-f", "-"], input=NFT_DROP)
        try:
            with bench.xdp("xdp_pass"):
                return bench.rate(generator, frames, lambda: nft_counter(topology, sink))
        finally:
            topology.run(sink, ["nft", "delete", "table", "netdev", "bench"])

    def iptables_drop() -> float:
        topology.run(sink, ["iptables", "-t", "raw", "-A", "PREROUTING", "-i", "s0", "-j", "DROP"])
        try:
            with bench.xdp("xdp_pass"):
                return bench.rate(generator, frames, lambda: iptables_counter(topology, sink))
        finally:
            topology.run(sink, ["iptables", "-t", "raw", "-F", "PREROUTING"])

    return [Scenario("XDP drop (bpfnet)", xdp_drop, note="reference"),
            Scenario("tc drop (tcx)", tc_drop),
            Scenario("nftables netdev ingress drop", nftables_drop),
            Scenario("iptables raw PREROUTING drop", iptables_drop)]
