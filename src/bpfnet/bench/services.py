"""Services: connection setup through bpfnet's socket load balancer (connect() rewritten by a
cgroup hook) against kube-proxy's two ways, an iptables DNAT chain and nftables with a verdict map,
with the same backends and client, as the number of services grows. (The flow ingest half of
`bench services` is in bench/flow_ingest.py.)"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bpfnet.bench.harness import Scenario
from bpfnet.ebpf import cgroup2_root
from bpfnet.netns import Topology
from bpfnet.podnet.servicelb import Backend, ServiceEntry, SocketLoadBalancer

BACKENDS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
VIP, PORT, TARGET_PORT = "10.96.0.10", 80, 8080
SERVICE_COUNTS = (1, 1000)
MAX_SERVICES = 4096  # sock_lb.bpf.c's per-service counters
PEERS = {"iptables": "kube-proxy iptables DNAT",
         "nftables": "kube-proxy nftables vmap",
         "socket": "bpfnet socket LB"}
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
# Connection setup as kube-proxy's users see it: connect() returns once the handshake is done.
# SO_LINGER 0 closes with a reset, so no TIME_WAIT piles up over thousands of connections.
CLIENT = textwrap.dedent("""
    import json, socket, statistics, sys, time
    vip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    linger = b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
    setup = []
    start = time.perf_counter()
    for _ in range(count):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        began = time.perf_counter(); s.connect((vip, port)); setup.append(time.perf_counter() - began)
        s.close()
    elapsed = time.perf_counter() - start
    setup.sort()
    print(json.dumps({"rate": count / elapsed, "p50_us": 1e6 * setup[len(setup) // 2],
                      "p99_us": 1e6 * setup[int(len(setup) * 0.99)]}))
""")


def service_addresses(count: int) -> list[str]:
    """`count` service addresses; the measured one (VIP) is the last, the worst place in a chain."""
    others = [f"10.97.{i // 256}.{i % 256}" for i in range(count - 1)]
    return [*others, VIP]


def iptables_rules(count: int) -> str:
    """kube-proxy's iptables layout for `count` services (iptables-restore input): one match rule per
    service in KUBE-SERVICES, walked in order for the first packet of every connection, then the
    service's chain picks an endpoint at random."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-SVC - [0:0]",
             *(f":KUBE-SEP-{i} - [0:0]" for i in range(len(BACKENDS))),
             "-A OUTPUT -j KUBE-SERVICES"]
    lines += [f"-A KUBE-SERVICES -d {address}/32 -p tcp --dport {PORT} -j KUBE-SVC"
              for address in service_addresses(count)]
    for i, address in enumerate(BACKENDS):
        left = len(BACKENDS) - i
        pick = [] if left == 1 else ["-m statistic --mode random --probability", f"{1 / left:.5f}"]
        lines.append(" ".join(["-A KUBE-SVC", *pick, f"-j KUBE-SEP-{i}"]))
        lines.append(f"-A KUBE-SEP-{i} -p tcp -j DNAT --to-destination {address}:{TARGET_PORT}")
    return "\n".join([*lines, "COMMIT", ""])


def nftables_rules(count: int) -> str:
    """kube-proxy's nftables layout: one verdict-map lookup on (address, protocol, port) whatever the
    number of services, then a random endpoint."""
    elements = ",\n".join(f"    {address} . tcp . {PORT} : goto service" for address in service_addresses(count))
    endpoints = ", ".join(f"{i} : goto endpoint-{i}" for i in range(len(BACKENDS)))
    chains = "\n".join(f"  chain endpoint-{i} {{\n    meta l4proto tcp dnat to {address}:{TARGET_PORT}\n  }}"
                       for i, address in enumerate(BACKENDS))
    return (f"table ip bpfnet-bench {{\n  map service-ips {{\n"
            f"    type ipv4_addr . inet_proto . inet_service : verdict\n"
            f"    elements = {{\n{elements}\n    }}\n  }}\n"
            f"  chain service {{\n    numgen random mod {len(BACKENDS)} vmap {{ {endpoints} }}\n  }}\n{chains}\n"
            f"  chain nat-output {{\n    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n}}\n")


@dataclass
class Setup:
    """One client run: connections a second and connect() latency percentiles."""

    rate: float
    p50_us: float
    p99_us: float


