"""A SYN flood from spoofed sources against a real TCP server, answered by a syncookie rule: the
agent (ddos app) in the server namespace with the stage on its eth0, an attacker namespace sending
generated SYNs from 65,536 spoofed (address, port) pairs, and a client namespace opening real
connections meanwhile. XDP answers every SYN with a cookie; the client's cookie ACKs go to the
SYNPROXY table the agent installed, which opens the connection to the server. The flood never
reaches the server's stack: its passive opens are exactly the client's connections. IPv4 and
IPv6."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bpfnet.ebpf import ObjectSpec
from support.ddos_lab import ECHO_PORT, DdosLab, EchoServer, ddos_lab

pytestmark = pytest.mark.root
PREFIX = "dsc"
SERVER, CLIENT, ATTACKER = "10.76.0.1", "10.76.0.2", "10.76.0.3"
SERVER6, CLIENT6, ATTACKER6 = "fd76::1", "fd76::2", "fd76::3"
CONNECTIONS = {4: 1000, 6: 500}
FLOOD_FRAMES = 100  # spoofed SYNs a client connection (at least)
SERVER_MTU = 1400  # the server's eth0, under the client's 1500: the SYN-ACK must advertise it
BULK = 1 << 20  # bytes one connection echoes through SYNPROXY (windows scaled, full segments)

# Paced so no queue before XDP overflows (the rule's counters are compared exactly): 64 frames,
# then a short sleep, until it has sent argv[3] frames; says when it started, then how many it
# sent and in how long. (A fixed count, not a fixed time: on a busy machine the flood, not the
# client, is what slows down.)
FLOOD = textwrap.dedent("""
    import socket, sys, time
    from bpfnet.bench.trafficgen import Flows, TrafficGenerator
    template = bytes.fromhex(sys.argv[1])
    flows = Flows(first_address=sys.argv[2], addresses=4096, first_port=1024, ports=16)
    sent, total = 0, int(sys.argv[3])
    with TrafficGenerator(template, flows, backend="packet") as gen:
        ifindex = socket.if_nametoindex("eth0")
        while sent < total:
            gen.send(ifindex, 64)
            sent += 64
            if sent == 64:
                start = time.monotonic()
                print("flooding", flush=True)
            time.sleep(0.001)
    print(sent, time.monotonic() - start)
""")

# Opens connections one after another, each echoing a message, until stdin closes and it has made
# at least argv[1]; prints how many succeeded and how many it tried.
CLIENT_SCRIPT = textwrap.dedent(f"""
    import select, socket, sys
    ok = tried = 0
    stop = False
    while not stop or tried < int(sys.argv[1]):
        stop = stop or bool(select.select([sys.stdin], [], [], 0)[0])
        tried += 1
        try:
            with socket.create_connection((sys.argv[2], {ECHO_PORT}), timeout=5) as conn:
                message = b"hello %d" % tried
                conn.sendall(message)
                if conn.recv(100) == message:
                    ok += 1
        except OSError as err:
            print("failed:", err, file=sys.stderr)
    print(ok, tried)
""")


# One connection that echoes BULK bytes (a thread sends while it reads), then prints what the
# SYN-ACK taught its TCP: the scale it applies to the server's windows and its sending MSS
# (TCP_INFO: byte 6 holds snd_wscale in its low nibble, snd_mss is the u32 at 16); it holds the
# connection open until stdin closes.
BULK_CLIENT = textwrap.dedent(f"""
    import socket, struct, sys, threading
    data = bytes(range(256)) * ({BULK} // 256)
    with socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=10) as conn:
        threading.Thread(target=conn.sendall, args=(data,), daemon=True).start()
        echoed = b""
        while len(echoed) < len(data) and (chunk := conn.recv(65536)):
            echoed += chunk
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        print(echoed == data, info[6] & 0xF, struct.unpack_from("I", info, 16)[0], flush=True)
        sys.stdin.read()
""")


# A connection opened before the syncookie rule: echoes a message, says so, waits for a line on
# stdin (the rule comes meanwhile, and the flood), then echoes another and says whether it came back.
HELD_CLIENT = textwrap.dedent(f"""
    import socket, sys
    with socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=5) as conn:
        for message in (b"before the rule", b"after the flood"):
            conn.sendall(message)
            try:
                print(conn.recv(100) == message, flush=True)
            except OSError as err:
                print(err, flush=True)
            sys.stdin.readline()
