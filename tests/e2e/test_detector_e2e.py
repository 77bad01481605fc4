"""The detector end to end: an agent (ddos app, detector on) in a server namespace with the stage
on its interface; an attacker namespace floods UDP with a fixed payload while a client namespace
keeps talking TCP to the server. The detector must deploy a rule that drops the flood, leave the
client alone, and withdraw the rule after the flood. Assertions are on events and exact
outcomes (echo round trips, rule presence), never on rates."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bpfnet.ddos.cli import app as ddos_cli
from bpfnet.ebpf import pins
from bpfnet.netns import Topology, cleanup, inside

pytestmark = pytest.mark.root
PREFIX = "dt"
SERVER, CLIENT, ATTACKER = "10.78.0.1", "10.78.0.2", "10.78.0.3"
FLOOD_PORT, ECHO_PORT = 9999, 8080

FLOOD = textwrap.dedent(f"""
    import socket, sys, time
    seconds, count = float(sys.argv[1]), int(sys.argv[2])  # until either is reached
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 40000))  # one attack shape across runs: same source port
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end and sent < count:
        s.sendto(b"\\x13\\x37\\xca\\xfe" + b"x" * 60, ("{SERVER}", {FLOOD_PORT}))
        sent += 1
        if sent % 32 == 0:
            time.sleep(0.0005)  # paced, so the veth queue never overflows before XDP
    print(sent)
