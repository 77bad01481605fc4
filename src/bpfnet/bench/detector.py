"""The detector end to end, as a rig the e2e test and `bpfnet bench detector` share.

In network namespaces on one bridge: a server runs an agent with the ddos stage and the detector
on its interface plus TCP and UDP echo services (IPv4 and IPv6); an attacker floods it with the
traffic generator (one of the attack shapes) while a client keeps making TCP connections and UDP
exchanges over the attack's IP version. The generator varies only source addresses and ports; a
shape whose frames differ in other fields (lengths, TCP flags, windows, fragment offsets) is
several templates, each with its own generator, sent in turn. `DetectorRig.attack(shape)`
measures one attack: time to the rule, the share of attack frames the rule drops once it is in
force, the client's successes, and the rule's removal.
`throughput()` measures samples/s the detector itself sustains on one core (no namespaces).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bpfnet.app.client import AgentClient
from bpfnet.bench.harness import Scenario
from bpfnet.bench.trafficgen import Flows, TrafficGenerator, require_veth
from bpfnet.ebpf import ObjectSpec, pins
from bpfnet.netns import Topology, inside

SERVER, CLIENT, ATTACKER = "10.79.0.1", "10.79.0.2", "10.79.0.3"
SERVER6, CLIENT6, ATTACKER6 = "fd00:79::1", "fd00:79::2", "fd00:79::3"  # /64, no duplicate detection
SERVERS = {4: SERVER, 6: SERVER6}
TCP_PORT, UDP_PORT = 8080, 443  # the client's services; two shapes hide behind them
SAMPLE_EVERY = 16
# short learning and hold times so a round takes seconds; rule_ttl must outlive the hold time
DETECTOR = {"attack_floor_pps": 2000, "learning_time": 1.0, "window": 0.2, "hold_time": 2.0, "rule_ttl": 10}
# The flood: frames per generator call, paced to FLOOD_RATE whatever the generator's backend can do
# (far above the detector's floor, and what the rig's echo service, a Python thread, was sized
# for: the packet backend sends a burst in ~1 ms, live frames took ~25 ms), with at least PAUSE
# between bursts so the veth rings never overflow.
# Before the first attack of an IP version, the client works this long with no attack, so the
# detector has normal traffic of that version to compare the attack with (as it would in service).
WARM_UP = 2.0
UDP_RECEIVE_BUFFER = 16 << 20  # bytes: a BURST of attack frames at their in-kernel size, twice
SO_RCVBUFFORCE = 33  # Linux (not in the socket module): lets root pass net.core.rmem_max
BURST = 2000
FLOOD_RATE = 60_000  # frames/s
PAUSE = 0.005
CHUNK = 25  # frames per turn when a shape has several templates
VERDICTS = ("pass_no_match", "pass_rule", "drop_rule", "pass_limit", "drop_limit")


@dataclass(frozen=True)
class Shape:
    """One attack: a template frame (built for the rig's MAC addresses) and the flows that vary it;
    or several templates, one generator each, sent in turn (`build` returns a list, `flows` is
    one Flows per template). `expect` is a term the detector's rule should hold; `family` the IP
    version of the attack (and of the client's exchanges while it lasts)."""

    name: str
    description: str
    build: Callable[[str, str], bytes | list[bytes]]  # (attacker MAC, server MAC) -> Ethernet frame(s)
    flows: Flows | tuple[Flows, ...]
    expect: str = ""
    family: int = 4

    def templates(self, attacker_mac: str, server_mac: str) -> list[tuple[bytes, Flows]]:
        built = self.build(attacker_mac, server_mac)
        if isinstance(built, bytes):
            return [(built, self.flows if isinstance(self.flows, Flows) else self.flows[0])]
        flows = self.flows if isinstance(self.flows, tuple) else (self.flows,) * len(built)
        if len(flows) != len(built):
            raise ValueError(f"{self.name}: {len(built)} templates but {len(flows)} flows")
        return list(zip(built, flows, strict=True))


def _frame(src_mac: str, dst_mac: str, packet) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / packet)


SHAPES = [
    Shape("udp reflection", "UDP from 4096 sources, source port 53 (DNS answers), to 7777/udp",
          lambda a, s: _frame(a, s, IP(src="198.18.0.1", dst=SERVER, ttl=52) / UDP(sport=53, dport=7777)
                              / (b"\x81\x80\x00\x01" + b"\x00" * 464)),
          Flows("198.18.0.1", addresses=4096, first_port=53)),
    Shape("syn flood", f"TCP SYN from 254 sources x 1021 ports to {TCP_PORT}/tcp (the client's service)",
          lambda a, s: _frame(a, s, IP(src="100.70.0.1", dst=SERVER, ttl=64) / TCP(sport=1024, dport=TCP_PORT,
                                                                                   flags="S", seq=1)),
          Flows("100.70.0.1", addresses=254, first_port=1024, ports=1021)),
    Shape("udp payload pattern", "UDP from 254 sources x 1021 ports to 9999/udp, payload 13 37 ca fe …",
          lambda a, s: _frame(a, s, IP(src="172.20.0.1", dst=SERVER) / UDP(sport=1024, dport=9999)
                              / (b"\x13\x37\xca\xfe" * 16)),
          Flows("172.20.0.1", addresses=254, first_port=1024, ports=1021)),
    Shape("udp 443 fixed ttl", f"UDP from 254 sources x 1021 ports to {UDP_PORT}/udp (the client's service), TTL 111",
          lambda a, s: _frame(a, s, IP(src="192.0.2.1", dst=SERVER, ttl=111) / UDP(sport=1024, dport=UDP_PORT)
                              / (b"\x17\x03\x03" + bytes(range(61)))),
          Flows("192.0.2.1", addresses=254, first_port=1024, ports=1021)),
]

# --- attacks that share no exact value: only a bit pattern or a range (issue 19) ------------------
# Eight templates each; every template has its own IP id, payload and flows (256 sources in its
# own /8 x 16 source ports from its own base), so no source prefix, port range, id or payload
# word is common to the attack: only the shape's pattern or range is. TTL 64 and DF (fragments
# aside) as the client's own packets have them.
VARIANTS = 8
_variant_rng = random.Random(19)
_VARIANT_FLOWS = tuple(Flows(f"{first}.{_variant_rng.randrange(256)}.0.1", addresses=256,
                             first_port=_variant_rng.randrange(1024, 65000 - 16), ports=16)
                       for first in _variant_rng.sample(range(11, 220), VARIANTS))
_IDS = tuple(_variant_rng.randrange(65536) for _ in range(VARIANTS))
_PAYLOADS = tuple(_variant_rng.randbytes(1400) for _ in range(VARIANTS))
# TCP options as a Linux client sends them: on a SYN, and on every later segment (timestamps)
SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
ACK_OPTIONS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
FIN, SYN, PSH, URG, ECE, CWR = 0x01, 0x02, 0x08, 0x20, 0x40, 0x80
_ODD_FLAGS = (0, PSH, URG, ECE, CWR, PSH | URG, ECE | CWR, PSH | CWR)


def _variants(make: Callable[[int], object]) -> Callable[[str, str], list[bytes]]:
    return lambda a, s: [_frame(a, s, make(k)) for k in range(VARIANTS)]


def _fragment(k: int):
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k], flags="MF" if k % 2 else 0, frag=40 + 97 * k,
               proto=17) / _PAYLOADS[k][:48 + 40 * k])


