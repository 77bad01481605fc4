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
from bpfnet.ebpf import ObjectSpec, pins
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


def served_by(lab: Lab, ports, **kw) -> set[str]:
    """The reals that serve new connections from these source ports."""
    names = set()
    for port in ports:
        sock, real = tcp_exchange(lab, port, **kw)
        sock.close()
        names.add(real)
    return names


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
    seen = collections.Counter()
    for port in tcp_ports:
        sock, real = tcp_exchange(lab, port)
        sock.close()
        seen[real] += 1
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
        for sock, real in connections:
            if real != "r3":
                sock.sendall(b"still there?\n")
                assert sock.makefile("rb").readline() == b"still there?\n"
        assert served_by(lab, range(41000, 41060)) == {"r1", "r2"}
        lab.apply(lb_state({"r1": 1, "r2": 0}))  # r2 drained: its connections live on
        for sock, real in connections:
            if real != "r3":
                sock.sendall(b"and now?\n")
                assert sock.makefile("rb").readline() == b"and now?\n"
        assert served_by(lab, range(42000, 42060)) == {"r1"}
    finally:
        for sock, _ in connections:
            sock.close()


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
