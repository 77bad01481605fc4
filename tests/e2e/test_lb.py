"""The load balancer end to end: a client, the LB and three reals on one L2 segment (a bridge in its
own namespace). The LB's XDP program encapsulates to the reals, decap.bpf.c on each real strips the
outer header, the real owns the VIP on its loopback and answers the client directly.

Client source ports are fixed, so which real serves which flow is deterministic: the shares are
compared exactly with the Python twin of the data plane's hash (bpfnet.lb.hashing / maglev).
Run with the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_lb.py
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.ebpf import AttachType, Map, MapType, ObjectSpec, Program, ProgType, asm, cgroup2_root, pins
from bpfnet.lb.cli import app as lb_cli
from bpfnet.lb.config import LbState
from bpfnet.lb.controller import LbController
from bpfnet.lb.dataplane import DECAP_COUNTERS, read_counters
from bpfnet.lb.hashing import flow_hash
from bpfnet.lb.maglev import build_ring
from bpfnet.netns import Topology, cleanup, inside, ping

pytestmark = pytest.mark.root

PREFIX = "lb"
CLIENT, LB = "10.10.0.2", "10.10.0.3"
CLIENT6, LB6 = "fd10::2", "fd10::3"
REALS = {"r1": ("10.10.0.11", "fd10::11"), "r2": ("10.10.0.12", "fd10::12"), "r3": ("10.10.0.13", "fd10::13")}
VIP, VIP6, PORT = "10.10.100.1", "fd10:100::1", 80
# A fourth real on a second segment behind the LB's eth1: reached with bpf_redirect, not XDP_TX.
FAR_REAL, FAR_VIP, LB_FAR = "10.20.0.14", "10.10.100.2", "10.20.0.3"

SERVER = r"""
import asyncio, socket, sys
name, vips = sys.argv[1].encode(), sys.argv[2:]

async def handle(reader, writer):
    try:
        first = await reader.readline()
        if first.startswith(b"GET "):
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + name + b"\n")
        else:
            writer.write(name + b"\n")
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

class Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, peer):
        self.transport.sendto(name, peer)