class ServicesBench:
    """A namespace per (peer, service count), each with the same three backends on loopback, so one
    peer's rules never sit in another's path."""

    def __init__(self, topology: Topology, counts: Sequence[int] = SERVICE_COUNTS) -> None:
        if not counts or any(not 1 <= n <= MAX_SERVICES for n in counts):
            raise ValueError(f"service counts must be 1..{MAX_SERVICES}, got {list(counts)}")
        self.topology = topology
        self.counts = tuple(counts)
        self.namespaces: dict[tuple[str, int], str] = {}
        self.cgroups: dict[int, Path] = {}
        self.lbs: dict[int, SocketLoadBalancer] = {}
        try:
            for count in self.counts:
                for peer in PEERS:
                    self.namespaces[peer, count] = self._backend_namespace(f"{peer[:4]}{count}")
                self._install(count)
        except BaseException:
            self.close()
            raise

    def _backend_namespace(self, name: str) -> str:
        ns = self.topology.netns(name)
        server = self.topology.popen(ns, [sys.executable, "-c", SERVER, *BACKENDS], stdout=subprocess.PIPE,
                                     text=True)
        assert server.stdout is not None
        server.stdout.readline()
        # the service range must be routable for the DNAT paths (the socket LB rewrites before routing)
        self.topology.route("10.96.0.0/12", ns=ns, dev="lo")
        for conf in ("all", "lo"):
            self.topology.sysctl(f"net.ipv4.conf.{conf}.route_localnet", 1, ns=ns)
        return ns

    def _install(self, count: int) -> None:
        self.topology.run(self.namespaces["iptables", count], ["iptables-restore", "--noflush"],
                          input=iptables_rules(count), text=True)
        self.topology.run(self.namespaces["nftables", count], ["nft", "-f", "-"], input=nftables_rules(count),
                          text=True)
        group = cgroup2_root() / f"bpfnet-bench-{uuid.uuid4().hex[:6]}-{count}"
        group.mkdir()
        self.cgroups[count] = group
        lb = self.lbs[count] = SocketLoadBalancer.load()
        lb.attach(group)
        backends = tuple(Backend(address, TARGET_PORT) for address in BACKENDS)
        lb.apply([ServiceEntry(i, address, PORT, "tcp", backends)
                  for i, address in enumerate(service_addresses(count))])

    def connect(self, peer: str, count: int, connections: int) -> Setup:
        """`connections` new TCP connections to the service from one client process."""
        group = self.cgroups[count] if peer == "socket" else None

        def enter() -> None:
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))
        out = subprocess.run(["ip", "netns", "exec", self.namespaces[peer, count], sys.executable, "-c", CLIENT,
                              VIP, str(PORT), str(connections)],
                             capture_output=True, text=True, timeout=300, preexec_fn=enter, check=True)
        return Setup(**json.loads(out.stdout))

    def socket_connects(self, count: int) -> int:
        """Connections the socket LB translated for the measured service (the last one)."""
        return self.lbs[count].counters(count - 1)["connects"]

    def close(self) -> None:
        for lb in self.lbs.values():
            lb.close()
        for group in self.cgroups.values():
            group.rmdir()
        self.lbs.clear()
        self.cgroups.clear()


def _rate(bench: ServicesBench, peer: str, count: int, connections: int) -> float:
    return bench.connect(peer, count, connections).rate / 1e3


def _latency(bench: ServicesBench, peer: str, count: int, connections: int) -> float:
    return bench.connect(peer, count, connections).p50_us


def scenarios(bench: ServicesBench, connections: int) -> tuple[list[Scenario], list[Scenario]]:
    """Connection rate and connect() latency (median) for every peer and service count."""
    rates, latencies = [], []
    for count in bench.counts:
        for peer, label in PEERS.items():
            name = f"{label}, {count} service{'s' if count > 1 else ''}"
            rates.append(Scenario(name, functools.partial(_rate, bench, peer, count, connections),
                                  unit="k conn/s"))
            latencies.append(Scenario(name, functools.partial(_latency, bench, peer, count, connections),
                                      unit="µs", note="lower is better"))
    return rates, latencies


def reference(bench: ServicesBench) -> str:
    return f"{PEERS['iptables']}, {bench.counts[0]} service{'s' if bench.counts[0] > 1 else ''}"
