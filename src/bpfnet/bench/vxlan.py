"""Pod to pod over VXLAN: TCP throughput (iperf3, one stream) and request/response rate (one
connection, 1-byte messages, a netperf TCP_RR-like loop) from a client pod on one node to a server
pod on another, in one run with interleaved rounds:

- plain kernel VXLAN, no BPF at all: the same shape (pod veth, node routing, VXLAN device over an
  underlay veth into a fabric bridge, and back) with classic routes and a point-to-point VXLAN
  device, Flannel's way. The ceiling.
- bpfnet: two nodes built by the pod network's controller (the agent's own code, in process with
  a private pin root): tc programs on the pods' veths, the sender's identity in the VNI, the
  receiving node's pod_from_overlay on its VXLAN device. A server pod no policy selects, and server
  pods whose ingress policy allows the client by label and port among N rules in all (the others
  allow /32 address blocks on their own ports, so each is a real policy map and ipcache entry).

Both rigs use the same MTUs: 1500 in the pods, 9000 on the underlay (the 50 bytes of VXLAN fit
around full-size pod packets, so nothing fragments), default offloads (the pods' veths hand
partial checksums to the stack; VXLAN's outer UDP checksum is zero on both paths).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass

from bpfnet.bench.harness import Scenario
from bpfnet.ebpf import pins
from bpfnet.errors import BpfnetError
from bpfnet.netns import Topology, TopologyError, cleanup, popen, run
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import Namespace, NetworkPolicy, Node, Pod, PodnetState, Underlay
from bpfnet.podnet.controller import PodnetController
from bpfnet.testing.conformance import policy

IPERF_PORT = 5201
RR_PORT = 5202
POLICY_RULES = (100, 1000)
POD_MTU = 1500
UNDERLAY_MTU = podnet_pods.UNDERLAY_MTU   # the same underlay as bpfnet's nodes
VXLAN_PORT = podnet_pods.VXLAN_PORT
NAMESPACE = "bench"
SERVING = (IPERF_PORT, RR_PORT)

RR_SERVER = textwrap.dedent("""
    import socket, sys, threading
    def echo(conn):
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
    while True:
        conn, _ = s.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
