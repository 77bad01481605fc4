"""The next-hop cache of lb.bpf.c (map nexthops): bpf_fib_lookup answers reused per real while fresh.

BPF_PROG_TEST_RUN inside a namespace whose veth l0 has permanent neighbour entries for the reals, the
frame "received" on l0 (xdp_md.ingress_ifindex), so bpf_fib_lookup answers from a FIB we control. The
process is pinned to one CPU: the cache is per CPU, and exact lookup counts need every run on one.
Run under the kernel lock (it creates a namespace).
"""

import ctypes
import ipaddress
import os
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfnet.ebpf.program import XDP_MD
from bpfnet.lb.config import LbState
from bpfnet.lb.dataplane import Addr, Dataplane, NextHop, lb_spec
from bpfnet.netns import Topology, inside

pytestmark = pytest.mark.root

XDP_TX = 3
GATEWAY = "00:00:de:ad:be:af"
REAL = "10.0.0.1"
REAL_MAC, NEW_REAL_MAC = "02:00:00:00:0a:01", "02:00:00:00:0a:99"
NO_NEIGH_REAL = "10.0.0.7"  # on l0's subnet, no neighbour entry: the FIB answers NO_NEIGH
TTL_NS = 60 * 10**9
CLOCK_MONOTONIC_COARSE = 6  # bpf_ktime_get_coarse_ns()'s clock (not in Python's time module)


def state(real: str = REAL) -> LbState:
    return LbState.model_validate({
        "settings": {"use_fib": True, "gateway_mac": GATEWAY, "max_vips": 2, "max_reals": 8,
                     "conn_table_size": 1024},
        "vips": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp", "reals": [{"address": real}]}]})


FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="192.168.1.1", dst="10.200.1.1") / TCP(sport=31337, dport=80, flags="A") / Raw(b"x" * 10))


