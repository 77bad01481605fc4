"""`bpfnet bench policy`: what the pod network's policy costs as rules grow.

1. Per packet, BPF_PROG_TEST_RUN: pod_from_container on a new flow's first packet (measured on a
   packet no rule allows, so every repetition does the full work: two conntrack misses, the
   ipcache and three policy lookups) and on an established flow, with 10 to 10,000 rules.
2. Live traffic from a pod: the traffic generator sends UDP from the pod's address, one new
   flow after another, into the host veth carrying pod_from_container; the pod's egress policy
   holds N rules and the traffic matches the last one. The same rules as iptables (filter INPUT)
   and nftables (inet filter input) rules, one rule per port, in the same run. Reported as the
   rate and the host side's CPU time per packet (bench.receiver).
3. Time from `apply` of 1,000 policies to enforcement (the call returns once the maps hold them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.bench.baseline import Bench
from bpfnet.bench.harness import Sample, Scenario
from bpfnet.bench.trafficgen import Flows
from bpfnet.netns import Topology, inside
from bpfnet.podnet.config import Namespace, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import EndpointLink, NodeDataplane, Outcome, desired_maps, mac_bytes
from bpfnet.podnet.policy import Direction, compile_policy
from bpfnet.testing.conformance import policy

RULE_COUNTS = (10, 100, 1000, 10000)
FIRST_PORT = 10000           # rules allow FIRST_PORT.. ; the traffic's port comes last
TRAFFIC_PORT = 9
POD = "198.51.100.2"         # the generator's source: a pod on the sink's veth
SINK = "192.0.2.2"
LO = 1
CHUNK = 10_000               # frames per generator call


def _ports(count: int) -> list[int]:
    return [FIRST_PORT + i for i in range(count - 1)] + [TRAFFIC_PORT]


def _state(count: int, pod_address: str, cidr: str, peer_address: str | None = None) -> PodnetState:
    """Pod x/a whose egress allows UDP to `count` ports (the traffic's last), and maybe a peer."""
    pods = [Pod(namespace="x", name="a", labels={"pod": "a"}, node="n1", address=pod_address)]
    if peer_address:
        pods.append(Pod(namespace="x", name="b", labels={"pod": "b"}, node="n1", address=peer_address))
    rule = {"ports": [{"port": p, "protocol": "UDP"} for p in _ports(count)]}
    return PodnetState(nodes=[Node(name="n1", pod_cidr=cidr)], namespaces=[Namespace(name="x")],
                       pods=pods, policies=[policy("p", "x", {"matchLabels": {"pod": "a"}},
                                                   egress=[rule], types=["Egress"])])


# --- 1. test_run ---------------------------------------------------------------------------------

class TestRunBench:
    def __init__(self, counts=RULE_COUNTS, repeat: int = 200_000):
        self.repeat = repeat
        self.dataplanes: dict[int, NodeDataplane] = {}
        links = {"x/a": EndpointLink(LO, mac_bytes("02:00:00:00:00:01"), mac_bytes("02:ff:00:00:00:01")),
                 "x/b": EndpointLink(LO + 1000, mac_bytes("02:00:00:00:00:02"), mac_bytes("02:ff:00:00:00:02"))}
        for count in counts:
            dp = NodeDataplane.load(max_entries={"pod_policy": max(2 * count + 16, 1024)})
            dp.sync(desired_maps(compile_policy(_state(count, "10.0.0.2", "10.0.0.0/24", "10.0.0.3")), "n1", links))
            self.dataplanes[count] = dp

    def frame(self, dst: str, dport: int) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:ff:00:00:00:01") / IP(src="10.0.0.2", dst=dst)
                     / UDP(sport=4000, dport=dport) / (b"x" * 18))

    def new_flow(self, count: int) -> float:
        """ns per packet of a new flow's full evaluation (to the peer pod on a port no rule allows)."""
        dp = self.dataplanes[count]
        run = dp.from_container.test_run(self.frame("10.0.0.3", 81), repeat=self.repeat)
        assert run.retval == 2, "expected a policy drop"
        return run.duration_ns

    def established(self, count: int) -> float:
        """ns per packet of an established flow (to the world on the allowed port)."""
        dp = self.dataplanes[count]
        frame = self.frame("203.0.113.9", TRAFFIC_PORT)
        assert dp.from_container.test_run(frame).retval == 0
        return dp.from_container.test_run(frame, repeat=self.repeat).duration_ns

    def close(self) -> None:
        for dp in self.dataplanes.values():
            dp.close()