def _syn_fin(k: int):
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k], flags="DF")
            / TCP(sport=1024, dport=TCP_PORT, flags=SYN | FIN | _ODD_FLAGS[k], seq=k, window=500 + 3 * k,
                  options=ACK_OPTIONS))


def _length(k: int):
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k], flags="DF") / UDP(sport=1024, dport=UDP_PORT)
            / _PAYLOADS[k][:1100 + 37 * k])


def _window(k: int):
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k], flags="DF")
            / TCP(sport=1024, dport=TCP_PORT, flags="S", seq=k, window=1024 + 411 * k, options=SYN_OPTIONS))


def _udp_length_lie(k: int):
    """UDP whose length field claims more or less than the IP payload holds (a malformed-packet
    flood; the kernel's UDP drops them, after the work of getting there)."""
    payload = _PAYLOADS[k][:200 + 61 * k]
    claimed = len(payload) + 8 + (64 + 16 * k) * (1 if k % 2 else -1)
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k], flags="DF")
            / UDP(sport=1024, dport=UDP_PORT, len=claimed) / payload)


def _icmp(k: int):
    """ICMP errors of 8 kinds and sizes, none the client's (it sends TCP and UDP only)."""
    kinds = ((3, 3), (3, 1), (11, 0), (3, 13), (12, 0), (3, 10), (5, 1), (3, 4))
    return (IP(src="10.0.0.1", dst=SERVER, ttl=64, id=_IDS[k]) / ICMP(type=kinds[k][0], code=kinds[k][1])
            / _PAYLOADS[k][:28 + 40 * k])