""")


class Lab:
    def __init__(self, topo: Topology, root: Path) -> None:
        self.server, self.client, self.attacker = topo.netns("srv"), topo.netns("cli"), topo.netns("atk")
        topo.bridge("dtbr0")
        for ns, name, address in ((self.server, "dtsrv", SERVER), (self.client, "dtcli", CLIENT),
                                  (self.attacker, "dtatk", ATTACKER)):
            topo.veth(name, "eth0", peer_ns=ns)
            topo.set_master(name, "dtbr0")
            topo.addr("eth0", f"{address}/24", ns=ns)
        self.socket = root / "agent.sock"
        self.pin_root = pins.pin_dir(f"dt-e2e-{uuid.uuid4().hex[:8]}")

    def agent(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.server}", sys.executable, "-m",
                               "bpfnet.agent", *args], capture_output=True, text=True, timeout=60)

    def cli(self, *args: str, parse: bool = True):
        result = CliRunner().invoke(ddos_cli, [*args, "--socket", str(self.socket)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if parse and "json" in args else result.stdout

    def events(self) -> list[dict]:
        lines = self.cli("events", "-n", "1000", "-o", "json", parse=False).splitlines()
        return [json.loads(line) for line in lines]  # one JSON object per line

    def flood(self, seconds: float, count: int = 10**9) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.attacker}", sys.executable, "-c",
                                 FLOOD, str(seconds), str(count)], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def lab():
    cleanup(PREFIX)
    root = Path(tempfile.mkdtemp(prefix="dt-"))
    with Topology(PREFIX) as topo:
        lab = Lab(topo, root)
        started = lab.agent("--socket", str(lab.socket), "--state-db", str(root / "state.db"),
                            "--apps", "ddos", "--pin-root", str(lab.pin_root), "--background")
        try:
            assert started.returncode == 0, started.stderr
            yield lab
        finally:
            lab.agent("stop", "--socket", str(lab.socket), "--detach")
            pidfile = lab.socket.with_suffix(".pid")
            if pidfile.exists():
                subprocess.run(["kill", "-9", pidfile.read_text().strip()], capture_output=True)
            pins.unpin(lab.pin_root)
            shutil.rmtree(root, ignore_errors=True)


class EchoServer:
    def __init__(self, ns: str) -> None:
        with inside(ns):
            self.tcp = socket.create_server((SERVER, ECHO_PORT))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)


def echo_round_trips(ns: str, rounds: int) -> int:
    with inside(ns):
        conn = socket.create_connection((SERVER, ECHO_PORT), timeout=10)
    ok = 0
    with conn:
        for i in range(rounds):
            message = f"hello {i}".encode()
            conn.sendall(message)
            if conn.recv(100) == message:
                ok += 1
    return ok


def wait_for(lab: Lab, kind: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in lab.events() if e["kind"] == kind]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {kind} event within {timeout} s: {[e['kind'] for e in lab.events()]}")


def test_detector_drops_a_flood_keeps_the_client_and_withdraws_the_rule(lab, tmp_path):
    state = tmp_path / "state.yaml"
    state.write_text(yaml.safe_dump({"interfaces": ["eth0"], "sample_every": 10, "rules": []}))
    lab.cli("apply", "-f", str(state))
    assert "detector off" in lab.cli("auto", "status")
    lab.cli("auto", "on", "--floor-pps", "2000", "--hold", "4s")
    settings = tmp_path / "detector.yaml"  # a short learning time for the test
    settings.write_text(yaml.safe_dump({"detector": {"attack_floor_pps": 2000, "hold_time": 4, "rule_ttl": 10,
                                                     "learning_time": 1, "window": 0.2}}))
    lab.cli("apply", "-f", str(settings))
    server = EchoServer(lab.server)
    flood = None
    try:
        assert echo_round_trips(lab.client, 100) == 100
        time.sleep(1.5)  # past the learning time
        started = time.monotonic()  # the agent's clock too (CLOCK_MONOTONIC)
        flood = lab.flood(4.0)
        added = wait_for(lab, "rule_added", timeout=8)
        print(f"rule added {added['time'] - started:.2f} s after the flood started: {added['rule']['expression']}")
        expression = added["rule"]["expression"]
        assert expression.startswith(f"dst host {SERVER} and udp and udp dst port {FLOOD_PORT}")
        assert "0x1337cafe" in expression or f"src host {ATTACKER}" in expression
        [rule] = [r for r in lab.cli("rule", "list", "-o", "json") if r["comment"].startswith("auto-1")]
        assert rule["in_force"] and rule["action"] == "drop"
        assert echo_round_trips(lab.client, 200) == 200  # the client is untouched during the flood
        assert int(flood.communicate(timeout=60)[0]) > 0
        # While the rule is in force (the hold time has not run out), every flood packet that reaches
        # the stage is dropped by it (a veth may lose a few before XDP sees them; none may pass)
        before = lab.cli("stats", "-o", "json")
        assert int(lab.flood(10.0, count=3000).communicate(timeout=60)[0]) == 3000
        stats = lab.cli("stats", "-o", "json")
        dropped = stats["rule_packets"][str(rule["id"])] - before["rule_packets"][str(rule["id"])]
        seen = sum(stats["packets"].get(k, 0) - before["packets"].get(k, 0)
                   for k in ("pass_no_match", "pass_rule", "drop_rule", "pass_limit", "drop_limit"))
        # (the stage also sees a few stray packets between the namespaces, ARP or late TCP
        # segments, which pass; a leaking rule would show hundreds)
        assert dropped >= 2900 and seen - dropped <= 20, (dropped, seen)
        assert stats["detector"]["enabled"] == 1 and stats["detector"]["rule_added"] == 1
        removed = wait_for(lab, "rule_removed", timeout=10)
        assert removed["rule"]["name"] == "auto-1"
        deadline = time.monotonic() + 5
        while any(r["comment"].startswith("auto-1") for r in lab.cli("rule", "list", "-o", "json")):
            assert time.monotonic() < deadline, "the detector's rule is still deployed"
            time.sleep(0.2)
        status = lab.cli("auto", "status", "-o", "json")
        assert status["enabled"] and status["attacks"] == [] and status["rules"] == []
        lab.cli("auto", "off")
        assert lab.cli("auto", "status", "-o", "json") == {"enabled": False}
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        server.tcp.close()
