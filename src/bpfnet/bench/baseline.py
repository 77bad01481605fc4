"""Baseline: what it costs each hook to drop what the traffic generator sends, XDP against tc,
nftables and iptables, all on one veth in the same run: the rate, the receiver's CPU time per
packet (its NAPI thread, see bench.receiver) and, for BPF programs, the in-kernel ns per packet.

Each peer is set up as its users would: XDP programs at XDP, tc at tcx, nftables and iptables with
no XDP program in front of them (the veth has NAPI through GRO)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.harness import Sample, Scenario
from bpfnet.bench.receiver import ReceiverCpu
from bpfnet.bench.trafficgen import Flows, TrafficGenerator
from bpfnet.ebpf import ObjectSpec, Program
from bpfnet.netns import Topology, inside

SINK_ADDRESS = "192.0.2.2"
SETTLE = 0.02          # s for the receiver to finish the last frames before the counters are read
TEST_RUN_REPEAT = 100_000


def test_run_ns(program: Program, frame: bytes, repeat: int = TEST_RUN_REPEAT) -> float:
    """In-kernel ns per packet of `program` on `frame` (BPF_PROG_TEST_RUN); only for programs that
    leave the frame as it was (repeat runs on the same buffer)."""
    return float(program.test_run(frame, repeat=repeat).duration_ns)


class Bench:
    """Two namespaces joined by a veth: `gen` sends with the traffic generator, `sink` drops; the
    sink's receive path runs in a NAPI thread whose CPU time is measured."""

    def __init__(self, topology: Topology, backend: str | None = None) -> None:
        self.topology = topology
        self.gen = topology.netns("gen")
        self.sink = topology.netns("sink")
        topology.veth("g0", "s0", ns=self.gen, peer_ns=self.sink)
        topology.addr("s0", f"{SINK_ADDRESS}/24", ns=self.sink)
        topology.addr("g0", "192.0.2.1/24", ns=self.gen)
        self.g0 = topology.ifindex("g0", ns=self.gen)
        self.s0 = topology.ifindex("s0", ns=self.sink)
        self.backend = backend  # the traffic generator's (None: the best this kernel allows)
        self._generators: list[TrafficGenerator] = []
        self.cpu = ReceiverCpu(topology, self.sink, "s0", self.gen, "g0")
        self.sink_objects = ObjectSpec.builtin("bench_sink").load()

    def template(self, l4=None) -> bytes:
        return bytes(Ether(src=self.topology.mac("g0", ns=self.gen), dst=self.topology.mac("s0", ns=self.sink))
                     / IP(src="198.51.100.1", dst=SINK_ADDRESS, ttl=64)
                     / (l4 or UDP(sport=1024, dport=9)) / (b"x" * 18))

    def rate(self, generator: TrafficGenerator, frames: int, counter: Callable[[], int],
             kernel_ns: float | None = None) -> Sample:
        """Mpps the sink processed while the generator sent `frames`, and the sink's CPU ns per
        packet it processed."""
        return measure_receiver(self.cpu, self.gen, self.g0, generator, frames, counter, kernel_ns)

    def traffic(self, flows: Flows, template: bytes | None = None) -> TrafficGenerator:
        """A generator of `template` (default: UDP to the sink) with this bench's backend; closed
        with the bench."""
        generator = TrafficGenerator(template or self.template(), flows, self.backend)
        self._generators.append(generator)
        return generator

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
        for generator in self._generators:
            generator.close()
        self.sink_objects.close()


def measure_receiver(cpu: ReceiverCpu, ns: str, ifindex: int, generator: TrafficGenerator, frames: int,
                     counter: Callable[[], int], kernel_ns: float | None = None) -> Sample:
    """Send `frames` out of `ifindex` in `ns`; the rate at which `counter` moved meanwhile and the
    receiver's CPU time per counted packet."""
    cpu.pin_sender()
    before, cpu_before = counter(), cpu.read()
    start = time.perf_counter()
    with inside(ns):
        generator.send(ifindex, frames)
    elapsed = time.perf_counter() - start
    time.sleep(SETTLE)
    packets, cpu_ns = counter() - before, cpu.read() - cpu_before
    if packets <= 0:
        raise RuntimeError(f"the receiver counted no packets of the {frames:,} sent")
    return Sample(packets / elapsed / 1e6, cpu_ns / packets, kernel_ns)


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
    generator = bench.traffic(Flows(first_address="198.51.100.1", addresses=256))
    programs = bench.sink_objects.programs

    def xdp_drop() -> Sample:
        kernel = test_run_ns(programs["xdp_count_drop"], generator.frame(0))
        with bench.xdp("xdp_count_drop"):
            return bench.rate(generator, frames, bench.seen, kernel)

    def tc_drop() -> Sample:
        kernel = test_run_ns(programs["tc_count_drop"], generator.frame(0))
        with bench.tcx("tc_count_drop"):
            return bench.rate(generator, frames, bench.seen, kernel)

    def nftables_drop() -> Sample:
        topology.run(sink, ["nft", "-f", "-"], input=NFT_DROP)
        try:
            return bench.rate(generator, frames, lambda: nft_counter(topology, sink))
        finally:
            topology.run(sink, ["nft", "delete", "table", "netdev", "bench"])

    def iptables_drop() -> Sample:
        topology.run(sink, ["iptables", "-t", "raw", "-A", "PREROUTING", "-i", "s0", "-j", "DROP"])
        try:
            return bench.rate(generator, frames, lambda: iptables_counter(topology, sink))
        finally:
            topology.run(sink, ["iptables", "-t", "raw", "-F", "PREROUTING"])

    return [Scenario("XDP drop (bpfnet)", xdp_drop, note="reference"),
            Scenario("tc drop (tcx)", tc_drop),
            Scenario("nftables netdev ingress drop", nftables_drop),
            Scenario("iptables raw PREROUTING drop", iptables_drop)]
