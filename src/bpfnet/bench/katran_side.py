"""bpfnet's load balancer next to Katran's, per packet, in one run: `python -m bpfnet.bench.katran_side
BALANCER_O` where BALANCER_O is Katran's `katran/lib/bpf/balancer.bpf.c` compiled outside this
repository (docs/bench.md, "lb: side by side with Katran"; the project holds none of Katran's code).

Both programs get the same VIP (the `bpfnet bench lb` one, UDP, 3 reals, the same Maglev ring), the
same frames and the same context (received on the bench veth in the LB namespace) and are timed
interleaved with BPF_PROG_TEST_RUN, one frame per run, net of an XDP_PASS program:
  hit  - an established flow (connection-table hit), median of 2,000 runs;
  new  - a frame of a new flow every run (a table miss, the ring, an insert), median of 500;
  pass - a frame to a non-VIP address, median of 2,000.
bpfnet runs with its default settings; Katran with its default 8M-entry LRU split over the CPUs
(one LRU_HASH per CPU in `lru_mapping`) and its gateway MAC in `ctl_array`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import statistics
import struct
import sys
from collections.abc import Iterator

from bpfnet.bench.lb import REALS, VIP, LbBench
from bpfnet.ebpf import Map, Object, ObjectSpec, Program
from bpfnet.ebpf._libbpf import MapType
from bpfnet.ebpf.program import XDP_MD
from bpfnet.lb.maglev import build_ring
from bpfnet.netns import Topology, inside

RING_SIZE = 65537
KATRAN_LRU_FLOWS = 8 << 20  # Katran's default, split over the CPUs
FLOW_KEY_BYTES, LRU_VALUE_BYTES = 40, 16  # struct flow_key, struct real_pos_lru
XDP_TX = 3


def load_katran(path: str, gateway_mac: bytes) -> tuple[Object, list[Map]]:
    """Katran's object with the bench VIP: vip_map, reals (positions 1..3), ch_rings, ctl_array and
    one LRU per CPU in lru_mapping."""
    obj = ObjectSpec.from_file(path).load()
    maps = obj.maps
    vip = socket.inet_aton(VIP) + bytes(12) + struct.pack("!H", 80) + bytes([socket.IPPROTO_UDP, 0])
    maps["vip_map"].update(vip, struct.pack("<II", 0, 0))  # flags 0, vip_num 0
    for position, real in enumerate(REALS, 1):
        maps["reals"].update(struct.pack("<I", position), socket.inet_aton(real) + bytes(16))
    ring = build_ring([(ipaddress.ip_address(r), 1) for r in REALS])
    maps["ch_rings"].update_batch([struct.pack("<I", s) for s in range(RING_SIZE)],
                                  [struct.pack("<I", ring[s] + 1) for s in range(RING_SIZE)])
    maps["ctl_array"].update(struct.pack("<I", 0), gateway_mac + bytes(2))
    cpus = os.cpu_count() or 1
    lrus = []
    for cpu in range(cpus):
        lru = Map.create(MapType.LRU_HASH, FLOW_KEY_BYTES, LRU_VALUE_BYTES, KATRAN_LRU_FLOWS // cpus, name=f"klru{cpu}")
        lrus.append(lru)
        maps["lru_mapping"].update(struct.pack("<I", cpu), struct.pack("<I", lru.fd))
    return obj, lrus


def measure(katran_object: str, rounds: int = 5) -> dict[str, dict[str, list[float]]]:
    with Topology("ksb") as topo:
        bench = LbBench(topo, "packet")
        katran, lrus = load_katran(katran_object, bytes.fromhex("020000000009"))
        try:
            programs = {"bpfnet": bench.dataplane.xdp_lb, "katran": katran.programs["balancer_ingress"]}
            hit = bench.generator.frame(0)
            elsewhere = bytearray(hit)
            elsewhere[30:34] = socket.inet_aton("10.10.200.1")
            ctx = XDP_MD.pack(0, len(hit), 0, bench.l0, 0, 0)
            clients = iter(range(1, 1 << 30))
            results: dict[str, dict[str, list[float]]] = {p: {"hit": [], "new": [], "pass": []} for p in programs}

            def median(program: Program, frames: Iterator[bytes], verdict: int | None = None) -> float:
                durations = []
                for frame in frames:
                    run = program.test_run(frame, ctx)
                    if verdict is not None and run.retval != verdict:
                        raise RuntimeError(f"{program.name} answered {run.retval}, expected {verdict}")
                    durations.append(run.duration_ns)
                return statistics.median(durations)

            def new_flows(count: int) -> Iterator[bytes]:
                for _ in range(count):
                    i = next(clients)
                    frame = bytearray(hit)
                    struct.pack_into("!I", frame, 26, 0xC6000000 + (i >> 10))  # a new client address...
                    struct.pack_into("!H", frame, 34, 1024 + (i & 1023))       # ...and port
                    yield bytes(frame)

            with inside(bench.lb):
                for program in programs.values():
                    median(program, iter([hit]), XDP_TX)  # the hit flow is in both tables from here on
                for _ in range(rounds):
                    base = median(bench.sink.programs["xdp_pass"], iter([hit] * 2000))
                    for name, program in programs.items():
                        results[name]["hit"].append(median(program, iter([hit] * 2000), XDP_TX) - base)
                        results[name]["new"].append(median(program, new_flows(500), XDP_TX) - base)
                        results[name]["pass"].append(median(program, iter([bytes(elsewhere)] * 2000)) - base)
            return results
        finally:
            katran.close()
            for lru in lrus:
                lru.close()
            bench.close()


def main() -> None:
    results = measure(sys.argv[1])
    for kind in ("hit", "new", "pass"):
        ours, theirs = (statistics.median(results[p][kind]) for p in ("bpfnet", "katran"))
        print(f"{kind:5} bpfnet {ours:6.0f} ns  katran {theirs:6.0f} ns  ratio {ours / theirs:.2f}  "
              f"(rounds: bpfnet {[round(v) for v in results['bpfnet'][kind]]}, "
              f"katran {[round(v) for v in results['katran'][kind]]})")


if __name__ == "__main__":
    main()
