"""Services: connection setup rate through bpfnet's socket load balancer (connect() rewritten by a
cgroup hook) against an iptables DNAT service (the kube-proxy way), same backends, same client;
and how many flow events a second the agent's Python side decodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

from bpfnet.bench.harness import Scenario
from bpfnet.ebpf import cgroup2_root
from bpfnet.netns import Topology
from bpfnet.podnet.flows import FlowEvent, FlowRing, decode
from bpfnet.podnet.servicelb import Backend, ServiceEntry, SocketLoadBalancer

BACKENDS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
SOCKET_VIP, DNAT_VIP = "10.96.0.10", "10.96.0.11"
SERVER = textwrap.dedent("""
    import socket, sys, threading
    def serve(address):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, 8080)); s.listen(4096)
        while True:
            conn, _ = s.accept(); conn.close()
    for address in sys.argv[1:]:
        threading.Thread(target=serve, args=(address,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")
CLIENT = textwrap.dedent("""
    import socket, sys, time
    vip, count = sys.argv[1], int(sys.argv[2])
    start = time.perf_counter()
    for _ in range(count):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")
        s.connect((vip, 80)); s.close()
    print(time.perf_counter() - start)
""")


class ServicesBench:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.ns = topology.netns("svc")
        topology.popen(self.ns, [sys.executable, "-c", SERVER, *BACKENDS], stdout=subprocess.PIPE,
                       text=True).stdout.readline()
        self.group = cgroup2_root() / f"bpfnet-bench-{uuid.uuid4().hex[:6]}"
        self.group.mkdir()
        self.lb = SocketLoadBalancer()
        self.lb.attach(self.group)
        self.lb.apply([ServiceEntry(1, SOCKET_VIP, 80, "tcp", tuple(Backend(a, 8080) for a in BACKENDS))])
        # the service range must be routable for the DNAT path (the socket LB rewrites before routing)
        topology.route("10.96.0.0/16", ns=self.ns, dev="lo")
        topology.sysctl("net.ipv4.conf.all.route_localnet", 1, ns=self.ns)
        topology.sysctl("net.ipv4.conf.lo.route_localnet", 1, ns=self.ns)
        # kube-proxy's iptables mode: DNAT in nat OUTPUT, one backend picked at random per connection
        rules = [["-A", "OUTPUT", "-d", DNAT_VIP, "-p", "tcp", "--dport", "80", "-m", "statistic", "--mode",
                  "random", "--probability", f"{1 / (len(BACKENDS) - i):.5f}", "-j", "DNAT", "--to-destination",
                  f"{address}:8080"] for i, address in enumerate(BACKENDS)]
        for rule in rules:
            topology.run(self.ns, ["iptables", "-t", "nat", *rule])

    def rate(self, vip: str, count: int, in_cgroup: bool) -> float:
        """New TCP connections a second from one client process."""
        def enter() -> None:
            if in_cgroup:
                (self.group / "cgroup.procs").write_text(str(os.getpid()))
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", CLIENT, vip, str(count)],
                             capture_output=True, text=True, timeout=300, preexec_fn=enter, check=True)
        return count / float(out.stdout)

    def close(self) -> None:
        self.lb.close()
        self.group.rmdir()


def flow_decode_rate(events: int = 50_000) -> float:
    """Flow events a second the agent's Python side decodes into its ring (one core)."""
    event = FlowEvent(time_ns=1, family=4, protocol=6, verdict=1, packets=1, bytes=60,
                      src_port=socket.htons(40000), dst_port=socket.htons(80))
    event.src_addr[:4] = list(socket.inet_aton("10.1.0.5"))
    event.dst_addr[:4] = list(socket.inet_aton("10.2.0.7"))
    raw = bytes(event)
    ring = FlowRing(8192)
    start = time.perf_counter()
    for _ in range(events):
        ring.add(decode(raw, "n1", 0.0))
    return events / (time.perf_counter() - start) / 1e6


def scenarios(bench: ServicesBench, connections: int) -> list[Scenario]:
    return [
        Scenario("iptables DNAT service (kube-proxy)", lambda: bench.rate(DNAT_VIP, connections, False) / 1e3,
                 unit="k conn/s", note="reference: nat OUTPUT, random backend"),
        Scenario("bpfnet socket LB", lambda: bench.rate(SOCKET_VIP, connections, True) / 1e3,
                 unit="k conn/s", note="connect() rewritten by a cgroup hook"),
    ]