# ICMP has no ports: the same sources, one flow per address
_ICMP_FLOWS = tuple(Flows(f.first_address, addresses=f.addresses * f.ports) for f in _VARIANT_FLOWS)

PATTERN_SHAPES = [
    Shape("udp fragments", "non-first UDP fragments, 8 offsets and lengths, MF set or not",
          _variants(_fragment), _VARIANT_FLOWS, expect="ip[6:2] & 0x1fff != 0"),
    Shape("tcp syn+fin", f"SYN+FIN with 8 combinations of PSH/URG/ECE/CWR to {TCP_PORT}/tcp, "
          "timestamp option as the client's segments", _variants(_syn_fin), _VARIANT_FLOWS,
          expect="tcp[tcpflags] & (tcp-fin|tcp-syn) = (tcp-fin|tcp-syn)"),
    Shape("udp length range", f"UDP of 8 lengths in 1128-1387 bytes to {UDP_PORT}/udp (the client's service)",
          _variants(_length), _VARIANT_FLOWS, expect="ip[2:2] >= "),
    Shape("tcp window range", f"SYNs as the client's (options, DF, TTL) but windows 1024-3901, to {TCP_PORT}/tcp",
          _variants(_window), _VARIANT_FLOWS, expect="tcp[14:2] >= "),
    Shape("udp length lie", f"UDP to {UDP_PORT}/udp (the client's service) whose length field is 64-176 bytes "
          "off the IP payload, 8 sizes", _variants(_udp_length_lie), _VARIANT_FLOWS, expect="udp[4:2] != ip[2:2]"),
    Shape("icmp errors", "ICMP errors of 8 types/codes and sizes from 2,048 sources each",
          _variants(_icmp), _ICMP_FLOWS, expect="icmp[icmptype] = "),
]


# --- IPv6 (issue 19): a flood with fixed fields, and attacks defined by a pattern or a range ----------
# Each variant's sources lie in their own /32 (no source prefix is common to the attack); hop limit
# 64 as the client's.
_V6_FLOWS = tuple(Flows(f"{0x2400 + 0x111 * k:x}:{_variant_rng.randrange(1 << 16):x}::1", addresses=256,
                        first_port=f.first_port, ports=16) for k, f in enumerate(_VARIANT_FLOWS))


def _syn_fin6(k: int):
    return (IPv6(src="2001:db8::1", dst=SERVER6, hlim=64)
            / TCP(sport=1024, dport=TCP_PORT, flags=SYN | FIN | _ODD_FLAGS[k], seq=k, window=500 + 3 * k,
                  options=ACK_OPTIONS))


def _length6(k: int):
    return (IPv6(src="2001:db8::1", dst=SERVER6, hlim=64) / UDP(sport=1024, dport=UDP_PORT)
            / _PAYLOADS[k][:1100 + 37 * k])