""")
RR_CLIENT = textwrap.dedent("""
    import socket, sys, time
    address, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.create_connection((address, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            s.sendall(b"x")
            if not s.recv(1):
                sys.exit("server closed the connection")
        done += 100
    print(done, elapsed)
""")


class VxlanBenchError(BpfnetError, RuntimeError):
    """The rig could not be built or a measurement failed; the message says which path and why."""


@dataclass(frozen=True)
class PodPath:
    """One client -> server path to measure: where each end runs and what proves the path was used."""

    name: str
    client_ns: str
    server_ns: str
    server_address: str
    arrived: Callable[[], int]   # packets for the server counted where this path delivers them


# --- plain kernel VXLAN --------------------------------------------------------------------------

class PlainVxlan:
    """client pod -> node 1 -> vx0 (VXLAN 1, remote node 2) -> underlay -> fabric bridge -> node 2
    -> server pod, routed by the kernel; no BPF program anywhere."""

    def __init__(self, topology: Topology) -> None:
        t = topology
        fabric = t.netns("plain.fabric")
        t.bridge("br0", ns=fabric)
        t.sysctl("net.ipv6.conf.all.disable_ipv6", 1, ns=fabric)
        self.nodes, self.pods = {}, {}
        for i, pod, peer in ((1, "client", 2), (2, "server", 1)):
            node = self.nodes[i] = t.netns(f"plain.n{i}")
            ns = self.pods[pod] = t.netns(f"plain.{pod}")
            t.forwarding(ns=node)
            t.veth("eth0", "lxc0", ns=ns, peer_ns=node, mtu=POD_MTU)
            t.addr("eth0", f"10.210.{i}.2/24", ns=ns)
            t.addr("lxc0", f"10.210.{i}.1/24", ns=node)
            t.route("default", via=f"10.210.{i}.1", ns=ns)
            t.veth("underlay0", f"ul{i}", ns=node, peer_ns=fabric, mtu=UNDERLAY_MTU)
            t.set_master(f"ul{i}", "br0", ns=fabric)
            t.addr("underlay0", f"192.168.210.{i}/24", ns=node)
            t.run(node, ["ip", "link", "add", "vx0", "mtu", str(POD_MTU), "type", "vxlan", "id", "1",
                         "local", f"192.168.210.{i}", "remote", f"192.168.210.{peer}",
                         "dstport", str(VXLAN_PORT), "dev", "underlay0", "nolearning",
                         "noudpcsum"])  # as bpfnet's tunnel key asks (BPF_F_ZERO_CSUM_TX)
            t.up("vx0", ns=node)
            t.addr("vx0", f"10.210.255.{i}/30", ns=node)
            t.route(f"10.210.{peer}.0/24", via=f"10.210.255.{peer}", ns=node)
        self.path = PodPath("plain VXLAN", self.pods["client"], self.pods["server"], "10.210.2.2",
                            lambda: _rx_packets(self.nodes[2], "vx0"))


def _rx_packets(ns: str, ifname: str) -> int:
    link = json.loads(run(ns, ["ip", "-json", "-statistics", "link", "show", ifname]).stdout)[0]
    return link["stats64"]["rx"]["packets"]


# --- bpfnet ----------------------------------------------------------------------------------------

def guard_policy(rules: int) -> NetworkPolicy:
    """Ingress of pod guarded-N: the client by label on the measured ports, and N - 1 other rules."""
    allowed = [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"port": port} for port in SERVING]}]
    others = [{"from": [{"ipBlock": {"cidr": f"172.16.{i // 256}.{i % 256}/32"}}],
               "ports": [{"port": 10000 + i}]} for i in range(rules - 1)]
    return policy(f"guard-{rules}", NAMESPACE, {"matchLabels": {"app": f"guarded-{rules}"}},
                  ingress=allowed + others)


def podnet_state(prefix: str, rules: tuple[int, ...] = POLICY_RULES) -> PodnetState:
    nodes = [Node(name=f"n{i}", pod_cidr=f"10.211.{i}.0/24", netns=f"{prefix}-n{i}") for i in (1, 2)]
    servers = ["server"] + [f"guarded-{n}" for n in rules]
    pods = [Pod(namespace=NAMESPACE, name="client", labels={"app": "client"}, node="n1")]
    pods += [Pod(namespace=NAMESPACE, name=name, labels={"app": name}, node="n2") for name in servers]
    return PodnetState(nodes=nodes, namespaces=[Namespace(name=NAMESPACE)], pods=pods,
                       underlay=Underlay(cidr="192.168.211.0/24", fabric_netns=f"{prefix}-fabric"),
                       policies=[guard_policy(n) for n in rules]).with_addresses()


class PodnetVxlan:
    """Two bpfnet nodes with the client pod on n1 and the server pods on n2; their namespaces are
    named `<prefix>-…` (the nodes') and `<prefix>-n1.bench.client` (the pods')."""

    def __init__(self, prefix: str, rules: tuple[int, ...] = POLICY_RULES) -> None:
        self.prefix = prefix
        self.pin_root = pins.pin_dir(f"bench-{prefix}")
        self.controller = PodnetController(self.pin_root)
        try:
            self.controller.start(podnet_state(prefix, rules))
        except BaseException:
            self.close()
            raise
        self.client_ns = self.pod_ns("client")
        self.paths = [self._path("bpfnet", "server")]
        self.paths += [self._path(f"bpfnet, policy of {n} rules", f"guarded-{n}") for n in rules]

    def pod_ns(self, name: str) -> str:
        state = self.controller.state
        pod = state.pod(f"{NAMESPACE}/{name}")
        return podnet_pods.pod_netns(state.node(pod.node), pod)

    def _path(self, title: str, server: str) -> PodPath:
        address = self.controller.state.pod(f"{NAMESPACE}/{server}").address
        return PodPath(title, self.client_ns, self.pod_ns(server), str(address),
                       lambda: self.arrived(str(address)))

    def arrived(self, address: str) -> int:
        """Packets to `address` in n2's conntrack: pod_from_overlay let them in past its policy."""
        return sum(flow["packets_forward"] for flow in self.controller.dataplanes["n2"].flows()
                   if flow["destination"].startswith(f"{address}:"))

    def close(self) -> None:
        try:
            self.controller.stop(detach=True)
        finally:
            # what a start that failed half way made, which the controller's state does not list
            cleanup(self.prefix)
            pins.unpin(self.pin_root)


# --- measuring -------------------------------------------------------------------------------------

class VxlanBench:
    """Both rigs, with iperf3 and the request/response server running in every server pod."""

    def __init__(self, topology: Topology, rules: tuple[int, ...] = POLICY_RULES) -> None:
        if shutil.which("iperf3") is None:
            raise VxlanBenchError("iperf3 is not installed (run scripts/setup.sh)")
        self.servers: list[subprocess.Popen] = []
        self.plain = PlainVxlan(topology)
        self.podnet = None
        try:
            self.podnet = PodnetVxlan(topology.prefix + "pod", rules)
            self.paths = [self.plain.path, *self.podnet.paths]
            for path in self.paths:
                self._serve(path)
            for path in self.paths:
                self._wait_reachable(path)
        except BaseException:
            self.close()
            raise

    def _serve(self, path: PodPath) -> None:
        for argv in (["iperf3", "--server", "--port", str(IPERF_PORT)],
                     [sys.executable, "-c", RR_SERVER, str(RR_PORT)]):
            self.servers.append(popen(path.server_ns, _on_bench_cpu(argv), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _wait_reachable(self, path: PodPath, timeout: float = 10.0) -> None:
        """Both servers listen and the client reaches the request/response one across the path."""
        deadline = time.monotonic() + timeout
        while True:
            listening = run(path.server_ns, ["ss", "-Hltn"]).stdout
            if all(f":{port} " in listening for port in SERVING):
                try:
                    self.transactions(path, 0.05)
                    return
                except TopologyError:
                    pass
            if time.monotonic() > deadline:
                raise VxlanBenchError(f"{path.name}: server {path.server_address} not reachable from "
                                    f"the client after {timeout:.0f} s")
            time.sleep(0.1)

    def throughput(self, path: PodPath, seconds: int) -> float:
        """Gbit/s received by the server of one iperf3 TCP stream (iperf3 counts whole seconds)."""
        argv = ["iperf3", "--client", path.server_address, "--port", str(IPERF_PORT), "--time", str(seconds),
                "--json"]
        out = run(path.client_ns, _on_bench_cpu(argv), check=False, timeout=seconds + 30)
        report = json.loads(out.stdout or "{}")
        if out.returncode != 0 or "error" in report:
            raise VxlanBenchError(f"{path.name}: iperf3 failed: {report.get('error') or out.stderr.strip()}")
        return report["end"]["sum_received"]["bits_per_second"] / 1e9

    def transactions(self, path: PodPath, seconds: float) -> float:
        """Thousands of 1-byte request/response transactions a second over one TCP connection."""
        argv = [sys.executable, "-c", RR_CLIENT, path.server_address, str(RR_PORT), str(seconds)]
        out = run(path.client_ns, _on_bench_cpu(argv), timeout=seconds + 30)
        done, elapsed = out.stdout.split()
        return int(done) / float(elapsed) / 1e3

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()
        self.servers = []
        if self.podnet is not None:
            self.podnet.close()
            self.podnet = None


def _on_bench_cpu(argv: list[str]) -> list[str]:
    """`argv` pinned to the first CPU we may use. Client and server share it, so a result is the
    CPU cost of the whole path (both stacks, the tc programs, encap and decap); on two CPUs the
    wakeups between them dominate the request/response rate and swing it 3x from round to round
    with where the scheduler puts them."""
    return ["taskset", "--cpu-list", str(min(os.sched_getaffinity(0))), *argv]


THROUGHPUT_REFERENCE = "TCP plain VXLAN"
RR_REFERENCE = "RR plain VXLAN"


def scenarios(bench: VxlanBench, seconds: int) -> list[Scenario]:
    """Throughput then request/response rows for each path; the plain VXLAN rows are the references."""
    def each(measure: Callable[[PodPath, int], float], path: PodPath) -> Callable[[], float]:
        return lambda: measure(path, seconds)
    result = [Scenario(f"TCP {p.name}", each(bench.throughput, p), unit="Gbit/s",
                       note="reference (no BPF)" if p is bench.plain.path else "") for p in bench.paths]
    result += [Scenario(f"RR {p.name}", each(bench.transactions, p), unit="k trans/s",
                        note="reference (no BPF)" if p is bench.plain.path else "") for p in bench.paths]
    return result
