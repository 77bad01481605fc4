"""The lab's load-balancing site, in network namespaces on one bridge:

    client 10.100.0.10 ─┐                         ┌─ real r1 10.100.0.11 (VIP on lo, decap XDP)
    attacker 10.100.0.66┼── br0 (namespace sw) ───┼─ real r2 10.100.0.12
    lb 10.100.0.2 ──────┘   (ddos + lb in XDP)    └─ real r3 10.100.0.13

The client reaches the VIP through the LB, which encapsulates to a real; the real decapsulates
in XDP and answers the client directly (direct server return).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.ebpf import Object, ObjectSpec
from bpfnet.netns import Topology, inside

SUBNET = "10.100.0"
VIP = "10.100.100.1"
VIP_PORT = 80
REALS = {"r1": f"{SUBNET}.11", "r2": f"{SUBNET}.12", "r3": f"{SUBNET}.13"}
HOSTS = {"client": f"{SUBNET}.10", "attacker": f"{SUBNET}.66", "lb": f"{SUBNET}.2", **REALS}


@dataclass
class Site:
    topology: Topology
    namespaces: dict[str, str] = field(default_factory=dict)  # role -> namespace
    objects: list[Object] = field(default_factory=list)
    links: list = field(default_factory=list)

    def ns(self, role: str) -> str:
        return self.namespaces[role]

    def mac(self, role: str) -> str:
        return self.topology.mac("eth0", ns=self.ns(role))

    def close(self) -> None:
        for link in self.links:
            link.close()
        for obj in self.objects:
            obj.close()


def build(topology: Topology) -> Site:
    site = Site(topology)
    switch = topology.netns("sw")
    topology.bridge("br0", ns=switch)
    sink = ObjectSpec.builtin("bench_sink").load()
    decap = ObjectSpec.builtin("decap").load()
    site.objects += [sink, decap]
    for role, address in HOSTS.items():
        ns = site.namespaces[role] = topology.netns(role)
        port = f"{role}_p"
        topology.veth("eth0", port, ns=ns, peer_ns=switch)
        topology.set_master(port, "br0", ns=switch)
        topology.addr("eth0", f"{address}/24", ns=ns)
        if role in ("lb", "attacker"):
            # frames sent with XDP_TX (the LB's, the traffic generator's) reach the bridge only if
            # its port runs XDP too
            with inside(switch):
                site.links.append(sink.programs["xdp_pass"].attach_xdp(topology.ifindex(port, ns=switch)))
        if role == "lb":
            topology.forwarding(True, ns=ns)  # bpf_fib_lookup answers only where forwarding is on
        elif role in REALS:
            topology.addr("lo", f"{VIP}/32", ns=ns)
            topology.rp_filter(0, ns=ns)
            topology.rp_filter(0, ns=ns, ifname="eth0")
            topology.sysctl("net.ipv4.conf.all.arp_ignore", 1, ns=ns)  # the VIP is not theirs to announce
            topology.sysctl("net.ipv4.conf.all.arp_announce", 2, ns=ns)
            with inside(ns):
                site.links.append(decap.programs["xdp_decap"].attach_xdp(topology.ifindex("eth0", ns=ns)))
            server = topology.popen(ns, [sys.executable, "-m", "bpfnet.lab.server", role, f"{VIP_PORT}/tcp",
                                         f"{VIP_PORT}/udp"], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            server.stdout.readline()
    # the LB's FIB lookups need resolved neighbours: a router on a real network would have ARPed
    for role in REALS:
        topology.neigh("eth0", HOSTS[role], site.mac(role), ns=site.ns("lb"))
    # the client and the attacker reach the VIP through the LB
    for role in ("client", "attacker"):
        topology.route(f"{VIP}/32", ns=site.ns(role), via=HOSTS["lb"])
    # TCP through XDP on veth: the sender must fill in checksums itself
    topology.features("eth0", ns=site.ns("client"), tx_checksum=False)
    return site


def request_shares(site: Site, connections: int, protocol: str = "tcp", timeout: float = 2.0) -> Counter:
    """Which real answered each of `connections` new TCP connections (or UDP exchanges) from the
    client to the VIP; failures are counted under "failed"."""
    shares: Counter = Counter()
    with inside(site.ns("client")):
        for _ in range(connections):
            kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.settimeout(timeout)
                try:
                    if protocol == "tcp":
                        sock.connect((VIP, VIP_PORT))
                        shares[sock.recv(64).decode().strip()] += 1
                    else:
                        sock.sendto(b"hello", (VIP, VIP_PORT))
                        data, peer = sock.recvfrom(64)
                        shares[data.decode().strip() if peer[0] == VIP else "wrong source"] += 1
                except OSError:
                    shares["failed"] += 1
    return shares


def attack_frame(site: Site, source_port: int = 53, length: int = 512) -> bytes:
    """A UDP reflection frame from the attacker to the VIP (the generator varies the source)."""
    return bytes(Ether(src=site.mac("attacker"), dst=site.mac("lb"))
                 / IP(src="203.0.113.1", dst=VIP, ttl=57) / UDP(sport=source_port, dport=VIP_PORT)
                 / (b"\x00" * (length - 42)))