async def main():
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::", 80))
    tcp.listen(4096)
    server = await asyncio.start_server(handle, sock=tcp)
    loop = asyncio.get_running_loop()
    for vip in vips:  # bound to the VIP, so replies leave from it (direct server return)
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((vip, 80))
        await loop.create_datagram_endpoint(Udp, sock=udp)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class Lab:
    """The namespaces, the XDP programs on the reals and the switch, the LB controller."""

    def __init__(self) -> None:
        cleanup(PREFIX)
        self.topo = Topology(PREFIX)
        self.links = []
        self.objects = []
        self.servers: dict[str, object] = {}
        self.pin_root = pins.PIN_ROOT / f"lbe2e-{uuid.uuid4().hex[:8]}"
        self.controller: LbController | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        topo = self.topo
        self.sw = topo.netns("sw")
        topo.bridge("br0", ns=self.sw)
        self.client, self.lb = topo.netns("client"), topo.netns("lb")
        self.reals = {name: topo.netns(name) for name in REALS}
        self.hosts = dict(self.reals)  # every namespace running a server and decap
        hosts = {"client": (self.client, CLIENT, CLIENT6, 1500), "lb": (self.lb, LB, LB6, 1600)}
        hosts.update({name: (ns, *REALS[name], 1600) for name, ns in self.reals.items()})
        for port, (ns, v4, v6, mtu) in hosts.items():
            topo.veth("eth0", port, ns=ns, peer_ns=self.sw, mtu=mtu)
            topo.set_master(port, "br0", ns=self.sw)
            topo.addr("eth0", f"{v4}/24", ns=ns)
            topo.addr("eth0", f"{v6}/64", ns=ns)
            topo.rp_filter(0, ns=ns)
            topo.rp_filter(0, ns=ns, ifname="eth0")
        topo.route("10.10.100.0/24", ns=self.client, via=LB)
        topo.route("fd10:100::/64", ns=self.client, via=LB6)
        topo.features("eth0", ns=self.client, tx_checksum=False)  # XDP forwards what the client sends
        topo.forwarding(True, ns=self.lb)  # bpf_fib_lookup answers only with forwarding on
        for name, ns in self.reals.items():
            mac = topo.mac("eth0", ns=ns)
            for address in REALS[name]:
                topo.neigh("eth0", address, mac, ns=self.lb)
            topo.addr("lo", f"{VIP}/32", ns=ns)
            topo.addr("lo", f"{VIP6}/128", ns=ns)
            self.start_server(name)
        self._build_far_segment()
        # XDP_TX / redirected frames reach the bridge only if the LB's veth peers run XDP too.
        self._attach("bench_sink", "xdp_pass", self.sw, "lb")
        self._attach("bench_sink", "xdp_pass", self.sw, "lb1")
        self.decap_stats = {name: self._attach("decap", "xdp_decap", ns, "eth0").maps["decap_stats"]
                            for name, ns in self.hosts.items()}

    def _build_far_segment(self) -> None:
        topo = self.topo
        far = topo.netns("r4")
        topo.bridge("br1", ns=self.sw)
        topo.veth("eth1", "lb1", ns=self.lb, peer_ns=self.sw, mtu=1600)
        topo.veth("eth0", "r4", ns=far, peer_ns=self.sw, mtu=1600)
        for port in ("lb1", "r4"):
            topo.set_master(port, "br1", ns=self.sw)
        topo.addr("eth1", f"{LB_FAR}/24", ns=self.lb)
        topo.addr("eth0", f"{FAR_REAL}/24", ns=far)
        topo.addr("lo", f"{FAR_VIP}/32", ns=far)
        topo.route("default", ns=far, via=LB_FAR)  # its replies are routed back through the LB host
        for ns, ifname in ((far, "all"), (far, "eth0"), (self.lb, "eth1")):
            topo.rp_filter(0, ns=ns, ifname=ifname)
        topo.neigh("eth1", FAR_REAL, topo.mac("eth0", ns=far), ns=self.lb)
        self.hosts["r4"] = far
        self.start_server("r4")

    def _attach(self, obj_name: str, program: str, ns: str, ifname: str):
        obj = ObjectSpec.builtin(obj_name).load()
        self.objects.append(obj)
        with inside(ns):
            self.links.append(obj.programs[program].attach_xdp(socket.if_nametoindex(ifname)))
        return obj

    def decapsulated(self, kind: str) -> int:
        """Packets the reals' decap programs stripped `kind` (ipip, ip6ip6...) from."""
        return sum(read_counters(stats, DECAP_COUNTERS)[kind]["packets"] for stats in self.decap_stats.values())

    def start_server(self, name: str) -> None:
        vips = [FAR_VIP] if name == "r4" else [VIP, VIP6]
        proc = self.topo.popen(self.hosts[name], [sys.executable, "-c", SERVER, name, *vips],
                               stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        self.servers[name] = proc

    def stop_server(self, name: str) -> None:
        proc = self.servers.pop(name)
        proc.terminate()
        proc.wait(timeout=10)

    def start_lb(self, state: LbState) -> LbController:
        with inside(self.lb):
            self.controller = LbController(self.pin_root)
            self.controller.start(state)
        return self.controller

    def apply(self, state: LbState) -> None:
        with inside(self.lb):
            self.controller.apply(state)

    def tick(self) -> None:
        with inside(self.lb):  # health probes run from the LB's namespace
            self.controller.tick(time.monotonic())

    def close(self) -> None:
        if self.controller is not None:
            with inside(self.lb):
                self.controller.stop(detach=True)
        pins.unpin(self.pin_root)
        pins.remove_empty_parents(self.pin_root.parent)
        for link in self.links:
            link.close()
        for obj in self.objects:
            obj.close()
        self.topo.close()


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    try:
        lab.start_lb(lb_state({"r1": 1, "r2": 2, "r3": 3}))
        yield lab
    finally:
        lab.close()
    cleanup(PREFIX)


def lb_state(weights: dict[str, int], health_check: dict | None = None) -> LbState:
    def vip(address, family, protocol):
        return {"address": address, "port": PORT, "protocol": protocol, "health_check": health_check,
                "reals": [{"address": REALS[name][family], "weight": w} for name, w in weights.items()]}

    far = {"address": FAR_VIP, "port": PORT, "protocol": "tcp", "reals": [{"address": FAR_REAL}]}
    return LbState.model_validate({
        "settings": {"interface": "eth0", "max_vips": 4, "max_reals": 16, "conn_table_size": 65536},
        "vips": [vip(VIP, 0, "tcp"), vip(VIP, 0, "udp"), vip(VIP6, 1, "tcp"), far]})


def predicted(weights: dict[str, int], client: str, ports) -> collections.Counter:
    """Which real each flow goes to, from the Python twin of the hash and the ring."""
    names = list(weights)
    ring = build_ring([(REALS[n][0], w) for n, w in weights.items()])
    return collections.Counter(names[ring[flow_hash(client, port, PORT) % 65537]] for port in ports)


def tcp_exchange(lab: Lab, sport: int, vip=VIP, client=CLIENT) -> tuple[socket.socket, str]:
    """A connection from a fixed source port; returns it (open) and the name of the real serving it."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with inside(lab.client):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5)
    sock.bind((client, sport))
    sock.connect((vip, PORT))
    sock.sendall(b"hello\n")
    return sock, sock.makefile("rb").readline().decode().strip()


def served_counts(lab: Lab, ports, **kw) -> collections.Counter:
    """How many new connections from these source ports each real serves."""
    counts: collections.Counter = collections.Counter()
    for port in ports:
        sock, real = tcp_exchange(lab, port, **kw)
        sock.close()
        counts[real] += 1
    return counts


def served_by(lab: Lab, ports, **kw) -> set[str]:
    """The reals that serve new connections from these source ports."""
    return set(served_counts(lab, ports, **kw))


def udp_exchange(lab: Lab, sport: int, payload: bytes = b"who") -> tuple[str, tuple]:
    """One datagram to the VIP from a fixed port: (the name in the answer, the answer's source)."""
    with inside(lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((CLIENT, sport))
        sock.settimeout(2)
        for _attempt in range(3):  # same 5-tuple each time: a retry cannot change the real
            sock.sendto(payload, (VIP, PORT))
            try:
                data, peer = sock.recvfrom(100)
                return data.decode(), peer
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP answer for source port {sport}")


def test_icmp_echo_to_the_vip_is_answered_by_the_lb(lab):
    assert ping(lab.client, VIP)
    assert ping(lab.client, VIP6)
    assert lab.controller.stats()["packets"]["icmp_echo"] >= 2


def test_tcp_and_udp_spread_by_weight_replies_straight_from_reals(lab):
    weights = {"r1": 1, "r2": 2, "r3": 3}
    lab.apply(lb_state(weights))
    before = lab.controller.stats()["packets"]
    ipip_before = lab.decapsulated("ipip")
    tcp_ports = range(20000, 22000)
    seen = served_counts(lab, tcp_ports)
    assert seen == predicted(weights, CLIENT, tcp_ports)

    udp_ports = range(32768, 34768)
    udp_seen = collections.Counter()
    for port in udp_ports:
        real, peer = udp_exchange(lab, port)
        assert peer == (VIP, PORT)  # the answer comes from the VIP, i.e. from the real itself
        udp_seen[real] += 1
    assert udp_seen == predicted(weights, CLIENT, udp_ports)

    total = sum(weights.values())
    for counts in (seen, udp_seen):
        for name, weight in weights.items():
            assert abs(counts[name] / 2000 - weight / total) <= 0.1 * weight / total
    after = lab.controller.stats()["packets"]
    sent = after["tx"] - before["tx"]
    # Every connection needed at least its SYN and its data, every exchange one datagram; nothing
    # reached a real that the LB did not send.
    assert 2000 * 2 + 2000 <= lab.decapsulated("ipip") - ipip_before <= sent
    # The replies never crossed the LB: it passed only a little unrelated traffic (ARP, ND).
    assert after["pass"] - before["pass"] < 200
    assert after["drop"] == before["drop"]


def test_ipv6_vip(lab):
    lab.apply(lb_state({"r1": 1, "r2": 1, "r3": 1}))
    assert served_by(lab, range(23000, 23060), vip=VIP6, client=CLIENT6) == {"r1", "r2", "r3"}


def test_real_behind_another_interface_is_reached_by_redirect(lab):
    lab.apply(lb_state({"r1": 1, "r2": 1, "r3": 1}))
    before = lab.controller.stats()["packets"]
    assert served_by(lab, range(24000, 24030), vip=FAR_VIP) == {"r4"}
    after = lab.controller.stats()["packets"]
    # SYN, ACK and data of each connection left through eth1, next hop found by bpf_fib_lookup
    assert after["redirect"] - before["redirect"] >= 30 * 3
    assert after["fib_fallback"] == before["fib_fallback"]


def test_removing_or_draining_a_real_breaks_no_connection_on_the_others(lab):
    lab.apply(lb_state({"r1": 1, "r2": 1, "r3": 1}))
    connections = [tcp_exchange(lab, port) for port in range(40000, 40090)]
    try:
        by_real = collections.Counter(real for _, real in connections)
        assert set(by_real) == {"r1", "r2", "r3"}
        lab.apply(lb_state({"r1": 1, "r2": 1}))  # r3 removed
        assert_echoed([sock for sock, real in connections if real != "r3"], b"still there?\n")
        assert served_by(lab, range(41000, 41060)) == {"r1", "r2"}
        lab.apply(lb_state({"r1": 1, "r2": 0}))  # r2 drained: its connections live on
        assert_echoed([sock for sock, real in connections if real != "r3"], b"and now?\n")
        assert served_by(lab, range(42000, 42060)) == {"r1"}
    finally:
        for sock, _ in connections:
            sock.close()


def assert_echoed(socks: list[socket.socket], message: bytes) -> None:
    """Each open connection still answers: `message` comes back on every one."""
    for sock in socks:
        sock.sendall(message)
        assert sock.makefile("rb").readline() == message


def wait_for(lab: Lab, condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        lab.tick()
        time.sleep(0.05)


def test_health_check_takes_a_dead_real_out_and_back(lab):
    check = {"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.5, "rise": 2, "fall": 2}
    lab.apply(lb_state({"r1": 1, "r2": 1, "r3": 1}, health_check=check))
    r2 = ("10.10.100.1:80/tcp", REALS["r2"][0])

    def r2_down() -> bool:
        return any(row["vip"] == r2[0] and row["real"] == r2[1] and not row["up"]
                   for row in lab.controller.query("health", {}))

    for _ in range(10):
        lab.tick()
        time.sleep(0.05)
    assert not r2_down()
    lab.stop_server("r2")
    try:
        wait_for(lab, r2_down, "r2 to be marked down")
        assert served_by(lab, range(43000, 43060)) == {"r1", "r3"}
        shares = {row["real"]: row["slots"] for row in lab.controller.query("ring", {"vip": "10.10.100.1:80/tcp"})}
        assert shares[REALS["r2"][0]] == 0
    finally:
        lab.start_server("r2")
    wait_for(lab, lambda: not r2_down(), "r2 to come back")
    assert served_by(lab, range(44000, 44060)) == {"r1", "r2", "r3"}
    assert lab.controller.stats()["health_changes"] >= 2


# --- the CLI through a real agent, and an agent restart that traffic does not notice -------------

def udp_vip_state(weights: dict[str, int], flags: list[str], **extra) -> LbState:
    """lb_state with flags on the UDP VIP and more top-level state (server_ids, down_reals)."""
    data = lb_state(weights).model_dump(mode="json")
    next(v for v in data["vips"] if v["protocol"] == "udp")["flags"] = flags
    return LbState.model_validate({**data, **extra})


def quic_short_header(server_id: int) -> bytes:
    """A QUIC short-header packet whose destination connection id (version 2 layout) names a server."""
    return bytes([0x41, 0x80 | 0x2A]) + server_id.to_bytes(3, "big") + b"\x01\x02\x03\x04" + b"protected"


QUIC_INITIAL = bytes([0xC3]) + b"\x00\x00\x00\x01" + b"\x08" + bytes(8) + b"\x00" + b"client hello"


def test_quic_connection_ids_take_datagrams_to_their_server(lab):
    weights = {"r1": 1, "r2": 1, "r3": 1}
    ids = {101: "r1", 102: "r2", 103: "r3"}
    lab.apply(udp_vip_state(weights, ["quic"],
                            server_ids=[{"id": i, "address": REALS[name][0]} for i, name in ids.items()]))
    try:
        before = lab.controller.stats()["packets"]
        for server_id, name in ids.items():  # whatever the client's port, the CID's server answers
            assert {udp_exchange(lab, port, quic_short_header(server_id))[0] for port in range(36000, 36020)} \
                == {name}
        initial = collections.Counter(udp_exchange(lab, port, QUIC_INITIAL)[0] for port in range(36100, 36160))
        assert initial == predicted(weights, CLIENT, range(36100, 36160))  # Initial: the client's CID, hashed
        unknown = collections.Counter(udp_exchange(lab, port, quic_short_header(999))[0]
                                      for port in range(36200, 36240))
        assert unknown == predicted(weights, CLIENT, range(36200, 36240))
        after = lab.controller.stats()["packets"]
        assert after["quic_cid_routed"] - before["quic_cid_routed"] >= 60
        assert after["quic_initial"] - before["quic_initial"] >= 60
        assert after["quic_cid_unknown"] - before["quic_cid_unknown"] >= 40
    finally:
        lab.apply(lb_state({"r1": 1, "r2": 2, "r3": 3}))


def test_udp_flows_leave_a_real_marked_down_only_with_flow_migration(lab):
    weights = {"r1": 1, "r2": 1, "r3": 1}
    down = [{"vip": f"{VIP}:{PORT}/udp", "address": REALS["r2"][0]}]
    try:
        for flags, ports in (([], range(37000, 37060)), (["udp_flow_migration"], range(37100, 37160))):
            lab.apply(udp_vip_state(weights, flags))
            first = {port: udp_exchange(lab, port)[0] for port in ports}
            assert set(first.values()) == {"r1", "r2", "r3"}
            migrated_before = lab.controller.stats()["packets"]["udp_migrated"]
            lab.apply(udp_vip_state(weights, flags, down_reals=down))
            after = {port: udp_exchange(lab, port)[0] for port in ports}
            on_r2 = [port for port in ports if first[port] == "r2"]
            assert all(after[port] == first[port] for port in ports if port not in on_r2)
            migrated = lab.controller.stats()["packets"]["udp_migrated"] - migrated_before
            if flags:  # the flows of the down real move where the ring (without r2) sends them
                assert collections.Counter(after[port] for port in on_r2) \
                    == predicted({"r1": 1, "r2": 0, "r3": 1}, CLIENT, on_r2)
                assert migrated >= len(on_r2)
            else:  # without the flag they stay on it
                assert all(after[port] == "r2" for port in on_r2) and migrated == 0
    finally:
        lab.apply(lb_state({"r1": 1, "r2": 2, "r3": 3}))


# --- TCP server-id routing, inline decapsulation and source routing ------------------------------

TPR_CLIENT = r"""
import socket, sys
client, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
conns = {}
print("ready", flush=True)
for line in sys.stdin:
    cmd, sport = line.split()
    sport = int(sport)
    try:
        if cmd == "open":  # a connection from a fixed port; answers the name of the real serving it
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(3)
            sock.bind((client, sport))
            sock.connect((vip, port))
            sock.sendall(b"hello\n")
            conns[sport] = (sock, sock.makefile("rb"))
            print(conns[sport][1].readline().decode().strip(), flush=True)
        else:  # "echo": one more line over the open connection
            sock, reader = conns[sport]
            sock.sendall(b"still there?\n")
            print("ok" if reader.readline() == b"still there?\n" else "broken", flush=True)
    except OSError:
        print("broken", flush=True)
"""


def tpr_option_writer(server_ids) -> Program:
    """The client's half of Katran's TPR as a sock_ops program: every non-SYN segment of a connection
    whose local port is in `server_ids` (a u32 port -> u32 server id map) carries the option kind 0xB7,
    length 6, the id little-endian. (The real's half, which tells the client its id in the SYN-ACK,
    is played by the test writing the map.)"""
    a = asm.Assembler()
    r0, r1, r2, r3, r4, r6, r7, r10 = (asm.Reg(n) for n in (0, 1, 2, 3, 4, 6, 7, 10))
    established, length, write, out = asm.Label("established"), asm.Label("len"), asm.Label("write"), asm.Label("out")
    a.emit(asm.mov64(r6, r1), asm.ldx(4, r7, r6, 0))  # op
    a.emit(asm.jmp(asm.JEQ, r7, 4, established), asm.jmp(asm.JEQ, r7, 14, length), asm.jmp(asm.JEQ, r7, 15, write),
           asm.ja(out))
    a.place(established)  # BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: ask for the header-option callbacks
    a.emit(asm.mov64(r1, r6), asm.mov64(r2, 1 << 6), asm.call(59), asm.ja(out))

    def lookup() -> None:  # r0 = server_ids[local port] or NULL
        a.emit(asm.ldx(4, r2, r6, 68), asm.stx(4, r10, -4, r2), *asm.ld_map_fd(r1, server_ids.fd),
               asm.mov64(r2, r10), asm.alu64(asm.ADD, r2, -4), asm.call(asm.Helper.map_lookup_elem),
               asm.jmp(asm.JEQ, r0, 0, out))

    a.place(length)  # BPF_SOCK_OPS_HDR_OPT_LEN_CB: room for the option
    lookup()
    a.emit(asm.mov64(r1, r6), asm.mov64(r2, 6), asm.mov64(r3, 0), asm.call(144), asm.ja(out))
    a.place(write)  # BPF_SOCK_OPS_WRITE_HDR_OPT_CB: the option, not on a SYN
    a.emit(asm.ldx(4, r2, r6, 212), asm.alu64(asm.AND, r2, 2), asm.jmp(asm.JNE, r2, 0, out))
    lookup()
    a.emit(asm.ldx(4, r4, r0, 0), asm.alu64(asm.LSH, r4, 16), asm.alu64(asm.OR, r4, 0x06B7),
           asm.stx(8, r10, -16, r4), asm.mov64(r1, r6), asm.mov64(r2, r10), asm.alu64(asm.ADD, r2, -16),
           asm.mov64(r3, 6), asm.mov64(r4, 0), asm.call(143))
    a.place(out)
    a.emit(asm.mov64(r0, 1), asm.exit_insn())
    return Program.load_raw(ProgType.SOCK_OPS, a.assemble(), name="tpr_client")


class TprClient:
    """A client process in its own cgroup with the TPR option writer attached to it."""

    def __init__(self, lab: Lab) -> None:
        self.group = cgroup2_root() / f"bpfnet-test-tpr-{uuid.uuid4().hex[:6]}"
        self.group.mkdir()
        self.ids = Map.create(MapType.HASH, 4, 4, 1024, name="tpr_client_ids")
        self.program = tpr_option_writer(self.ids)
        self.link = None
        self.proc = None
        try:
            self.link = self.program.attach_cgroup(self.group, AttachType.CGROUP_SOCK_OPS)
            self.proc = lab.topo.popen(lab.client, [sys.executable, "-c", TPR_CLIENT, CLIENT, VIP, str(PORT)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       preexec_fn=self._enter)
            assert self.proc.stdout.readline().strip() == "ready"
        except BaseException:
            self.close()
            raise

    def _enter(self) -> None:
        (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def ask(self, cmd: str, sport: int) -> str:
        self.proc.stdin.write(f"{cmd} {sport}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def tag(self, sport: int, server_id: int | None) -> None:
        key = sport.to_bytes(4, "little")
        if server_id is None:
            self.ids.delete(key)
        else:
            self.ids.update(key, server_id.to_bytes(4, "little"))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.link is not None:
            self.link.close()
        self.program.close()
        self.ids.close()
        self.group.rmdir()


def tpr_state(weights: dict[str, int], ids: dict[int, str]) -> LbState:
    data = lb_state(weights).model_dump(mode="json")
    data["settings"]["tcp_server_id_routing"] = True
    data["server_ids"] = [{"id": i, "address": REALS[name][0]} for i, name in ids.items()]
    return LbState.model_validate(data)


def test_tcp_server_id_keeps_connections_the_lb_lost(lab):
    """TPR with real sockets: the client's segments carry its real's server id in a TCP option (a
    sock_ops program on the client's cgroup writes it). When the LB loses its flows (connection table
    cleared, as after a restart or evictions) while the ring moves them, the tagged connections stay
    on their reals and the untagged ones on moved flows break; the routed segments write the table,
    so the tagged flows then stay even without the option."""
    ids = {201: "r1", 202: "r2", 203: "r3"}
    by_name = {name: i for i, name in ids.items()}
    weights = {"r1": 1, "r2": 1, "r3": 1}
    lab.apply(tpr_state(weights, ids))
    client = TprClient(lab)
    try:
        ports = range(45000, 45030)
        served = {port: client.ask("open", port) for port in ports}
        assert collections.Counter(served.values()) == predicted(weights, CLIENT, ports)
        tagged = list(ports[::2])
        for port in tagged:  # what the real's TPR half would have told the client in its SYN-ACK
            client.tag(port, by_name[served[port]])
        before = lab.controller.stats()["packets"]
        assert all(client.ask("echo", port) == "ok" for port in ports)
        assert lab.controller.stats()["packets"]["tpr_routed"] - before["tpr_routed"] >= len(tagged)

        lab.apply(tpr_state({"r1": 1, "r2": 0, "r3": 0}, ids))  # the ring now sends every new flow to r1
        lab.controller.dataplane.conn_table.map.clear()  # ...and the LB forgot every flow
        before = lab.controller.stats()["packets"]
        after = {port: client.ask("echo", port) for port in ports}
        moved = [port for port in ports if port not in tagged and served[port] != "r1"]
        assert moved, "no untagged flow left r1's share: pick other ports"
        assert {port: after[port] for port in tagged} == {port: "ok" for port in tagged}
        assert {port: after[port] for port in moved} == {port: "broken" for port in moved}
        stats = lab.controller.stats()["packets"]
        assert stats["sid_conn_new"] - before["sid_conn_new"] >= len(tagged)

        for port in tagged:  # no option any more: the entries the routed segments wrote hold the flows
            client.tag(port, None)
        assert {port: client.ask("echo", port) for port in tagged} == {port: "ok" for port in tagged}
    finally:
        client.close()
        lab.apply(lb_state({"r1": 1, "r2": 2, "r3": 3}))


EDGE = "10.10.0.5"


def udp_ttl_answered(lab: Lab, sport: int, ttl: int) -> bool:
    with inside(lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        sock.bind((CLIENT, sport))
        sock.settimeout(1)
        sock.sendto(b"who", (VIP, PORT))
        try:
            return bool(sock.recvfrom(100)[0])
        except TimeoutError:
            return False


def test_inline_decap_of_another_lbs_traffic(lab):
    """An edge load balancer (bpfnet's, in its own namespace: no ipip module here) sends the client's
    traffic for the VIP IP-in-IP to the LB's own address; the LB decapsulates it inline and balances
    the inner flows to the reals (which answer the client directly), one router hop on: an inner TTL
    of 1 is dropped there, 2 gets through."""
    topo, weights = lab.topo, {"r1": 1, "r2": 2, "r3": 3}
    edge = topo.netns("edge")
    topo.veth("eth0", "edge", ns=edge, peer_ns=lab.sw, mtu=1600)
    topo.set_master("edge", "br0", ns=lab.sw)
    topo.addr("eth0", f"{EDGE}/24", ns=edge)
    topo.forwarding(True, ns=edge)
    topo.neigh("eth0", LB, topo.mac("eth0", ns=lab.lb), ns=edge)
    lab._attach("bench_sink", "xdp_pass", lab.sw, "edge")  # the edge's XDP_TX frames reach the bridge
    edge_pins = pins.PIN_ROOT / f"lbe2e-edge-{uuid.uuid4().hex[:8]}"
    to_lb = [{"address": LB}]
    edge_state = LbState.model_validate({
        "settings": {"interface": "eth0", "max_vips": 2, "max_reals": 4, "conn_table_size": 1024},
        "vips": [{"address": VIP, "port": PORT, "protocol": p, "reals": to_lb} for p in ("tcp", "udp")]})
    data = lb_state(weights).model_dump(mode="json")
    data["settings"]["decap_addresses"] = [LB]
    lab.apply(LbState.model_validate(data))
    with inside(edge):
        edge_lb = LbController(edge_pins)
        edge_lb.start(edge_state)
    topo.route(f"{VIP}/32", ns=lab.client, via=EDGE)  # the client's VIP traffic goes through the edge
    try:
        before = lab.controller.stats()["packets"]
        ports = range(47000, 47060)
        seen = served_counts(lab, ports)
        assert seen == predicted(weights, CLIENT, ports)  # balanced on the inner flow
        assert edge_lb.stats()["packets"]["tx"] >= 60 * 2
        assert udp_ttl_answered(lab, 47100, ttl=2)
        assert not udp_ttl_answered(lab, 47101, ttl=1)
        stats = lab.controller.stats()["packets"]
        assert stats["decap_ipip"] - before["decap_ipip"] >= 60 * 2 + 2
        assert stats["drop_ttl"] - before["drop_ttl"] >= 1
    finally:
        subprocess.run(["ip", "-n", lab.client, "route", "del", f"{VIP}/32"], check=False)
        with inside(edge):
            edge_lb.stop(detach=True)
        pins.unpin(edge_pins)
        pins.remove_empty_parents(edge_pins.parent)
        lab.apply(lb_state({"r1": 1, "r2": 2, "r3": 3}))


def test_source_routes_pick_the_real_established_flows_keep_theirs(lab):
    weights = {"r1": 1, "r2": 1, "r3": 1}

    def state(routes: dict[str, str]) -> LbState:
        data = lb_state(weights).model_dump(mode="json")
        next(v for v in data["vips"] if v["address"] == VIP and v["protocol"] == "tcp")["flags"] = ["src_routing"]
        data["source_routes"] = [{"prefix": p, "address": REALS[name][0]} for p, name in routes.items()]
        return LbState.model_validate(data)

    lab.apply(state({"10.10.0.0/24": "r2", "10.10.0.2/32": "r3"}))  # the longest prefix wins
    try:
        before = lab.controller.stats()["packets"]
        assert served_by(lab, range(46000, 46030)) == {"r3"}
        held = [tcp_exchange(lab, port) for port in range(46100, 46110)]
        try:
            assert {real for _, real in held} == {"r3"}
            lab.apply(state({"10.10.0.0/24": "r2"}))
            assert_echoed([sock for sock, _ in held], b"still there?\n")  # flows keep their real through the table
            assert served_by(lab, range(46200, 46230)) == {"r2"}
        finally:
            for sock, _ in held:
                sock.close()
        lab.apply(state({"192.168.0.0/16": "r1"}))  # no route for this client: the ring
        ports = range(46300, 46360)
        hashed = served_counts(lab, ports)
        assert hashed == predicted(weights, CLIENT, ports)
        stats = lab.controller.stats()["packets"]
        assert stats["src_routed"] - before["src_routed"] >= 30 + 10 + 30
        assert stats["src_unrouted"] - before["src_unrouted"] >= 60
    finally:
        lab.apply(lb_state({"r1": 1, "r2": 2, "r3": 3}))


LB_YAML = f"""
settings:
  interface: eth0
  max_vips: 4
  max_reals: 16
vips:
  - address: {VIP}
    port: {PORT}
    protocol: tcp
    reals:
      - {{address: {REALS['r1'][0]}, weight: 1}}
      - {{address: {REALS['r2'][0]}, weight: 1}}
      - {{address: {REALS['r3'][0]}, weight: 1}}
"""


class AgentProcess:
    """`python -m bpfnet.agent --apps lb` in the LB's network namespace. nsenter --net (not
    `ip netns exec`, which mounts a private /sys) keeps the agent's pins in the shared bpffs."""

    def __init__(self, lab: Lab, workdir: Path, pin_root: Path) -> None:
        self.socket = workdir / "agent.sock"
        self.argv = ["nsenter", f"--net=/run/netns/{lab.lb}", sys.executable, "-m", "bpfnet.agent",
                     "--socket", str(self.socket), "--state-db", str(workdir / "state.db"),
                     "--pin-root", str(pin_root), "--apps", "lb", "--log-level", "warning"]
        self.log = workdir / "agent.log"
        self.proc = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        with AgentClient(self.socket) as client:
            while True:
                try:
                    if client.health()["pid"] == self.proc.pid:
                        return
                except AgentRequestError:
                    pass
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "agent did not start"
                time.sleep(0.1)

    def stop(self, detach: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if detach:
            with AgentClient(self.socket) as client:
                client.shutdown(detach=True)
        else:
            self.proc.terminate()  # SIGTERM: the agent leaves the pinned data plane running
        self.proc.wait(timeout=30)


def cli(*args: str, socket: Path) -> Result:
    return CliRunner().invoke(lb_cli, [*args, "--socket", str(socket)])


def echoes(sock: socket.socket) -> bool:
    sock.sendall(b"ping\n")
    return sock.makefile("rb").readline() == b"ping\n"


def test_cli_through_the_agent_and_a_restart_traffic_does_not_notice(lab, tmp_path):
    with inside(lab.lb):
        lab.controller.stop(detach=True)  # the agent takes over the interface
    lab.controller = None
    pin_root = pins.PIN_ROOT / f"lbcli-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lbe2e-", dir="/tmp"))
    agent = AgentProcess(lab, workdir, pin_root)
    agent.start()
    long_lived = None
    try:
        (workdir / "lb.yaml").write_text(LB_YAML)
        result = cli("apply", "-f", str(workdir / "lb.yaml"), socket=agent.socket)
        assert result.exit_code == 0, result.output
        assert served_by(lab, range(45000, 45060)) == {"r1", "r2", "r3"}

        vips = json.loads(cli("vip", "list", "-o", "json", socket=agent.socket).output)
        assert [(v["vip"], v["reals"]) for v in vips] == [(f"{VIP}:{PORT}/tcp", 3)]

        result = cli("real", "drain", f"{VIP}:{PORT}/tcp", REALS["r3"][0], socket=agent.socket)
        assert result.exit_code == 0, result.output
        assert served_by(lab, range(46000, 46060)) == {"r1", "r2"}
        ring = json.loads(cli("ring", f"{VIP}:{PORT}/tcp", "-o", "json", socket=agent.socket).output)
        assert {row["real"]: row["slots"] for row in ring}[REALS["r3"][0]] == 0

        flow = json.loads(cli("flow", f"{CLIENT}:47000", f"{VIP}:{PORT}/tcp", "-o", "json",
                              socket=agent.socket).output)
        sock, real = tcp_exchange(lab, 47000)
        sock.close()
        assert flow["verdict"] == "tx" and flow["real"] == REALS[real][0]

        stats = json.loads(cli("stats", "-o", "json", socket=agent.socket).output)
        assert stats["vip_packets"][f"{VIP}:{PORT}/tcp"] > 0 and stats["packets"]["tx"] > 0

        # Bad input: a one-line error naming the problem, and the state stays as it was.
        before = cli("show", "-o", "json", socket=agent.socket).output
        result = cli("real", "add", f"{VIP}:{PORT}/tcp", "10.10.0.999", socket=agent.socket)
        assert result.exit_code == 1 and "'10.10.0.999' is not an IP address" in result.output
        (workdir / "bad.yaml").write_text(LB_YAML.replace("max_vips: 4", "max_vips: 4\n  ring_size: 100"))
        result = cli("apply", "-f", str(workdir / "bad.yaml"), socket=agent.socket)
        assert result.exit_code == 1 and "settings.ring_size: ring_size must be prime" in result.output
        assert cli("show", "-o", "json", socket=agent.socket).output == before

        # Restart: the pinned program keeps forwarding while no agent runs, and is adopted after.
        long_lived, real = tcp_exchange(lab, 48000)
        agent.stop()
        assert echoes(long_lived)
        assert served_by(lab, range(49000, 49030)) <= {"r1", "r2"}
        agent.start()
        assert echoes(long_lived)
        assert served_by(lab, range(49100, 49130)) <= {"r1", "r2"}
        vips = json.loads(cli("vip", "list", "-o", "json", socket=agent.socket).output)
        assert vips[0]["weights"][REALS["r3"][0]] == 0
    finally:
        if long_lived is not None:
            long_lived.close()
        agent.stop(detach=True)
        pins.unpin(pin_root)
        pins.remove_empty_parents(pin_root.parent)
        shutil.rmtree(workdir, ignore_errors=True)