""")


def netstat(lab: DdosLab, ns: str) -> dict[str, int]:
    """A namespace's TCP counters (/proc/net/snmp and netstat) as nstat names them, and SYNPROXY's."""
    counters: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat", "/proc/net/stat/synproxy"):
        text = lab.topo.run(ns, ["cat", path]).stdout.splitlines()
        if path.endswith("synproxy"):  # a header, then one hex row per CPU
            names = text[0].split()
            for row in text[1:]:
                for name, value in zip(names, row.split(), strict=True):
                    counters[f"synproxy_{name}"] = counters.get(f"synproxy_{name}", 0) + int(value, 16)
            continue
        for header, values in zip(text[::2], text[1::2], strict=True):
            prefix, *names = header.split()
            for name, value in zip(names, values.split()[1:], strict=True):
                counters[prefix.rstrip(":") + name] = int(value)
    return counters


def in_namespace(ns: str, script: str, *args: object, stdin: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", script, *map(str, args)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def lab():
    with ddos_lab(PREFIX, (SERVER, CLIENT, ATTACKER)) as lab:
        yield lab


@pytest.mark.parametrize("family", [4, 6])
def test_a_spoofed_syn_flood_is_answered_in_xdp_while_real_clients_connect(lab, tmp_path, family):
    # XDP_TX frames of the server's veth reach the bridge only if its peer runs XDP too
    with ObjectSpec.builtin("bench_sink").load() as sink, \
            sink.programs["xdp_pass"].attach_xdp(lab.topo.ifindex(f"{PREFIX}srv")):
        run_flood(lab, tmp_path, family)


def run_flood(lab: DdosLab, tmp_path, family: int) -> None:
    server_address = SERVER if family == 4 else SERVER6
    connections = CONNECTIONS[family]
    if family == 6:
        for ns, address in ((lab.server, SERVER6), (lab.client, CLIENT6), (lab.attacker, ATTACKER6)):
            lab.topo.addr("eth0", f"{address}/64", ns=ns)
    lab.topo.run(lab.server, ["ip", "link", "set", "eth0", "mtu", str(SERVER_MTU)])
    mss = SERVER_MTU - (40 if family == 4 else 60)
    state = tmp_path / "state.yaml"
    state.write_text("interfaces: [eth0]\nsample_every: 0\nrules: []\n")
    lab.cli("apply", "-f", str(state))
    server = EchoServer(lab.server, server_address)
    held = in_namespace(lab.client, HELD_CLIENT, server_address, stdin=subprocess.PIPE)
    try:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline() == "True\n", held.stderr
        lab.cli("rule", "add", f"tcp dst port {ECHO_PORT}", "--action", "syncookie", "--comment", "syn flood")
        [rule] = lab.cli("rule", "list", "-o", "json")
        assert (rule["action"], rule["in_force"]) == ("syncookie", True)
        # the agent installed SYNPROXY in the server namespace, for that port on eth0, advertising
        # the MSS of eth0's MTU (the window scale is checked against the server's sockets below)
        table = synproxy_table(lab)
        for said in (SERVER_MTU - 40, SERVER_MTU - 60):
            assert (f'iifname "eth0" tcp dport {ECHO_PORT} ct state invalid,untracked synproxy mss {said} wscale '
                    in table)
        assert lab.topo.get_sysctl("net.netfilter.nf_conntrack_tcp_loose", ns=lab.server) == "0"
        # `ddos stats` shows it: the port, what eth0 advertises, the held connection entered into
        # conntrack, a server listening on the port
        proxy = lab.cli("stats", "-o", "json")["synproxy"]
        scale = proxy["interfaces"][0]["wscale"]
        assert proxy == {"state": "on", "ports": [ECHO_PORT], "adopted": 1, "ports_without_server": [],
                         "interfaces": [{"interface": "eth0", "mss4": SERVER_MTU - 40, "mss6": SERVER_MTU - 60,
                                         "wscale": scale}]}
        shown = lab.cli("stats")
        assert f"SYNPROXY on TCP ports {ECHO_PORT} (1 open connections adopted)" in shown
        assert re.search(rf"│ eth0\W+{SERVER_MTU - 40}\W+{SERVER_MTU - 60}\W+{scale}\W", shown), shown

        before, client_before = netstat(lab, lab.server), netstat(lab, lab.client)
        server_mac = lab.topo.mac("eth0", ns=lab.server)
        attacker_mac = lab.topo.mac("eth0", ns=lab.attacker)
        ip = IP(src="10.200.0.1", dst=SERVER) if family == 4 else IPv6(src="2001:db8:200::1", dst=SERVER6)
        template = bytes(Ether(src=attacker_mac, dst=server_mac) / ip
                         / TCP(sport=1024, dport=ECHO_PORT, flags="S", seq=12345, window=64240,
                               options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                                        ("WScale", 7)]))
        flood = in_namespace(lab.attacker, FLOOD, template.hex(), ip.src, FLOOD_FRAMES * connections)
        assert flood.stdout is not None and flood.stdout.readline() == "flooding\n", flood.stderr
        client = in_namespace(lab.client, CLIENT_SCRIPT, connections, server_address, stdin=subprocess.PIPE)
        flood_out, flood_err = flood.communicate(timeout=120)
        assert flood.returncode == 0, flood_err
        out, err = client.communicate(input="stop\n", timeout=120)  # it connected all through the flood
        flooded, seconds = int(flood_out.split()[0]), float(flood_out.split()[1])  # from the first frame
        succeeded, tried = map(int, out.split())
        after, client_after = netstat(lab, lab.server), netstat(lab, lab.client)
        stats = lab.cli("stats", "-o", "json")
        # the connection open before the rule still works: the agent entered it into conntrack
        # when the table came (with loose tracking off, conntrack would call its packets invalid)
        held.stdin.write("go on\n")
        held.stdin.flush()
        held_after = held.stdout.readline()
        held.communicate(input="\n", timeout=10)
    finally:
        server.close()
        if held.poll() is None:
            held.kill()

    delta = {name: after[name] - before.get(name, 0) for name in after}
    client_retries = client_after["TcpExtTCPSynRetrans"] - client_before["TcpExtTCPSynRetrans"]
    print(f"flood {flooded} SYNs in {seconds:.2f} s, client {succeeded}/{tried} ({client_retries} SYNs "
          f"resent), counters {stats['packets']}, "
          f"server {({k: v for k, v in delta.items() if v and ('yn' in k or 'Listen' in k or 'Passive' in k)})}")
    assert held_after == "True\n", held_after
    assert tried >= connections and succeeded >= tried * 999 // 1000, err  # the client's success rate, >= 99.9%
    assert flooded >= FLOOD_FRAMES * connections
    packets = stats["packets"]
    # every SYN got its cookie in XDP: the flood's and each of the client's, resent ones included
    assert packets["syncookie_sent"] == flooded + tried + client_retries
    assert packets["syncookie_valid"] >= succeeded  # one cookie ACK a connection
    # the flood never reached the server's stack: it opened exactly the client's connections,
    # sent no cookie of its own, dropped nothing at its listen queue; SYNPROXY saw no SYN
    assert delta["TcpPassiveOpens"] == packets["syncookie_valid"] == delta["synproxy_cookie_valid"]
    assert delta["TcpExtSyncookiesSent"] == 0 and delta["TcpExtListenOverflows"] == 0
    assert delta["TcpExtListenDrops"] == 0 and delta["TcpExtTCPReqQFullDrop"] == 0
    assert delta["synproxy_syn_received"] == 0

    check_what_the_synack_advertised(lab, server_address, mss)

    # the last syncookie rule gone, the table drains: SYNs reach the server again, SYNPROXY stays
    # for the connections it opened (their sequence numbers and timestamps), until DRAIN_SECONDS
    lab.cli("rule", "del", str(rule["id"]))
    listed = synproxy_table(lab)
    assert "(draining)" in listed and "notrack" not in listed and f"synproxy mss {mss - 100}" in listed


def check_what_the_synack_advertised(lab: DdosLab, server_address: str, mss: int) -> None:
    """SYNPROXY translates no window: the client must scale the server's windows by the server's
    own scale, which only the SYN-ACK from XDP told it; and must send no segment the server's
    smaller MTU would drop (a veth drops a frame over its MTU, silently: the echo would stall).
    Then an MTU change reaches XDP's next SYN-ACK and SYNPROXY's rule without a new rule."""
    for mtu in (SERVER_MTU, SERVER_MTU - 100):
        said = mss - (SERVER_MTU - mtu)
        lab.topo.run(lab.server, ["ip", "link", "set", "eth0", "mtu", str(mtu)])
        deadline = time.monotonic() + 10  # the agent measures again at its next tick
        while f"synproxy mss {said} " not in (table := synproxy_table(lab)) and time.monotonic() < deadline:
            time.sleep(0.2)
        intact, client_scale, client_mss, server_scale = bulk_echo(lab, server_address)
        print(f"MTU {mtu}: {BULK} bytes echoed: {intact}; the client scales the server's windows by "
              f"{client_scale}, the server's own scale {server_scale}; the client sends segments of "
              f"{client_mss} (MSS said {said})")
        assert intact
        assert client_scale == server_scale
        assert client_mss <= said
        assert f"synproxy mss {said} wscale {server_scale} " in table, table


def synproxy_table(lab: DdosLab) -> str:
    return lab.topo.run(lab.server, ["nft", "list", "table", "inet", "bpfnet_synproxy"]).stdout


def bulk_echo(lab: DdosLab, server_address: str) -> tuple[bool, int, int, int]:
    """BULK_CLIENT's connection: whether the echo came back whole, the client's scale of the
    server's windows, its sending MSS, and the server socket's own scale (ss, while it is open)."""
    server = EchoServer(lab.server, server_address)
    try:
        client = in_namespace(lab.client, BULK_CLIENT, server_address, stdin=subprocess.PIPE)
        assert client.stdout is not None
        line = client.stdout.readline()
        sockets = lab.topo.run(lab.server, ["ss", "-tinH", "state", "established",
                                            f"( sport = :{ECHO_PORT} )"]).stdout
        _, err = client.communicate(input="", timeout=30)
    finally:
        server.close()
    assert line, err
    intact, client_scale, client_mss = line.split()
    found = re.search(r"wscale:\d+,(\d+)", sockets)
    assert found, sockets
    return intact == "True", int(client_scale), int(client_mss), int(found.group(1))



# SYNs like the client's own (Linux: window 64240, TTL 64, DF, MSS/SACK/timestamp/window scale)
# from random sources of 10.76.0.0/16 (the client's among them), random ports and IP ids: nothing
# separates them from a real client's SYN. Paced at about `rate` a second until stdin closes.
LOOKALIKE_FLOOD = textwrap.dedent("""
    import random, select, socket, struct, sys, time
    server_mac, my_mac, server, port, rate = (bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]),
                                              socket.inet_aton(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    def csum(data):
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF
    rng, frames = random.Random(5), []
    for _ in range(20000):
        src = socket.inet_aton("10.76.%d.%d" % (rng.randrange(256), rng.randrange(1, 255)))
        options = (struct.pack("!BBH", 2, 4, 1460) + bytes([4, 2, 8, 10]) + struct.pack("!II", rng.getrandbits(32), 0)
                   + bytes([1, 3, 3, 10]))
        tcp = struct.pack("!HHIIBBHHH", rng.randrange(32768, 61000), port, rng.getrandbits(32), 0, 10 << 4, 0x02,
                          64240, 0, 0) + options
        tcp = tcp[:16] + struct.pack("!H", csum(src + server + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), rng.getrandbits(16), 0x4000, 64, 6, 0, src, server)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(server_mac + my_mac + b"\\x08\\x00" + ip + tcp)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind(("eth0", 0))
    print("flooding", flush=True)
    sent, start = 0, time.monotonic()
    while not select.select([sys.stdin], [], [], 0)[0]:
        for frame in frames[sent % 20000:sent % 20000 + 32]:
            sock.send(frame)
        sent += 32
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    print(sent)
""")

# Connects, echoes and closes, every 10 ms, until stdin closes; prints successes and attempts,
# and on stderr when (CLOCK_MONOTONIC, the same in every process) each failed attempt began.
STEADY_CLIENT = textwrap.dedent(f"""
    import select, socket, sys, time
    ok = tried = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        tried += 1
        began = time.monotonic()
        try:
            with socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=5) as conn:
                conn.sendall(b"hello")
                ok += conn.recv(100) == b"hello"
        except OSError as err:
            print("failed:", began, err, file=sys.stderr)
        time.sleep(0.01)
    print(ok, tried)
