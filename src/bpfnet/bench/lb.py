"""Load balancer throughput: bpfnet's XDP load balancer against the XDP_TX ceiling and an
nftables DNAT load balancer (kube-proxy's nftables mode), on one veth in the same run.

The generator namespace sends UDP to the VIP from many flows into the LB namespace; whatever the
LB sends on (encapsulated by bpfnet, DNATed and forwarded by nftables, or bounced by XDP_TX)
comes back over the same veth, where a counting XDP program on the generator side counts it.
The LB side's receive path (all the LB's work, up to handing the frame back to the veth) runs in a
NAPI thread whose CPU time per packet is measured (bench.receiver); the generator side's NAPI runs
in a thread of its own, so counting the returns is not charged to the LB.
"""

from __future__ import annotations

import contextlib
import statistics
import struct

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.baseline import measure_receiver
from bpfnet.bench.harness import Sample, Scenario
from bpfnet.bench.receiver import SENDER_CPU, ReceiverCpu
from bpfnet.bench.trafficgen import Flows, TrafficGenerator
from bpfnet.ebpf import ObjectSpec
from bpfnet.ebpf.program import XDP_MD
from bpfnet.lb.config import LbSettings, LbState, Real, Vip
from bpfnet.lb.dataplane import Dataplane, lb_spec
from bpfnet.netns import Topology, inside

VIP = "10.10.100.1"
XDP_TX = 3
REALS = ["10.10.0.11", "10.10.0.12", "10.10.0.13"]
NFT_DNAT = f"""table ip benchlb {{
    chain prerouting {{
        type nat hook prerouting priority -100;
        ip daddr {VIP} udp dport 80 dnat to numgen random mod 3 map {{ 0 : {REALS[0]}, 1 : {REALS[1]}, 2 : {REALS[2]} }}
    }}
}}
"""


class LbBench:
    def __init__(self, topology: Topology, backend: str | None = None) -> None:
        self.topology = topology
        self.gen = topology.netns("gen")
        self.lb = topology.netns("lb")
        topology.veth("g0", "l0", ns=self.gen, peer_ns=self.lb)
        topology.addr("g0", "10.10.0.1/24", ns=self.gen)
        topology.addr("l0", "10.10.0.2/24", ns=self.lb)
        topology.forwarding(True, ns=self.lb)
        topology.rp_filter(0, ns=self.lb)
        for real in REALS:  # the reals "live" behind the generator: frames to them come back
            topology.neigh("l0", real, topology.mac("g0", ns=self.gen), ns=self.lb)
        self.g0 = topology.ifindex("g0", ns=self.gen)
        self.l0 = topology.ifindex("l0", ns=self.lb)
        self.cpu = ReceiverCpu(topology, self.lb, "l0", self.gen, "g0")
        self.returns = ReceiverCpu(topology, self.gen, "g0", self.lb, "l0", cpu=SENDER_CPU)
        self.sink = ObjectSpec.builtin("bench_sink").load()
        settings = LbSettings()  # the defaults a user gets: use_fib, a 4M-flow connection table
        self.dataplane = Dataplane.load(lb_spec(settings), settings=settings)
        self.lb_object = self.dataplane.obj
        self.dataplane.apply(LbState(settings=settings, vips=[
            Vip(address=VIP, port=80, protocol="udp", reals=[Real(address=r) for r in REALS])]))
        template = bytes(Ether(src=topology.mac("g0", ns=self.gen), dst=topology.mac("l0", ns=self.lb))
                         / IP(src="198.51.100.1", dst=VIP, ttl=64) / UDP(sport=1024, dport=80) / (b"x" * 18))
        self.generator = TrafficGenerator(template, Flows("198.51.100.1", addresses=1024, ports=16), backend)

    def seen(self) -> int:
        return sum(struct.unpack("<Q", v)[0] for v in self.sink.maps["seen"].lookup(b"\0" * 4))

    def rate(self, frames: int, kernel_ns: float | None) -> Sample:
        return measure_receiver(self.cpu, self.gen, self.g0, self.generator, frames, self.seen, kernel_ns)

    def kernel_ns(self, lb_program) -> float:
        """In-kernel ns per packet of `lb_program` on an established flow's frame, net of an
        XDP_PASS program's: one frame per run, since the LB rewrites (encapsulates) the frame it
        runs on, and a single run's duration includes the kernel's timing."""
        frame = self.generator.frame(0)
        ctx = XDP_MD.pack(0, len(frame), 0, self.l0, 0, 0)  # received on l0, as live traffic is

        def median_ns(program) -> float:
            return statistics.median(program.test_run(frame, ctx).duration_ns for _ in range(2000))
        with inside(self.lb):  # the next hop is looked up in the LB's namespace, as for live traffic
            verdict = lb_program.test_run(frame, ctx).retval  # the flow is in the connection table from here on
            if verdict != XDP_TX:
                raise RuntimeError(f"{lb_program.name} answered {verdict} to a VIP frame, not XDP_TX")
            return max(0.0, median_ns(lb_program) - median_ns(self.sink.programs["xdp_pass"]))

    def measure(self, lb_program, frames: int, nft: bool = False) -> Sample:
        """Mpps that come back through `lb_program` (attached at XDP on the LB side of the veth),
        or through nftables' DNAT with no XDP program on the LB side."""
        kernel = None if nft else self.kernel_ns(lb_program)
        with inside(self.gen), self.sink.programs["xdp_count_drop"].attach_xdp(self.g0), \
                inside(self.lb), (contextlib.nullcontext() if nft else lb_program.attach_xdp(self.l0)):
            if nft:
                self.topology.run(self.lb, ["nft", "-f", "-"], input=NFT_DNAT)
            try:
                return self.rate(frames, kernel)
            finally:
                if nft:
                    self.topology.run(self.lb, ["nft", "delete", "table", "ip", "benchlb"])

    def close(self) -> None:
        self.generator.close()
        self.lb_object.close()
        self.sink.close()


def scenarios(bench: LbBench, frames: int) -> list[Scenario]:
    return [
        Scenario("XDP_TX ceiling", lambda: bench.measure(bench.sink.programs["xdp_tx"], frames),
                 note="reference: bounce every frame"),
        Scenario("bpfnet lb (XDP, IPIP)", lambda: bench.measure(bench.lb_object.programs["xdp_lb"], frames),
                 note="Maglev + conn table + encap"),
        Scenario("nftables DNAT (kube-proxy nftables)",
                 lambda: bench.measure(None, frames, nft=True),
                 note="conntrack + DNAT + forward"),
    ]

