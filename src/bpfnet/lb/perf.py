"""Measurements for `bpfnet bench lb`: ring build time and the program's cost per packet.

The per-packet cost comes from BPF_PROG_TEST_RUN with repeat=1 per frame (the program rewrites the
frame it encapsulates, so repeat=N would run later iterations on the encapsulated frame), summing
the durations the kernel measures and subtracting the same measurement of a program that only
returns XDP_PASS.
"""

from __future__ import annotations

import ipaddress
import statistics
import time
from dataclasses import dataclass

from bpfnet.ebpf import ObjectSpec
from bpfnet.lb.config import LbState
from bpfnet.lb.dataplane import Dataplane, lb_spec
from bpfnet.lb.maglev import build_ring
from bpfnet.lb.simulate import flow_frame

VIP = "10.200.0.1"
XDP_PASS, XDP_TX = 2, 3


def ring_build_seconds(reals: int = 1000, rounds: int = 5) -> float:
    """Median wall time of build_ring for `reals` reals of weight 1..4 (65537 slots, v2)."""
    pairs = [(ipaddress.IPv4Address(0x0A000000 + i + 1), 1 + i % 4) for i in range(reals)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        build_ring(pairs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class PacketCost:
    hit_ns: float      # connection-table hit (established flows)
    bypass_ns: float   # lru_bypass VIP: every packet hashes and reads the ring
    baseline_ns: float  # XDP_PASS program, the cost of the hook itself


def packet_cost(flows: int = 1000, reals: int = 100) -> PacketCost:
    """ns per packet of xdp_lb through test_run, net of an XDP_PASS program's cost."""
    state = LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": "02:00:00:00:00:01", "max_vips": 2,
                     "max_reals": reals + 1, "conn_table_size": max(1024, 2 * flows)},
        "vips": [{"address": VIP, "port": port, "protocol": "tcp", "flags": flags,
                  "reals": [{"address": str(ipaddress.IPv4Address(0x0A000000 + i + 1))} for i in range(reals)]}
                 for port, flags in ((80, []), (81, ["lru_bypass"]))]})
    client = ipaddress.ip_address("192.168.0.1")
    vip = ipaddress.ip_address(VIP)
    hit_frames = [flow_frame(client, 1024 + i, vip, 80, "tcp", syn=False) for i in range(flows)]
    bypass_frames = [flow_frame(client, 1024 + i, vip, 81, "tcp", syn=False) for i in range(flows)]
    with Dataplane.load(lb_spec(state.settings), settings=state.settings) as dataplane, \
            ObjectSpec.builtin("bench_sink").load() as sink:
        dataplane.apply(state)
        program = dataplane.xdp_lb
        _run_all(program, hit_frames, XDP_TX)  # warm the connection table
        baseline = _run_all(sink.programs["xdp_pass"], hit_frames, XDP_PASS)
        hits_before = _conn_hits(dataplane)
        hit = _run_all(program, hit_frames, XDP_TX)
        if _conn_hits(dataplane) - hits_before != flows:
            raise RuntimeError("the hit path missed the connection table")
        bypass = _run_all(program, bypass_frames, XDP_TX)
        if _conn_hits(dataplane) - hits_before != flows:
            raise RuntimeError("the bypass path read the connection table")
    return PacketCost(hit_ns=hit - baseline, bypass_ns=bypass - baseline, baseline_ns=baseline)


def _conn_hits(dataplane: Dataplane) -> int:
    return dataplane.counters()["conn_hit"]["packets"]


def _run_all(program, frames: list[bytes], verdict: int) -> float:
    total = 0
    for frame in frames:
        result = program.test_run(frame)
        if result.retval != verdict:
            raise RuntimeError(f"{program.name} answered {result.retval}, expected {verdict}")
        total += result.duration_ns
    return total / len(frames)