IPV6_SHAPES = [
    Shape("ipv6 udp 443 from one /64", f"UDP over IPv6 from 254 sources of 2001:db8:5300::/64 x 1021 ports to "
          f"{UDP_PORT}/udp (the client's service), hop limit 111",
          lambda a, s: _frame(a, s, IPv6(src="2001:db8:5300::1", dst=SERVER6, hlim=111)
                              / UDP(sport=1024, dport=UDP_PORT) / (b"\x17\x03\x03" + bytes(range(61)))),
          Flows("2001:db8:5300::1", addresses=254, first_port=1024, ports=1021),
          expect="src net 2001:db8:5300::/64", family=6),
    Shape("ipv6 tcp syn+fin", f"SYN+FIN over IPv6 with 8 combinations of PSH/URG/ECE/CWR to {TCP_PORT}/tcp, "
          "sources in 8 /32s", _variants(_syn_fin6), _V6_FLOWS, expect="ip6[53] & 0x03 = 0x03", family=6),
    Shape("ipv6 udp length range", f"UDP over IPv6 of 8 lengths in 1108-1367 bytes to {UDP_PORT}/udp (the "
          "client's service), sources in 8 /32s", _variants(_length6), _V6_FLOWS, expect="ip6[4:2] >= ", family=6),
]


@dataclass
class ClientTally:
    """The client's TCP connections (connect + echo) and UDP exchanges during an attack."""

    tcp_ok: int = 0
    tcp_failed: int = 0
    udp_ok: int = 0
    udp_failed: int = 0

    @property
    def total(self) -> int:
        return self.tcp_ok + self.tcp_failed + self.udp_ok + self.udp_failed

    @property
    def success_share(self) -> float:
        return (self.tcp_ok + self.udp_ok) / self.total if self.total else 0.0


@dataclass
class AttackOutcome:
    shape: str
    time_to_rule: float          # s from the first attack frame to the first rule_added event
    time_to_cover: float         # ... to the last rule_added before the detector settled (refinements)
    expressions: list[str]       # the rules the detector deployed, in order
    sent_since_rule: int         # attack frames sent from the first rule_added on (client at work)
    dropped_since_rule: int      # the stage's rule drops over them
    sent_after_rule: int         # attack frames sent once the rules settled, the client quiet
    dropped_by_rule: int         # the rules' drops over them
    passed: int                  # frames the stage saw and let pass over them
    client: ClientTally
    removed: bool                # every rule removed (rule_removed events) after the attack stopped
    events: list[dict] = field(default_factory=list)

    @property
    def drop_share(self) -> float:
        return self.dropped_by_rule / self.sent_after_rule if self.sent_after_rule else 0.0

    @property
    def drop_share_since_rule(self) -> float:
        return self.dropped_since_rule / self.sent_since_rule if self.sent_since_rule else 0.0


