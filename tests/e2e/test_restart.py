"""Restarts without loss: `kill -9` of the agent under steady traffic through the ddos stage and the
load balancer loses no packet and breaks no connection; the restarted agent adopts the pinned data
plane (the root stays attached, new stage programs are swapped in atomically) and restores its state."""

import io
import os
import signal
import socket
import threading
import time

import pytest
from rich.console import Console

from bpfnet.app.client import AgentClient
from bpfnet.ebpf import pins
from bpfnet.ebpf.chain import SLOTS, XdpChain
from bpfnet.lab import runner
from bpfnet.lab import site as lbsite
from bpfnet.netns import inside

pytestmark = pytest.mark.root


class SteadyTraffic:
    """One long-lived TCP echo connection and a stream of UDP exchanges through the VIP, every 10 ms."""

    def __init__(self, client_ns: str) -> None:
        with inside(client_ns):
            self.tcp = socket.create_connection((lbsite.VIP, lbsite.VIP_PORT), timeout=5)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.settimeout(2)
        self.tcp.sendall(b"ECHO\n")
        self.lines = self.tcp.makefile("rb")
        self.sent = self.echoed = self.udp_sent = self.udp_answered = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sent += 1
                self.tcp.sendall(b"%d\n" % self.sent)
                if self.lines.readline().split()[-1] == b"%d" % self.sent:
                    self.echoed += 1
                self.udp_sent += 1
                self.udp.sendto(b"%d" % self.udp_sent, (lbsite.VIP, lbsite.VIP_PORT))
                _, peer = self.udp.recvfrom(64)
                self.udp_answered += peer[0] == lbsite.VIP
            except OSError as error:
                self.errors.append(repr(error))
                return
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.tcp.close()
        self.udp.close()


@pytest.fixture(scope="module")
def lab():
    lab = runner.Lab(Console(file=io.StringIO()))
    try:
        lab.up()
        with lab.client() as client:
            client.put_state("lb", {"settings": {"interface": "eth0"}, "vips": [
                {"address": lbsite.VIP, "port": lbsite.VIP_PORT, "protocol": protocol,
                 "reals": [{"address": address} for address in lbsite.REALS.values()]}
                for protocol in ("tcp", "udp")]})
            client.put_state("ddos", {"interfaces": ["eth0"], "rules": [
                {"expr": "udp src port 53 and dst port 80", "comment": "reflection"}]})
        yield lab
    finally:
        lab.close()


def chain_programs() -> tuple[int, dict[int, int]]:
    chain = XdpChain.open(pins.pin_dir("xdp", root=runner.PIN_ROOT))
    try:
        return chain.root_program.id, chain.program_ids()
    finally:
        chain.close()


def test_kill_9_and_restart_lose_nothing(lab):
    with AgentClient(runner.SOCKET) as client:
        states = {app: client.get_state(app) for app in ("lb", "ddos")}
        pid = client.health()["pid"]
    root, stages = chain_programs()
    traffic = SteadyTraffic(lab.site.ns("client"))
    try:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        down_at = traffic.udp_answered
        lab.flood(20_000)  # the pinned ddos stage keeps dropping while nobody is home
        time.sleep(1.0)
        assert traffic.udp_answered > down_at and not traffic.errors  # forwarding went on
        runner.start_agent(lab.site.ns("lb"))
        time.sleep(1.0)
    finally:
        traffic.finish()
    assert not traffic.errors, traffic.errors
    assert traffic.echoed == traffic.sent  # one TCP connection, never broken, every line echoed
    assert traffic.udp_answered == traffic.udp_sent  # no exchange lost, all answered from the VIP
    with AgentClient(runner.SOCKET) as client:
        assert {app: client.get_state(app) for app in ("lb", "ddos")} == states
        assert client.health()["pid"] != pid
        rule = client.query("ddos", "rules")[0]
        assert rule["packets"] >= 18_000  # counted while the agent was down, kept across the restart
    new_root, new_stages = chain_programs()
    assert new_root == root  # the root never left the interface
    assert set(new_stages) == {SLOTS["ddos"], SLOTS["lb"]}
    assert all(new_stages[slot] != stages[slot] for slot in new_stages)  # new programs, swapped in
