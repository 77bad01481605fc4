"""A SYN flood from spoofed sources against a real TCP server, answered by a syncookie rule: the
agent (ddos app) in the server namespace with the stage on its eth0, an attacker namespace sending
generated SYNs from 65,536 spoofed (address, port) pairs, and a client namespace opening real
connections meanwhile. XDP answers every SYN with a cookie; the client's cookie ACKs go to the
SYNPROXY table the agent installed, which opens the connection to the server. The flood never
reaches the server's stack: its passive opens are exactly the client's connections. IPv4 and
IPv6."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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

# Paced so no queue before XDP overflows (the rule's counters are compared exactly): 64 frames,
# then a short sleep, until stdin closes; says when it started, then how many it sent.
FLOOD = textwrap.dedent("""
    import select, socket, sys, time
    from bpfnet.bench.trafficgen import Flows, TrafficGenerator
    template = bytes.fromhex(sys.argv[1])
    flows = Flows(first_address=sys.argv[2], addresses=4096, first_port=1024, ports=16)
    sent = 0
    with TrafficGenerator(template, flows, backend="packet") as gen:
        ifindex = socket.if_nametoindex("eth0")
        while not select.select([sys.stdin], [], [], 0)[0]:
            gen.send(ifindex, 64)
            sent += 64
            if sent == 64:
                start = time.monotonic()
                print("flooding", flush=True)
            time.sleep(0.001)
    print(sent, time.monotonic() - start)
""")

# Opens connections one after another, each echoing a message; prints how many succeeded.
CLIENT_SCRIPT = textwrap.dedent(f"""
    import socket, sys
    ok = 0
    for i in range(int(sys.argv[1])):
        try:
            with socket.create_connection((sys.argv[2], {ECHO_PORT}), timeout=5) as conn:
                message = b"hello %d" % i
                conn.sendall(message)
                if conn.recv(100) == message:
                    ok += 1
        except OSError as err:
            print("failed:", err, file=sys.stderr)
    print(ok)
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
    state = tmp_path / "state.yaml"
    state.write_text("interfaces: [eth0]\nsample_every: 0\nrules: []\n")
    lab.cli("apply", "-f", str(state))
    lab.cli("rule", "add", f"tcp dst port {ECHO_PORT}", "--action", "syncookie", "--comment", "syn flood")
    [rule] = lab.cli("rule", "list", "-o", "json")
    assert (rule["action"], rule["in_force"]) == ("syncookie", True)
    # the agent installed SYNPROXY in the server namespace, for that port on eth0
    table = lab.topo.run(lab.server, ["nft", "list", "table", "inet", "bpfnet_synproxy"]).stdout
    assert f'iifname "eth0" tcp dport {ECHO_PORT} ct state invalid,untracked synproxy mss 1460 wscale 7' in table
    assert f'iifname "eth0" tcp dport {ECHO_PORT} ct state invalid,untracked synproxy mss 1440 wscale 7' in table
    assert lab.topo.get_sysctl("net.netfilter.nf_conntrack_tcp_loose", ns=lab.server) == "0"

    server = EchoServer(lab.server, server_address)
    try:
        before, client_before = netstat(lab, lab.server), netstat(lab, lab.client)
        server_mac = lab.topo.mac("eth0", ns=lab.server)
        attacker_mac = lab.topo.mac("eth0", ns=lab.attacker)
        ip = IP(src="10.200.0.1", dst=SERVER) if family == 4 else IPv6(src="2001:db8:200::1", dst=SERVER6)
        template = bytes(Ether(src=attacker_mac, dst=server_mac) / ip
                         / TCP(sport=1024, dport=ECHO_PORT, flags="S", seq=12345, window=64240,
                               options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                                        ("WScale", 7)]))
        flood = in_namespace(lab.attacker, FLOOD, template.hex(), ip.src, stdin=subprocess.PIPE)
        assert flood.stdout is not None and flood.stdout.readline() == "flooding\n", flood.stderr
        client = in_namespace(lab.client, CLIENT_SCRIPT, connections, server_address)
        out, err = client.communicate(timeout=120)
        flood_out, flood_err = flood.communicate(input="stop\n", timeout=30)
        assert flood.returncode == 0, flood_err
        flooded, seconds = int(flood_out.split()[0]), float(flood_out.split()[1])  # from the first frame
        succeeded = int(out)
        after, client_after = netstat(lab, lab.server), netstat(lab, lab.client)
        stats = lab.cli("stats", "-o", "json")
    finally:
        server.close()

    delta = {name: after[name] - before.get(name, 0) for name in after}
    client_retries = client_after["TcpExtTCPSynRetrans"] - client_before["TcpExtTCPSynRetrans"]
    print(f"flood {flooded} SYNs in {seconds:.2f} s, client {succeeded}/{connections} ({client_retries} SYNs "
          f"resent), counters {stats['packets']}, "
          f"server {({k: v for k, v in delta.items() if v and ('yn' in k or 'Listen' in k or 'Passive' in k)})}")
    assert succeeded >= connections * 999 // 1000, err  # the client's success rate, >= 99.9%
    assert flooded > 10 * connections
    packets = stats["packets"]
    # every SYN got its cookie in XDP: the flood's and each of the client's, resent ones included
    assert packets["syncookie_sent"] == flooded + connections + client_retries
    assert packets["syncookie_valid"] >= succeeded  # one cookie ACK a connection
    # the flood never reached the server's stack: it opened exactly the client's connections,
    # sent no cookie of its own, dropped nothing at its listen queue; SYNPROXY saw no SYN
    assert delta["TcpPassiveOpens"] == packets["syncookie_valid"] == delta["synproxy_cookie_valid"]
    assert delta["TcpExtSyncookiesSent"] == 0 and delta["TcpExtListenOverflows"] == 0
    assert delta["TcpExtListenDrops"] == 0 and delta["TcpExtTCPReqQFullDrop"] == 0
    assert delta["synproxy_syn_received"] == 0

    # the last syncookie rule gone, the agent removes its table and restores the sysctl
    lab.cli("rule", "del", str(rule["id"]))
    listed = lab.topo.run(lab.server, ["nft", "list", "tables"]).stdout
    assert "bpfnet_synproxy" not in listed
    assert lab.topo.get_sysctl("net.netfilter.nf_conntrack_tcp_loose", ns=lab.server) == "1"
