"""The agent as a real process: background start, the API over its unix socket (mode 0600, peer
credentials in the audit log), stop, restart with state restored, and the TLS listener."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from bpfnet.app.client import AgentClient, AgentNotRunning, AgentRequestError
from bpfnet.testing.etcd import EtcdCluster

pytestmark = pytest.mark.root

DUMMY_APP = textwrap.dedent("""
    from pydantic import BaseModel, Field
    from bpfnet.app.controller import ApplyError, Controller

    class State(BaseModel):
        items: list[int] = []
        limit: int = Field(default=3, ge=1)

    class Dummy(Controller):
        name = "dummy"
        state_model = State

        def start(self, state):
            self.started_with = list(state.items)
            self.state = state

        def apply(self, state):
            if len(state.items) > state.limit:
                raise ApplyError(f"{len(state.items)} items exceed the limit {state.limit}")
            self.state = state

        def stats(self):
            return {"items": len(self.state.items), "started_with": len(self.started_with)}

        def stop(self, detach):
            self.pin_root.mkdir(parents=True, exist_ok=True)
            (self.pin_root / "stopped").write_text(f"detach={detach}")
""")


class AgentDir:
    """A private directory with the dummy app module, socket, state db and pidfile."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ag-"))  # short: unix socket paths max 107 bytes
        (self.root / "agdummy.py").write_text(DUMMY_APP)
        self.socket = self.root / "agent.sock"
        self.pidfile = self.root / "agent.pid"
        self.state_db = self.root / "state.db"
        self.env = {**os.environ, "PYTHONPATH": str(self.root)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "bpfnet.agent", *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"bpfnet agent {' '.join(args)} failed: {proc.stderr}")
        return proc

    def start(self, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("--socket", str(self.socket), "--state-db", str(self.state_db),
                        "--apps", "agdummy:Dummy", "--pin-root", str(self.root / "pins"),
                        "--background", *extra)

    def client(self) -> AgentClient:
        return AgentClient(self.socket)

    def kill_leftover(self) -> None:
        try:
            pid = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def agent_dir():
    d = AgentDir()
    try:
        yield d
    finally:
        if d.socket.exists():
            d.cli("stop", "--socket", str(d.socket), check=False)
        d.kill_leftover()
        shutil.rmtree(d.root, ignore_errors=True)


def test_background_agent_serves_stops_and_restores_state_on_restart(agent_dir):
    started = agent_dir.start()
    assert "agent started" in started.stdout

    mode = agent_dir.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    pid = int(agent_dir.pidfile.read_text())

    with agent_dir.client() as client:
        assert client.health()["pid"] == pid
        assert client.put_state("dummy", {"items": [1, 2]})["revision"] == 1
        with pytest.raises(AgentRequestError) as refused:
            client.put_state("dummy", {"items": [1, 2, 3, 4]})
        assert refused.value.status == 409
        assert str(refused.value) == "dummy refused the state: 4 items exceed the limit 3"
        assert client.get_state("dummy") == {"items": [1, 2], "limit": 3}
        audit = client.audit()
        assert [e["outcome"] for e in audit] == ["refused", "applied"]
        assert audit[1]["who"] == f"uid=0 pid={os.getpid()}"  # SO_PEERCRED of this test process

    assert "agent stopped" in agent_dir.cli("stop", "--socket", str(agent_dir.socket)).stdout
    assert not agent_dir.socket.exists() and not agent_dir.pidfile.exists()
    assert (agent_dir.root / "pins" / "stopped").read_text() == "detach=False"  # data plane left running
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(AgentNotRunning, match="agent not running at .*agent.sock: start it with "
                                              "`bpfnet agent --background`"):
        agent_dir.client().health()

    agent_dir.start()
    with agent_dir.client() as client:
        state, revision = client.get_state_and_revision("dummy")
        assert (state, revision) == ({"items": [1, 2], "limit": 3}, 1)
        assert client.stats("dummy") == {"items": 2, "started_with": 2}  # start() got the stored state
        assert len(client.audit()) == 2

    agent_dir.cli("stop", "--socket", str(agent_dir.socket), "--detach")
    assert (agent_dir.root / "pins" / "stopped").read_text() == "detach=True"


def test_status_and_errors_from_the_command_line(agent_dir):
    down = agent_dir.cli("status", "--socket", str(agent_dir.socket), check=False)
    assert down.returncode == 1
    assert down.stderr.strip() == (f"error: agent not running at {agent_dir.socket}: "
                                   "start it with `bpfnet agent --background`")
    assert agent_dir.cli("stop", "--socket", str(agent_dir.socket), check=False).returncode == 1

    agent_dir.start()
    status = agent_dir.cli("status", "--socket", str(agent_dir.socket), "-o", "json")
    assert '"dummy"' in status.stdout and '"status": "ok"' in status.stdout

    second = agent_dir.cli("--socket", str(agent_dir.socket), "--state-db", str(agent_dir.state_db),
                           "--apps", "agdummy:Dummy", "--background", check=False)
    assert second.returncode == 1
    assert "an agent already runs" in second.stderr

    bad_app = subprocess.run([sys.executable, "-m", "bpfnet.agent", "--socket", str(agent_dir.root / "b.sock"),
                              "--state-db", str(agent_dir.state_db), "--apps", "nosuchapp"],
                             capture_output=True, text=True, timeout=60, env=agent_dir.env)
    assert bad_app.returncode == 1
    assert bad_app.stderr.strip().startswith("error: unknown app 'nosuchapp': known apps are")
    assert not (agent_dir.root / "b.sock").exists()


def test_foreground_agent_stops_cleanly_on_sigterm(agent_dir):
    proc = subprocess.Popen([sys.executable, "-m", "bpfnet.agent", "--socket", str(agent_dir.socket),
                             "--state-db", str(agent_dir.state_db), "--apps", "agdummy:Dummy"],
                            env=agent_dir.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with agent_dir.client() as client:
                    client.put_state("dummy", {"items": [7]})
                break
            except AgentNotRunning:
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not agent_dir.socket.exists() and not agent_dir.pidfile.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_listener_needs_the_token(agent_dir):
    cert, key = agent_dir.root / "cert.pem", agent_dir.root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    refused = agent_dir.cli("--socket", str(agent_dir.socket), "--listen", "127.0.0.1:1", check=False)
    assert refused.returncode == 1 and "--listen needs --token" in refused.stderr

    port = _free_port()
    agent_dir.env["BPFNET_AGENT_TOKEN"] = "s3cret"
    agent_dir.start("--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key))
    url = f"https://127.0.0.1:{port}"
    with AgentClient(url=url, token="s3cret", verify=str(cert)) as remote:
        assert remote.put_state("dummy", {"items": [5]})["revision"] == 1
        assert remote.audit()[0]["who"] == "token@127.0.0.1"
    with AgentClient(url=url, token="wrong", verify=str(cert)) as intruder:
        with pytest.raises(AgentRequestError) as denied:
            intruder.get_state("dummy")
        assert denied.value.status == 401
    with AgentClient(url=url, verify=str(cert)) as anonymous:
        with pytest.raises(AgentRequestError, match="missing or wrong bearer token"):
            anonymous.put_state("dummy", {"items": []})
    with agent_dir.client() as local:
        assert local.get_state("dummy")["items"] == [5]


def test_agents_on_etcd_share_the_state_and_say_where_it_is():
    """Two agent processes, one after the other, on one etcd (`--store etcd://...`): the second
    starts from what the first wrote; status names the store; without etcd no agent starts."""
    with EtcdCluster(1) as etcd:
        url = f"{etcd.url}/e2e"
        first, second = AgentDir(), AgentDir()

        def start(d: AgentDir, check: bool = True) -> subprocess.CompletedProcess:
            return d.cli("--socket", str(d.socket), "--store", url, "--apps", "agdummy:Dummy",
                         "--pin-root", str(d.root / "pins"), "--background", check=check)
        try:
            start(first)
            health = json.loads(first.cli("status", "--socket", str(first.socket), "-o", "json").stdout)
            assert health["store"] == url
            with first.client() as client:
                revision = client.put_state("dummy", {"items": [1, 2]})["revision"]
            first.cli("stop", "--socket", str(first.socket))
            start(second)
            with second.client() as client:
                assert client.get_state_and_revision("dummy") == ({"items": [1, 2], "limit": 3}, revision)
                assert client.stats("dummy") == {"items": 2, "started_with": 2}
                assert [e["outcome"] for e in client.audit()] == ["applied"]
            second.cli("stop", "--socket", str(second.socket))
            both = first.cli("--socket", str(first.socket), "--store", url, "--state-db", str(first.state_db),
                             check=False)
            assert both.returncode == 1 and "give --store or --state-db, not both" in both.stderr
            etcd.stop(0)
            down = start(first, check=False)
            assert down.returncode == 1
            assert f"the store at {url} is unreachable" in down.stderr
        finally:
            for d in (first, second):
                d.kill_leftover()
                shutil.rmtree(d.root, ignore_errors=True)