def test_run_scenarios(bench: TestRunBench) -> list[Scenario]:
    def each(fn: Callable[[int], float], count: int) -> Callable[[], float]:
        return lambda: fn(count)
    result = []
    for count in sorted(bench.dataplanes):
        result.append(Scenario(f"new flow, {count} rules", each(bench.new_flow, count), unit="ns/pkt",
                               note="reference" if count == min(bench.dataplanes) else ""))
    for count in sorted(bench.dataplanes):
        result.append(Scenario(f"established flow, {count} rules", each(bench.established, count),
                               unit="ns/pkt"))
    return result


# --- 2. live traffic -----------------------------------------------------------------------------

def iptables_rules(count: int) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":PODNET - [0:0]", "-A INPUT -i s0 -j PODNET"]
    lines += [f"-A PODNET -s {POD}/32 -p udp --dport {port} -j ACCEPT" for port in _ports(count)]
    lines += ["-A PODNET -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def nft_rules(count: int) -> str:
    rules = [f"        iifname \"s0\" ip saddr {POD} udp dport {port}"
             + (" counter" if port == TRAFFIC_PORT else "") + " accept" for port in _ports(count)]
    return ("table inet podnet {\n    chain input {\n        type filter hook input priority 0;\n"
            + "\n".join(rules) + "\n        iifname \"s0\" drop\n    }\n}\n")


class LiveBench:
    """bench.baseline's gen -> sink veth; s0 is the host side of a pod whose address is POD.
    The generator cycles through more flows than the conntrack table holds, so nearly every
    packet is a new flow that bpfnet evaluates against the policy, as iptables/nftables do."""

    def __init__(self, topology: Topology, counts=RULE_COUNTS, flows: int = 60000,
                 conntrack_entries: int = 1024, backend: str | None = None):
        self.base = Bench(topology, backend)
        self.topology = topology
        template = bytes(Ether(src=topology.mac("g0", ns=self.base.gen), dst=topology.mac("s0", ns=self.base.sink))
                         / IP(src=POD, dst=SINK, ttl=64) / UDP(sport=1024, dport=TRAFFIC_PORT) / (b"x" * 18))
        self.generator = self.base.traffic(Flows(first_address=POD, addresses=1, ports=flows), template)
        links = {"x/a": EndpointLink(self.base.s0, mac_bytes(topology.mac("g0", ns=self.base.gen)),
                                     mac_bytes(topology.mac("s0", ns=self.base.sink)))}
        self.dataplanes: dict[int, NodeDataplane] = {}
        for count in counts:
            dp = NodeDataplane.load(max_entries={"pod_policy": max(2 * count + 16, 1024),
                                                 "pod_conntrack": conntrack_entries})
            dp.sync(desired_maps(compile_policy(_state(count, POD, "198.51.100.0/24")), "n1", links))
            self.dataplanes[count] = dp

    def rate(self, frames: int, counter: Callable[[], int], seconds: float = 2.0) -> Sample:
        """Mpps the policy let through while the generator sent up to `frames` frames, in chunks,
        stopping after `seconds` (10,000 linear rules are slow enough to need it), and the host
        side's CPU time per packet let through."""
        cpu = self.base.cpu
        cpu.pin_sender()
        before, cpu_before, start, sent = counter(), cpu.read(), time.perf_counter(), 0
        with inside(self.base.gen):
            while sent < frames and time.perf_counter() - start < seconds:
                chunk = min(CHUNK, frames - sent)
                self.generator.send(self.base.g0, chunk)
                sent += chunk
        elapsed = time.perf_counter() - start
        time.sleep(0.02)  # the receiver finishes the last frames
        packets = counter() - before
        if packets <= 0:
            raise RuntimeError(f"the policy let none of {sent:,} frames through")
        return Sample(packets / elapsed / 1e6, (cpu.read() - cpu_before) / packets)

    def bpfnet(self, count: int, frames: int) -> Sample:
        dp = self.dataplanes[count]

        def passed() -> int:
            return dp.counters().get((Outcome.TO_STACK, Direction.EGRESS), (0, 0))[0]
        with inside(self.base.sink), dp.from_container.attach_tcx(self.base.s0, "ingress"):
            return self.rate(frames, passed)

    def iptables(self, count: int, frames: int) -> Sample:
        sink = self.base.sink
        self.topology.run(sink, ["iptables-restore"], input=iptables_rules(count))
        try:
            return self.rate(frames, lambda: self._iptables_hits(sink))
        finally:
            self.topology.run(sink, ["iptables-restore"], input="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")

    def _iptables_hits(self, ns: str) -> int:
        out = self.topology.run(ns, ["iptables", "-L", "PODNET", "-v", "-x", "-n"]).stdout.splitlines()
        return int(out[-2].split()[0])  # the last ACCEPT rule: the traffic's port

    def nftables(self, count: int, frames: int) -> Sample:
        sink = self.base.sink
        self.topology.run(sink, ["nft", "-f", "-"], input=nft_rules(count))
        try:
            return self.rate(frames, lambda: self._nft_hits(sink))
        finally:
            self.topology.run(sink, ["nft", "delete", "table", "inet", "podnet"])

    def _nft_hits(self, ns: str) -> int:
        out = self.topology.run(ns, ["nft", "list", "chain", "inet", "podnet", "input"]).stdout
        line = next(ln for ln in out.splitlines() if f"dport {TRAFFIC_PORT} counter" in ln)
        return int(line.split("packets ")[1].split()[0])

    def close(self) -> None:
        for dp in self.dataplanes.values():
            dp.close()
        self.base.close()


def live_scenarios(bench: LiveBench, frames: int) -> list[Scenario]:
    def each(fn: Callable[[int, int], Sample], count: int) -> Callable[[], Sample]:
        return lambda: fn(count, frames)
    result = []
    for count in sorted(bench.dataplanes):
        result.append(Scenario(f"bpfnet tc, {count} rules", each(bench.bpfnet, count),
                               note="reference" if count == min(bench.dataplanes) else ""))
        result.append(Scenario(f"iptables INPUT, {count} rules", each(bench.iptables, count)))
        result.append(Scenario(f"nftables input, {count} rules", each(bench.nftables, count)))
    return result


# --- 3. apply to enforcement -------------------------------------------------------------------------

def apply_to_enforcement(policies: int = 1000) -> float:
    """Seconds to compile and write `policies` policies (each pod x/a ingress on its own port)."""
    links = {"x/a": EndpointLink(LO, mac_bytes("02:00:00:00:00:01"), mac_bytes("02:ff:00:00:00:01")),
             "x/b": EndpointLink(LO + 1000, mac_bytes("02:00:00:00:00:02"), mac_bytes("02:ff:00:00:00:02"))}
    base = _state(1, "10.0.0.2", "10.0.0.0/24", "10.0.0.3")
    state = base.model_copy(update={"policies": [
        policy(f"p{i}", "x", {"matchLabels": {"pod": "a"}},
               ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": FIRST_PORT + i}]}]) for i in range(policies)]})
    dp = NodeDataplane.load(max_entries={"pod_policy": 4 * policies})
    try:
        dp.sync(desired_maps(compile_policy(base), "n1", links))
        start = time.perf_counter()
        dp.sync(desired_maps(compile_policy(state), "n1", links))
        elapsed = time.perf_counter() - start
        last = IPv4Address("10.0.0.2")
        assert any(e.endpoint == last and e.port == FIRST_PORT + policies - 1 for e in dp.policy_hits())
        return elapsed
    finally:
        dp.close()