""")


def test_the_detector_answers_a_lookalike_syn_flood_with_a_syncookie_rule(lab, tmp_path):
    """SYNs no field separates from the client's: the detector finds no drop rule within its
    collateral bound and adds a syncookie rule for the port; the client keeps connecting; the rule
    and the SYNPROXY table go when the flood stops."""
    with ObjectSpec.builtin("bench_sink").load() as sink, \
            sink.programs["xdp_pass"].attach_xdp(lab.topo.ifindex(f"{PREFIX}srv")):
        state = tmp_path / "state.yaml"
        state.write_text("interfaces: [eth0]\nsample_every: 10\nrules: []\n")
        lab.cli("apply", "-f", str(state))
        lab.cli("auto", "on", "--floor-pps", "2000", "--hold", "3s")
        settings = tmp_path / "detector.yaml"
        settings.write_text("detector: {attack_floor_pps: 2000, hold_time: 3, rule_ttl: 10, learning_time: 1, "
                            "window: 0.2}\n")
        lab.cli("apply", "-f", str(settings))
        server = EchoServer(lab.server, SERVER)
        client = in_namespace(lab.client, STEADY_CLIENT, SERVER, stdin=subprocess.PIPE)
        flood = None
        try:
            time.sleep(3)  # the client's traffic is the port's baseline
            flood = in_namespace(lab.attacker, LOOKALIKE_FLOOD, lab.topo.mac("eth0", ns=lab.server).replace(":", ""),
                                 lab.topo.mac("eth0", ns=lab.attacker).replace(":", ""), SERVER, ECHO_PORT, 20000,
                                 stdin=subprocess.PIPE)
            assert flood.stdout is not None and flood.stdout.readline() == "flooding\n", flood.stderr
            started = time.monotonic()
            added = wait_for_event(lab, "rule_added", timeout=15)
            rule_seen = time.monotonic()
            print(f"rule {added['time'] - started:.2f} s after the flood: {added['rule']['expression']} "
                  f"({added['message']})")
            assert added["rule"]["action"] == "syncookie"
            assert added["rule"]["expression"] == (f"dst host {SERVER} and tcp and tcp dst port {ECHO_PORT} and "
                                                   "tcp[tcpflags] & (tcp-syn|tcp-ack) = (tcp-syn)")
            [rule] = [r for r in lab.cli("rule", "list", "-o", "json") if r["comment"].startswith("auto-")]
            assert rule["action"] == "syncookie" and rule["in_force"]
            table = lab.topo.run(lab.server, ["nft", "list", "table", "inet", "bpfnet_synproxy"]).stdout
            assert f'iifname "eth0" tcp dport {ECHO_PORT} ct state invalid drop' in table
            # the rule takes SYNs only: the client's cookie ACKs match no rule and pass to SYNPROXY
            before, deadline = netstat(lab, lab.server), time.monotonic() + 10
            while True:
                time.sleep(0.5)
                after = netstat(lab, lab.server)
                handed = after["synproxy_cookie_valid"] - before["synproxy_cookie_valid"]
                if handed >= 50 or time.monotonic() > deadline:
                    break
            opened = after["TcpPassiveOpens"] - before["TcpPassiveOpens"]
            stats = lab.cli("stats", "-o", "json")["packets"]
            assert stats["syncookie_sent"] > 10_000, stats
            # (the two counters are read a moment apart: a handshake may sit between them)
            assert handed >= 50 and abs(opened - handed) <= 1, (handed, opened)
            assert after["TcpExtSyncookiesSent"] == before["TcpExtSyncookiesSent"]  # the flood never reached it
            flood.communicate(input="stop\n", timeout=30)
            flood_stopped = time.monotonic()
            removed = wait_for_event(lab, "rule_removed", timeout=20)
            assert removed["rule"]["name"] == added["rule"]["name"]
            deadline = time.monotonic() + 5
            while "(draining)" not in lab.topo.run(lab.server, ["nft", "list", "table", "inet",
                                                                 "bpfnet_synproxy"]).stdout:
                assert time.monotonic() < deadline, "the SYNPROXY table does not drain after the detector's rule"
                time.sleep(0.2)
            drain_seen = time.monotonic()
            time.sleep(1)  # connections opened through SYNPROXY go on after the rule
            out, err = client.communicate(input="stop\n", timeout=30)
            ok, tried = map(int, out.split())
            print(f"client {ok}/{tried} {err.strip()!r}; in 2 s under the rule: {handed} connections through SYNPROXY, "
                  f"{stats['syncookie_sent']} cookies sent so far")
            # every attempt completes but, at most, a handshake under way while the table comes or
            # drains (one or two a run while loose tracking went off after the table; none in 8
            # runs since it goes off first): every failed one began while a switch was under way
            # (between the two times around it), and they stay under 1% of the client's attempts
            assert tried > 300, err
            began = [float(line.split()[1]) for line in err.splitlines() if line.startswith("failed:")]
            switches = [(started, rule_seen + 0.5), (flood_stopped, drain_seen + 0.5)]
            at_switches = [t for t in began if any(low - 0.5 <= t <= high for low, high in switches)]
            assert ok == tried - len(began) and at_switches == began, (switches, err)
            assert len(began) * 100 < tried, err
        finally:
            for proc in (flood, client):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            server.close()


def wait_for_event(lab: DdosLab, kind: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = lab.cli("events", "-n", "1000", "-o", "json", parse=False).splitlines()
        found = [e for e in map(json.loads, lines) if e["kind"] == kind]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {kind} event within {timeout} s")
