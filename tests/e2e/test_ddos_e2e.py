"""The ddos stage end to end: an agent (ddos app) in a server namespace with the stage on its
interface; an attacker namespace floods UDP while a client namespace talks TCP to the server.
Rules go in through the CLI; the assertions are on exact counters, never on rates."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from typer.testing import CliRunner

from bpfnet.app.client import AgentClient
from bpfnet.ddos.cli import app as ddos_cli
from bpfnet.ebpf import Map
from bpfnet.netns import Topology, cleanup
from support.ddos_lab import DdosLab, EchoServer, ddos_lab, echo_round_trips

pytestmark = pytest.mark.root
PREFIX = "dd"
SERVER, CLIENT, ATTACKER = "10.77.0.1", "10.77.0.2", "10.77.0.3"
FLOOD_PORT = 9999

FLOOD = textwrap.dedent(f"""
    import socket, sys, time
    count = int(sys.argv[1])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        s.sendto(b"flood" * 20, ("{SERVER}", {FLOOD_PORT}))
        if i % 32 == 31:
            time.sleep(0.0005)  # paced, so the veth queue never overflows before XDP
    print(count)
""")


@pytest.fixture
def lab():
    with ddos_lab(PREFIX, (SERVER, CLIENT, ATTACKER)) as lab:
        yield lab


def start_flood(lab: DdosLab, count: int) -> subprocess.Popen:
    return lab.attack(FLOOD, count)


def test_drop_rule_stops_the_flood_while_tcp_keeps_working(lab, tmp_path):
    state = tmp_path / "state.yaml"
    state.write_text(yaml.safe_dump({"interfaces": ["eth0"], "sample_every": 1, "rules": []}))
    lab.cli("apply", "-f", str(state))
    server = EchoServer(lab.server, SERVER, udp_port=FLOOD_PORT)
    try:
        # before any rule: the flood reaches the server's socket
        assert int(start_flood(lab, 500).communicate(timeout=60)[0]) == 500
        before = lab.cli("stats", "-o", "json")
        assert before["packets"]["pass_no_match"] >= 500
        assert server.udp_received() > 0

        lab.cli("rule", "add", f"udp dst port {FLOOD_PORT}", "--action", "drop", "--comment", "flood")
        [rule] = lab.cli("rule", "list", "-o", "json")
        assert (rule["id"], rule["packets"], rule["in_force"]) == (1, 0, True)

        # capture what the stage drops, as xdpcap would
        pcap = tmp_path / "drops.pcap"
        capture = subprocess.Popen([sys.executable, "-c", "from bpfnet.ddos.cli import app; app()", "capture",
                                    "-w", str(pcap), "-c", "5", "--pin-root", str(lab.pin_root),
                                    "--socket", str(lab.socket)],
                                   stderr=subprocess.PIPE, text=True)
        config = Map.from_pin(lab.pin_root / "ddos" / "ddos_config")
        deadline = time.monotonic() + 30
        while struct.unpack_from("<II", config.lookup(bytes(4)))[1] == 0:
            assert time.monotonic() < deadline and capture.poll() is None, "capture did not start"
            time.sleep(0.05)

        flood = start_flood(lab, 3000)
        assert echo_round_trips(lab.client, SERVER, 200) == 200  # the client's TCP works during the flood
        assert int(flood.communicate(timeout=60)[0]) == 3000
        assert capture.wait(timeout=30) == 0, capture.stderr.read()

        after = lab.cli("stats", "-o", "json")
        assert after["rule_packets"] == {"1": 3000}  # every flood packet after the swap, exactly
        assert after["packets"]["drop_rule"] == 3000
        assert server.udp_received() == 0
        dumped = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, check=True)
        lines = dumped.stdout.splitlines()
        assert len(lines) == 5 and all(f"{ATTACKER}." in ln and f"{SERVER}.{FLOOD_PORT}: UDP" in ln for ln in lines)

        # the samples feed `top`: the attacker is the top source of dropped packets
        top = lab.cli("top", "-o", "json")
        assert top["src"][0][0] == ATTACKER

        # removing the rule lets the flood through again
        lab.cli("rule", "del", "1")
        assert int(start_flood(lab, 200).communicate(timeout=60)[0]) == 200
        assert server.udp_received() > 0
        assert lab.cli("stats", "-o", "json")["rule_packets"] == {}
    finally:
        server.close()


def test_bad_rules_are_refused_with_the_reason_and_change_nothing(lab):
    result = CliRunner().invoke(ddos_cli, ["rule", "add", "udp port fifty", "--socket", str(lab.socket)])
    assert result.exit_code == 1 and "unknown port 'fifty'" in result.output
    with AgentClient(lab.socket) as client:
        before = client.get_state_and_revision("ddos")
        result = client._http.put("/v1/apps/ddos/state", json={"rules": [{"expr": "tcp and and"}]})
        assert result.status_code == 422 and "syntax error" in result.text
        result = client._http.put("/v1/apps/ddos/state", json={"interfaces": ["ddnosuch0"]})
        assert result.status_code == 409 and "no interface 'ddnosuch0'" in result.text
        assert client.get_state_and_revision("ddos") == before


def test_stage_in_the_xdp_chain_hands_passing_packets_to_the_next_stage():
    """ddos in slot 0 of the chain, a dropping stand-in for the load balancer in slot 1: packets the
    ddos stage passes reach slot 1, packets it drops do not."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from bpfnet.ddos.config import DdosState
    from bpfnet.ddos.dataplane import DdosDataplane
    from bpfnet.ebpf import ObjectSpec
    from bpfnet.ebpf.chain import SLOTS, XdpChain

    cleanup(PREFIX)
    frame = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=53))
    with Topology(PREFIX) as topo:
        topo.veth("ddch0", "ddch1")
        chain = XdpChain.attach(topo.ifindex("ddch0"))
        try:
            with DdosDataplane.load(chain=chain) as dp, ObjectSpec.builtin("bench_sink").load() as sink, \
                    chain.root() as root:
                assert root.test_run(frame).retval == 2  # ddos passes, slot 1 empty: XDP_PASS
                chain.set(SLOTS["lb"], sink.programs["xdp_drop"])
                assert root.test_run(frame).retval == 1  # passed on to the next stage, which drops
                dp.deploy(DdosState(rules=[{"expr": "udp", "action": "pass"}]).rules)
                assert root.test_run(frame).retval == 1
                assert dp.total_counts()["pass_rule"]["packets"] == 1
                chain.clear(SLOTS["lb"])
                dp.deploy(DdosState(rules=[{"expr": "udp", "action": "drop"}]).rules)
                assert root.test_run(frame).retval == 1
                assert dp.total_counts()["drop_rule"]["packets"] == 1
        finally:
            chain.detach()


