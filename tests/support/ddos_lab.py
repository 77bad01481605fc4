"""The e2e rig of the ddos app (tests/e2e/test_ddos_e2e.py, test_detector_e2e.py): a server, a
client and an attacker namespace on one bridge, an agent with the ddos app in the server namespace
(the stage on its eth0), the ddos CLI pointed at that agent, and a TCP echo server (with an optional
UDP sink) for the client's traffic."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bpfnet.ddos.cli import app as ddos_cli
from bpfnet.ebpf import pins
from bpfnet.netns import Topology, cleanup, inside

ECHO_PORT = 8080


class DdosLab:
    """`prefix` names the namespaces, links and pins; `addresses` are server, client and attacker in a /24."""

    def __init__(self, topo: Topology, root: Path, prefix: str, addresses: tuple[str, str, str]) -> None:
        self.topo = topo
        self.server, self.client, self.attacker = topo.netns("srv"), topo.netns("cli"), topo.netns("atk")
        self.server_address = addresses[0]
        topo.bridge(f"{prefix}br0")
        for ns, role, address in zip((self.server, self.client, self.attacker), ("srv", "cli", "atk"), addresses,
                                     strict=True):
            topo.veth(f"{prefix}{role}", "eth0", peer_ns=ns)
            topo.set_master(f"{prefix}{role}", f"{prefix}br0")
            topo.addr("eth0", f"{address}/24", ns=ns)
        self.socket = root / "agent.sock"
        self.pin_root = pins.pin_dir(f"{prefix}-e2e-{uuid.uuid4().hex[:8]}")

    def agent(self, *args: str) -> subprocess.CompletedProcess:
        # nsenter changes only the network namespace: the agent still sees /sys/fs/bpf
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.server}", sys.executable, "-m",
                               "bpfnet.agent", *args], capture_output=True, text=True, timeout=60)

    def cli(self, *args: str, parse: bool = True) -> Any:
        """`bpfnet ddos ARGS` against the lab's agent; with `-o json` (and `parse`), the parsed output."""
        result = CliRunner().invoke(ddos_cli, [*args, "--socket", str(self.socket)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if parse and "json" in args else result.stdout

    def attack(self, script: str, *args: object) -> subprocess.Popen:
        """Run a Python `script` in the attacker namespace (its stdout piped)."""
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.attacker}", sys.executable, "-c",
                                 script, *map(str, args)], stdout=subprocess.PIPE, text=True)


@contextmanager
def ddos_lab(prefix: str, addresses: tuple[str, str, str]) -> Iterator[DdosLab]:
    """A DdosLab with its agent running; torn down (agent, pins, namespaces) afterwards."""
    cleanup(prefix)
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    with Topology(prefix) as topo:
        lab = DdosLab(topo, root, prefix, addresses)
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
    """TCP echo server (and, given `udp_port`, a UDP sink) in namespace `ns` (a thread a connection;
    sockets made inside it)."""

    def __init__(self, ns: str, address: str, udp_port: int | None = None) -> None:
        with inside(ns):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            self.tcp = socket.create_server((address, ECHO_PORT), family=family)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if udp_port is not None else None
            if self.udp is not None:
                self.udp.bind((address, udp_port))
        if self.udp is not None:
            self.udp.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass  # the client reset it

    def udp_received(self) -> int:
        """Datagrams the sink received since the last call."""
        assert self.udp is not None, "no UDP sink"
        received = 0
        while True:
            try:
                self.udp.recv(2048)
                received += 1
            except TimeoutError:
                return received

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tcp.shutdown(socket.SHUT_RDWR)  # wakes the accept; a close alone leaves it listening
        self.tcp.close()
        if self.udp is not None:
            self.udp.close()


def echo_round_trips(ns: str, address: str, rounds: int) -> int:
    """Messages echoed back to a TCP client in `ns` out of `rounds`."""
    with inside(ns):
        conn = socket.create_connection((address, ECHO_PORT), timeout=10)
    ok = 0
    with conn:
        for i in range(rounds):
            message = f"hello {i}".encode()
            conn.sendall(message)
            if conn.recv(100) == message:
                ok += 1
    return ok