class EchoServices:
    """TCP and UDP echo on the server's IPv4 and IPv6 addresses, served by threads of this process."""

    def __init__(self, ns: str) -> None:
        self.sockets: list[socket.socket] = []
        with inside(ns):
            for address in SERVERS.values():
                tcp = socket.create_server((address, TCP_PORT), family=_FAMILIES[address], backlog=128)
                udp = socket.socket(_FAMILIES[address], socket.SOCK_DGRAM)
                # a UDP service that expects floods holds a burst (as DNS and QUIC servers raise
                # theirs): with the default 208 KiB, the frames that arrive before the first rule
                # overflow it and take the client's datagram with them, which no rule can undo
                udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)
                self.sockets += [tcp, udp]
                udp.bind((address, UDP_PORT))
                threading.Thread(target=self._tcp, args=(tcp,), daemon=True).start()
                threading.Thread(target=self._udp, args=(udp,), daemon=True).start()

    @staticmethod
    def _tcp(server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    while data := conn.recv(4096):
                        conn.sendall(data)
                except OSError:
                    pass

    @staticmethod
    def _udp(udp: socket.socket) -> None:
        while True:
            try:
                data, peer = udp.recvfrom(2048)
            except OSError:
                return
            if peer is None:  # shut down
                return
            try:
                udp.sendto(data, peer)
            except OSError:
                pass  # a flood's spoofed source has no route back

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


_FAMILIES = {SERVER: socket.AF_INET, SERVER6: socket.AF_INET6}


class Client(threading.Thread):
    """Keeps making TCP connections and UDP exchanges (1 s timeouts) with the server's address of
    IP version `family` until stopped."""

    def __init__(self, ns: str, timeout: float = 1.0, pause: float = 0.02, family: int = 4) -> None:
        super().__init__(daemon=True)
        self.ns, self.timeout, self.pause = ns, timeout, pause
        self.server = SERVERS[family]
        self.tally = ClientTally()
        self._done = threading.Event()

    def run(self) -> None:
        with inside(self.ns):
            i = 0
            while not self._done.is_set():
                i += 1
                message = f"hello {i}".encode()
                if self._tcp(message):
                    self.tally.tcp_ok += 1
                else:
                    self.tally.tcp_failed += 1
                if self._udp(message):
                    self.tally.udp_ok += 1
                else:
                    self.tally.udp_failed += 1
                self._done.wait(self.pause)

    def _tcp(self, message: bytes) -> bool:
        try:
            with socket.create_connection((self.server, TCP_PORT), timeout=self.timeout) as conn:
                conn.sendall(message)
                return conn.recv(100) == message
        except OSError:
            return False

    def _udp(self, message: bytes) -> bool:
        with socket.socket(_FAMILIES[self.server], socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.sendto(message, (self.server, UDP_PORT))
                return sock.recvfrom(100)[0] == message
            except OSError:
                return False

    def stop(self) -> ClientTally:
        self._done.set()
        self.join(timeout=30)
        return self.tally


class DetectorRig:
    """The namespaces, the agent with the detector on, and the echo services (see the module doc)."""

    def __init__(self, topology: Topology, backend: str | None = None) -> None:
        self.topology = topology
        self.backend = backend  # the traffic generator's (None: the best this kernel allows)
        self.rng = random.Random(1)
        self.root = Path(tempfile.mkdtemp(prefix="ds-"))
        self.socket = self.root / "agent.sock"
        self.pin_root = pins.pin_dir(f"ds-{uuid.uuid4().hex[:8]}")
        self.sink = None
        self.links = []
        self.services: EchoServices | None = None
        self.warmed: set[int] = set()  # IP versions the client has warmed up (WARM_UP)
        self.server, self.client, self.attacker = (topology.netns(n) for n in ("srv", "cli", "atk"))
        switch = topology.netns("sw")
        topology.bridge("dsbr0", ns=switch)
        for ns, port, address, address6 in ((self.server, "dssrv", SERVER, SERVER6),
                                            (self.client, "dscli", CLIENT, CLIENT6),
                                            (self.attacker, "dsatk", ATTACKER, ATTACKER6)):
            topology.veth("eth0", port, ns=ns, peer_ns=switch)
            topology.set_master(port, "dsbr0", ns=switch)
            topology.addr("eth0", f"{address}/24", ns=ns)
            topology.addr("eth0", f"{address6}/64", ns=ns)  # usable at once (no duplicate detection)
        try:
            # live frames (XDP_TX'd by the generator) reach the bridge only if its port runs XDP too
            self.sink = ObjectSpec.builtin("bench_sink").load()
            with inside(switch):
                self.links.append(self.sink.programs["xdp_pass"].attach_xdp(topology.ifindex("dsatk", ns=switch)))
            # TCP through a veth with XDP: the sender fills in checksums itself
            topology.features("eth0", ns=self.client, tx_checksum=False)
            self.attacker_mac = topology.mac("eth0", ns=self.attacker)
            self.server_mac = topology.mac("eth0", ns=self.server)
            self.attacker_ifindex = topology.ifindex("eth0", ns=self.attacker)
            with inside(self.attacker):
                require_veth(self.attacker_ifindex)  # generated traffic stays between the rig's namespaces
            self._agent("--socket", str(self.socket), "--state-db", str(self.root / "state.db"), "--apps",
                        "ddos", "--pin-root", str(self.pin_root), "--background", check=True)
            self.services = EchoServices(self.server)
        except BaseException:
            self.close()
            raise

    def _agent(self, *args: str, check: bool = False) -> None:
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.server}", sys.executable, "-m",
                               "bpfnet.agent", *args], capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"agent: {done.stderr.strip() or done.stdout.strip()}")

    def api(self) -> AgentClient:
        return AgentClient(self.socket)

    def auto_on(self) -> None:
        """The stage on eth0, then `bpfnet ddos auto on` and the rig's short detector timings."""
        with self.api() as client:
            client.put_state("ddos", {"interfaces": ["eth0"], "sample_every": SAMPLE_EVERY, "rules": []})
        done = subprocess.run([sys.executable, "-m", "bpfnet.cli", "ddos", "auto", "on", "--socket",
                               str(self.socket)], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"bpfnet ddos auto on: {done.stderr.strip() or done.stdout.strip()}")
        with self.api() as client:
            client.update_state("ddos", lambda s: {**s, "detector": {**s["detector"], **DETECTOR}})
        time.sleep(DETECTOR["learning_time"] + 0.5)

    def events(self, since: int = 0) -> list[dict]:
        with self.api() as client:
            return client.query("ddos", "events", since=since) if since else client.query("ddos", "events")

    def last_seq(self) -> int:
        return max((e["seq"] for e in self.events()), default=0)

    def stats(self) -> dict:
        with self.api() as client:
            return client.stats("ddos")

    def detector_rules(self) -> list[dict]:
        """The deployed rules the detector owns (their comment starts with its rule name, auto-N)."""
        with self.api() as client:
            return [r for r in client.query("ddos", "rules") if (r.get("comment") or "").startswith("auto-")]

    def flood(self, generators: list[TrafficGenerator], frames: int) -> int:
        """Send `frames` attack frames in paced bursts (in this, the main, thread); several
        generators take turns every CHUNK frames, so any window holds all their templates.
        Returns frames sent."""
        sent = 0
        with inside(self.attacker):
            while sent < frames:
                started = time.monotonic()
                burst = min(BURST, frames - sent)
                chunk = burst if len(generators) == 1 else CHUNK
                for i in range(0, burst, chunk):
                    generator = generators[i // chunk % len(generators)]
                    # the generator walks its flows in order; starting each chunk at a random flow
                    # makes a window's sources and ports look random, as in a real attack
                    generator.send(self.attacker_ifindex, min(chunk, burst - i),
                                   start=self.rng.randrange(generator.flows.count))
                sent += burst
                time.sleep(max(PAUSE, burst / FLOOD_RATE - (time.monotonic() - started)))
        return sent

    def _wait_events(self, kinds: set[str], since: int, timeout: float,
                     flood: Callable[[], object] | None = None) -> list[dict]:
        """Events of `kinds` after `since`, waiting (flooding meanwhile, if given) until there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if flood:
                flood()
            else:
                time.sleep(0.1)
            found = [e for e in self.events(since) if e["kind"] in kinds and e["seq"] > since]
            if found:
                return found
        return []

    def attack(self, shape: Shape, frames_after_rule: int = 20_000, rule_timeout: float = 20.0,
               settle: float = 1.0, removal_timeout: float = 30.0) -> AttackOutcome:
        """One attack of `shape` while the client works; raises if no rule came within `rule_timeout`.

        The detector may refine its first rule (one fitted to the attack's first window) with
        broader ones: the attack goes on until no rule was added for `settle` seconds, then the
        drop share is measured over `frames_after_rule` more frames with the client quiet."""
        if shape.family not in self.warmed:
            self.warmed.add(shape.family)
            warm = Client(self.client, family=shape.family)
            warm.start()
            time.sleep(WARM_UP)
            warm.stop()
        since = self.last_seq()
        client = Client(self.client, family=shape.family)
        client.start()
        time.sleep(0.3)  # the client is at work before the attack starts
        with contextlib.ExitStack() as stack:
            generators = [stack.enter_context(TrafficGenerator(template, flows, self.backend))
                          for template, flows in shape.templates(self.attacker_mac, self.server_mac)]

            def flood() -> int:
                return self.flood(generators, BURST)

            try:
                started = time.monotonic()  # the agent's clock too (CLOCK_MONOTONIC)
                added = self._wait_events({"rule_added"}, since, rule_timeout, flood)
                if not added:
                    raise RuntimeError(f"{shape.name}: no rule within {rule_timeout:g} s; events: "
                                       f"{[e['kind'] for e in self.events(since)]}")
                first = added[0]
                before = self.stats()["packets"].get("drop_rule", 0)
                sent_since_rule, quiet_since = 0, time.monotonic()
                while time.monotonic() - quiet_since < settle and time.monotonic() - started < rule_timeout:
                    sent_since_rule += flood()
                    newer = [e for e in self.events(added[-1]["seq"]) if e["kind"] == "rule_added"]
                    if newer:
                        added += newer
                        quiet_since = time.monotonic()
                dropped_since_rule = self.stats()["packets"].get("drop_rule", 0) - before
            finally:
                tally = client.stop()
            # the drop share over a flood with the client quiet: the stage then sees attack frames only
            time.sleep(0.1)
            before = self.stats()["packets"]
            sent = self.flood(generators, frames_after_rule)
            after = self.stats()["packets"]
        dropped = after.get("drop_rule", 0) - before.get("drop_rule", 0)
        seen = sum(after.get(k, 0) - before.get(k, 0) for k in VERDICTS)
        names = {e["rule"]["name"] for e in added}
        deadline = time.monotonic() + removal_timeout
        removed: set[str] = set()
        while names - removed and time.monotonic() < deadline:
            time.sleep(0.2)
            removed = {e["rule"]["name"] for e in self.events(first["seq"]) if e["kind"] == "rule_removed"}
        # the next attack starts from a quiet state: the detector has let go of this one
        self._wait_events({"attack_ended"}, first["seq"], removal_timeout)
        return AttackOutcome(shape.name, first["time"] - started, added[-1]["time"] - started,
                             [e["rule"]["expression"] for e in added], sent_since_rule, dropped_since_rule,
                             sent, dropped, seen - dropped, tally, not names - removed, self.events(since))

    def close(self) -> None:
        if self.services is not None:
            self.services.close()
        self._agent("stop", "--socket", str(self.socket), "--detach")
        pidfile = self.socket.with_suffix(".pid")
        if pidfile.exists():
            subprocess.run(["kill", "-9", pidfile.read_text().strip()], capture_output=True)
        for link in self.links:
            link.close()
        if self.sink is not None:
            self.sink.close()
        pins.unpin(self.pin_root)
        shutil.rmtree(self.root, ignore_errors=True)


# --- `bpfnet bench detector` ---------------------------------------------------------------------


class ShapeRounds:
    """One attack per round and shape; its three figures become three scenarios (measured by
    the first, read by the next two, which run_scenarios calls right after it)."""

    def __init__(self, rig: DetectorRig, shape: Shape) -> None:
        self.rig, self.shape = rig, shape
        self.outcome: AttackOutcome | None = None

    def time_to_rule(self) -> float:
        outcome = self.outcome = self.rig.attack(self.shape)
        return 1000 * outcome.time_to_rule

    def drop_share(self) -> float:
        assert self.outcome is not None, "time_to_rule runs first"
        return 100 * self.outcome.drop_share_since_rule

    def client_success(self) -> float:
        assert self.outcome is not None, "time_to_rule runs first"
        return 100 * self.outcome.client.success_share


def attack_scenarios(rig: DetectorRig) -> list[Scenario]:
    scenarios = []
    for shape in [*SHAPES, *PATTERN_SHAPES, *IPV6_SHAPES]:
        rounds = ShapeRounds(rig, shape)
        scenarios += [
            Scenario(f"{shape.name}: time to rule (ms)", rounds.time_to_rule, "ms",
                     note="attack start to rule_added; range = best–worst round"),
            Scenario(f"{shape.name}: attack dropped (%)", rounds.drop_share, "%",
                     note="frames sent from the first rule on (refinements included)"),
            Scenario(f"{shape.name}: client ok (%)", rounds.client_success, "%",
                     note="TCP connections + UDP exchanges, 1 s timeouts"),
        ]
    return scenarios


# Sample streams for the throughput measurement: scapy frames with random fields, sampled (first
# 128 bytes) and parsed as the agent parses ring records.
SAMPLE_BYTES = 128
VICTIM = "198.51.100.10"


def _random_source(rng: random.Random) -> str:
    return ".".join(str(rng.randrange(1, 224 if i == 0 else 256)) for i in range(4))


def _legit(rng: random.Random, clients: list[str]):
    ip = IP(src=rng.choice(clients), dst=VICTIM, ttl=rng.randrange(44, 60), id=rng.randrange(65536), flags="DF")
    if rng.random() < 0.6:
        return ip / TCP(sport=rng.randrange(32768, 61000), dport=80, flags=rng.choice(["S", "A", "PA"]),
                        options=[("MSS", 1460)]) / (b"GET / HTTP/1.1\r\n" * rng.randrange(0, 4))
    return ip / UDP(sport=rng.randrange(32768, 61000), dport=53) / rng.randbytes(rng.randrange(20, 60))


def _syn_flood(rng: random.Random):
    return (IP(src=_random_source(rng), dst=VICTIM, ttl=rng.randrange(30, 250), id=rng.randrange(65536))
            / TCP(sport=rng.randrange(1024, 65536), dport=80, flags="S", window=rng.randrange(1, 65536)))


def _reflection(rng: random.Random):
    return (IP(src=_random_source(rng), dst=VICTIM, ttl=rng.randrange(30, 250), id=rng.randrange(65536))
            / UDP(sport=53, dport=rng.randrange(1024, 65536)) / (b"\x81\x80\x00\x01" + rng.randbytes(400)))


def sample_pool(make: Callable[[random.Random], object], size: int = 400, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(Ether() / make(rng))[:SAMPLE_BYTES] for _ in range(size)]


def throughput(attack: Callable[[random.Random], object] | None, windows: int = 80,
               per_window: int = 4000) -> float:
    """Samples/s the detector sustains on one core: `per_window` samples per 0.25 s window of
    simulated time, parsed (PacketFields.from_frame) and fed to observe() + decide(), timed with
    the wall clock. With `attack`, 90% of the second half's samples are attack samples."""
    from bpfnet.ddos.detector import Detector, DetectorConfig
    from bpfnet.ddos.fingerprint import PacketFields

    window = 0.25
    rng = random.Random(1)
    clients = [_random_source(rng) for _ in range(300)]
    legit = sample_pool(lambda r: _legit(r, clients), seed=2)
    flood = sample_pool(attack, seed=3) if attack else []
    batches = []
    for w in range(windows):
        attacked = flood and w >= windows // 2
        batch = rng.choices(legit, k=per_window // 10 if attacked else per_window)
        if attacked:
            batch += rng.choices(flood, k=per_window - len(batch))
        batches.append(batch)
    detector = Detector(DetectorConfig(sample_every=100, window=window, learning_time=5 * window))
    start = time.perf_counter()
    for w, batch in enumerate(batches):
        now = (w + 1) * window
        detector.observe([PacketFields.from_frame(frame) for frame in batch], now)
        detector.decide(now)
    return sum(map(len, batches)) / (time.perf_counter() - start) / 1000


THROUGHPUT_REFERENCE = "detector, normal traffic (k samples/s)"


def throughput_scenarios() -> list[Scenario]:
    note = "parsed + observed + decided, one core"
    return [Scenario(THROUGHPUT_REFERENCE, lambda: throughput(None), "k samples/s", note=note),
            Scenario("detector, syn flood (k samples/s)", lambda: throughput(_syn_flood), "k samples/s",
                     note=note),
            Scenario("detector, udp reflection (k samples/s)", lambda: throughput(_reflection), "k samples/s",
                     note=note)]