def test_a_killed_capture_cannot_leave_the_capture_flag_set(lab, tmp_path):
    """Issue 14, defect 3: the capture flag belongs to the agent, on a lease the capture renews;
    kill -9 of the capture and the agent clears it, and an agent write meanwhile is not undone."""
    config = Map.from_pin(lab.pin_root / "ddos" / "ddos_config")

    def flags() -> tuple[int, int]:
        return struct.unpack_from("<II", config.lookup(bytes(4)))

    capture = subprocess.Popen([sys.executable, "-c", "from bpfnet.ddos.cli import app; app()", "capture",
                                "-w", str(tmp_path / "x.pcap"), "--pin-root", str(lab.pin_root),
                                "--socket", str(lab.socket)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while flags()[1] == 0:
            assert time.monotonic() < deadline and capture.poll() is None, "capture did not start"
            time.sleep(0.05)
        with AgentClient(lab.socket) as client:  # an agent write while the capture runs
            client.update_state("ddos", lambda state: {**state, "sample_every": 7})
        assert flags() == (7, 1)  # the agent's write kept the capture on
        capture.kill()  # kill -9: no chance to clean up
        capture.wait(timeout=10)
        deadline = time.monotonic() + 15
        while flags()[1] != 0:
            assert time.monotonic() < deadline, "the agent did not clear the capture flag"
            time.sleep(0.1)
        assert flags() == (7, 0)  # the agent's sample_every stays, the capture is off
    finally:
        if capture.poll() is None:
            capture.kill()