@pytest.fixture(scope="module")
def segment():
    """Namespace lp-nh with veth l0 (10.0.0.254/24, forwarding on) and a neighbour entry for REAL."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        with Topology("lp") as topo:
            ns = topo.netns("nh")
            topo.veth("l0", "p0", ns=ns, peer_ns=ns)
            topo.addr("l0", "10.0.0.254/24", ns=ns)
            topo.forwarding(True, ns=ns)
            topo.neigh("l0", REAL, REAL_MAC, ns=ns)
            yield topo, ns
    finally:
        os.sched_setaffinity(0, cpus)


class FibLb:
    def __init__(self, segment, state: LbState):
        self.topo, self.ns = segment
        spec = lb_spec(state.settings)
        spec.constants["nexthop_ttl_ns"] = TTL_NS
        self.obj = spec.load()
        self.dataplane = Dataplane(self.obj, state.settings)
        self.dataplane.apply(state)
        self.ifindex = self.topo.ifindex("l0", ns=self.ns)
        self.lb_mac = self.topo.mac("l0", ns=self.ns)
        self.real_id = next(iter(self.dataplane.tables.reals))

    def run(self) -> tuple[int, bytes]:
        with inside(self.ns):
            result = self.obj.programs["xdp_lb"].test_run(FRAME, ctx=XDP_MD.pack(0, len(FRAME), 0, self.ifindex, 0, 0))
        return result.retval, result.data

    def count(self, name: str) -> int:
        return self.dataplane.counters()[name]["packets"]

    def entries(self) -> list[NextHop]:
        return [NextHop.from_buffer_copy(v) for v in self.obj.maps["nexthops"].lookup(self._key())]

    def write_entry(self, entry: NextHop) -> None:
        """The same entry on every CPU."""
        self.obj.maps["nexthops"].update(self._key(), [bytes(entry)] * len(self.entries()))

    def _key(self) -> bytes:
        return self.real_id.to_bytes(4, "little")


@pytest.fixture
def fib_lb(segment):
    loaded = FibLb(segment, state())
    yield loaded
    loaded.obj.close()


def macs(frame: bytes) -> tuple[str, str]:
    return Ether(frame[:14]).dst, Ether(frame[:14]).src


def coarse_now() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def entry(real: str, mac: str, stamp_ns: int, ifindex: int) -> NextHop:
    return NextHop(real=Addr.of(ipaddress.ip_address(real)), in_ifindex=ifindex, stamp_ns=stamp_ns,
                   out_ifindex=ifindex, dmac=(ctypes.c_uint8 * 6)(*bytes.fromhex(mac.replace(":", ""))),
                   smac=(ctypes.c_uint8 * 6)(*bytes(6)))


def test_miss_looks_up_then_hits_the_cache(fib_lb):
    verdict, first = fib_lb.run()
    assert verdict == XDP_TX and macs(first) == (REAL_MAC, fib_lb.lb_mac)
    assert Ether(first)[IP].dst == REAL
    cached = [e for e in fib_lb.entries() if e.stamp_ns]
    assert len(cached) == 1 and cached[0].real.address().compressed == REAL
    assert (cached[0].in_ifindex, cached[0].out_ifindex) == (fib_lb.ifindex, fib_lb.ifindex)
    for _ in range(4):
        assert fib_lb.run() == (XDP_TX, first)  # byte for byte the same frame, from the cache
    assert (fib_lb.count("fib_lookup"), fib_lb.count("fib_ok"), fib_lb.count("fib_fallback")) == (1, 5, 0)


def test_fresh_entry_is_used_without_a_lookup(fib_lb):
    fib_lb.write_entry(entry(REAL, "02:00:00:00:0c:0c", coarse_now(), fib_lb.ifindex))
    verdict, frame = fib_lb.run()
    assert verdict == XDP_TX and macs(frame) == ("02:00:00:00:0c:0c", "00:00:00:00:00:00")
    assert (fib_lb.count("fib_lookup"), fib_lb.count("fib_ok")) == (0, 1)


@pytest.mark.parametrize("why", ["stale", "other address", "other ingress"])
def test_unusable_entry_is_looked_up_again_and_replaced(fib_lb, why):
    stamp = coarse_now() - 2 * TTL_NS if why == "stale" else coarse_now()
    real = "10.0.0.2" if why == "other address" else REAL  # a real id reused for another address
    ifindex = fib_lb.ifindex + 1000 if why == "other ingress" else fib_lb.ifindex
    fib_lb.write_entry(entry(real, "02:00:00:00:0c:0c", stamp, ifindex))
    verdict, frame = fib_lb.run()
    assert verdict == XDP_TX and macs(frame) == (REAL_MAC, fib_lb.lb_mac)
    assert (fib_lb.count("fib_lookup"), fib_lb.count("fib_ok")) == (1, 1)
    refreshed = [e for e in fib_lb.entries() if bytes(e.dmac) == bytes.fromhex(REAL_MAC.replace(":", ""))]
    assert len(refreshed) == 1 and refreshed[0].stamp_ns > stamp - 1
    assert refreshed[0].real.address().compressed == REAL and refreshed[0].in_ifindex == fib_lb.ifindex


def test_changed_next_hop_is_picked_up_when_the_entry_ages_out(fib_lb):
    topo, ns = fib_lb.topo, fib_lb.ns
    try:
        assert macs(fib_lb.run()[1])[0] == REAL_MAC
        topo.neigh("l0", REAL, NEW_REAL_MAC, ns=ns)
        assert macs(fib_lb.run()[1])[0] == REAL_MAC  # within the validity: the cached answer
        for cpu_entry in fib_lb.entries():
            if cpu_entry.stamp_ns:
                aged = NextHop.from_buffer_copy(bytes(cpu_entry))
                aged.stamp_ns = coarse_now() - 2 * TTL_NS
                fib_lb.write_entry(aged)
        assert macs(fib_lb.run()[1]) == (NEW_REAL_MAC, fib_lb.lb_mac)
        assert macs(fib_lb.run()[1])[0] == NEW_REAL_MAC
        assert (fib_lb.count("fib_lookup"), fib_lb.count("fib_ok")) == (2, 4)
    finally:
        topo.neigh("l0", REAL, REAL_MAC, ns=ns)


def test_failed_lookup_falls_back_and_caches_nothing(segment):
    loaded = FibLb(segment, state(NO_NEIGH_REAL))
    try:
        for _ in range(3):
            verdict, frame = loaded.run()
            assert verdict == XDP_TX and macs(frame)[0] == GATEWAY
        assert all(e.stamp_ns == 0 for e in loaded.entries())
        assert (loaded.count("fib_lookup"), loaded.count("fib_ok"), loaded.count("fib_fallback")) == (3, 0, 3)
    finally:
        loaded.obj.close()
