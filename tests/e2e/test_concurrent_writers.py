"""Twenty writers at once, each on its own objects, through the CLI against a real agent (lb + ddos,
maps pinned): none fails, and afterwards the store, the API and the data plane agree.

Each writer is a person with a terminal: `bpfnet lb vip add`, `lb real add` x3, `lb real weight`,
`lb real del`, `ddos rule add`, `ddos rule del`, each a separate process. Before per-object writes
every one of these replaced the whole state and most of them failed with 412 under this load.
Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_concurrent_writers.py
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bpfnet.agent.store import SQLiteStore
from bpfnet.app.client import AgentClient
from bpfnet.ddos.config import DDOS_OBJECTS
from bpfnet.ebpf import pins
from bpfnet.lb.config import LB_OBJECTS

pytestmark = pytest.mark.root

TAG = "cw-" + secrets.token_hex(3)
PIN_ROOT = pins.PIN_ROOT / TAG
BPFNET = Path(sys.executable).with_name("bpfnet")
WRITERS = 20


@pytest.fixture
def agent():
    directory = Path(tempfile.mkdtemp(prefix="cw-"))
    socket = directory / "agent.sock"
    args = ["--socket", str(socket)]
    start = subprocess.run([str(BPFNET), "agent", "--background", *args, "--state-db", str(directory / "state.db"),
                            "--pin-root", str(PIN_ROOT), "--apps", "lb,ddos"],
                           capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        with AgentClient(socket) as client:
            client.put_state("lb", {"settings": {"max_vips": 32, "ring_size": 257, "max_reals": 256,
                                                 "conn_table_size": 1024}})
        yield directory, socket
    finally:
        stopped = subprocess.run([str(BPFNET), "agent", "stop", "--detach", *args], capture_output=True,
                                 text=True, timeout=120)
        pid_file = socket.with_suffix(".pid")
        if stopped.returncode != 0 and pid_file.exists():
            subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)
        pins.unpin(PIN_ROOT)
        shutil.rmtree(directory, ignore_errors=True)


def bpfnet(socket: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BPFNET), *args, "--socket", str(socket)], capture_output=True, text=True,
                          timeout=300)


def writer(socket: Path, n: int) -> list[str]:
    """One person's session; returns the commands that failed, with their output."""
    vip = f"10.77.{n}.1:80/tcp"
    steps = [("lb", "vip", "add", vip)]
    steps += [("lb", "real", "add", vip, f"10.78.{n}.{r}") for r in (1, 2, 3)]
    steps += [("lb", "real", "weight", vip, f"10.78.{n}.2", "5"), ("lb", "real", "del", vip, f"10.78.{n}.3"),
              ("ddos", "rule", "add", f"udp port {1000 + n}", "--comment", f"writer {n}"),
              ("ddos", "rule", "add", f"udp port {2000 + n}", "--comment", f"writer {n} temp")]
    failed = []
    for step in steps:
        done = bpfnet(socket, *step)
        if done.returncode != 0:
            failed.append(f"{' '.join(step)}: {done.stdout}{done.stderr}")
    # delete the temporary rule by the id the agent gave it
    with AgentClient(socket) as client:
        temp = [r["key"] for r in client.list_objects("ddos", "rules")
                if r["object"]["comment"] == f"writer {n} temp"]
    for key in temp:
        done = bpfnet(socket, "ddos", "rule", "del", key)
        if done.returncode != 0:
            failed.append(f"ddos rule del {key}: {done.stdout}{done.stderr}")
    return failed


def test_twenty_cli_writers_on_distinct_objects_all_succeed_and_store_api_and_maps_agree(agent):
    directory, socket = agent
    with ThreadPoolExecutor(WRITERS) as pool:
        failures = [f for failed in pool.map(lambda n: writer(socket, n), range(WRITERS)) for f in failed]
    assert failures == []

    with AgentClient(socket) as client:
        lb, revision = client.get_state_and_revision("lb")
        ddos = client.get_state("ddos")
        rings = {f"10.77.{n}.1:80/tcp": client.query("lb", "ring", vip=f"10.77.{n}.1:80/tcp") for n in range(WRITERS)}
        audit = client.audit(limit=1000, app="lb")
    assert sorted(v["address"] for v in lb["vips"]) == sorted(f"10.77.{n}.1" for n in range(WRITERS))
    for vip in lb["vips"]:
        n = vip["address"].split(".")[2]
        assert [(r["address"], r["weight"]) for r in vip["reals"]] == [(f"10.78.{n}.1", 1), (f"10.78.{n}.2", 5)]
    # the data plane's rings hold exactly those reals, shared by weight (1:5 of 257 slots)
    for vip, rows in rings.items():
        assert [(r["real"], r["weight"]) for r in rows] == [(r["address"], r["weight"]) for v in lb["vips"]
                                                             if f"{v['address']}:80/tcp" == vip for r in v["reals"]]
        assert sum(r["slots"] for r in rows) == 257 and rows[1]["slots"] > 3 * rows[0]["slots"]
    assert sorted(r["comment"] for r in ddos["rules"]) == sorted(f"writer {n}" for n in range(WRITERS))
    assert [e["outcome"] for e in audit].count("conflict") == 0
    assert revision == max(e["revision"] or 0 for e in audit)

    # the store holds exactly what the API reports (read while the agent runs: SQLite allows it)
    store = SQLiteStore(directory / "state.db")
    try:
        assert store.load("lb").whole(LB_OBJECTS) == lb
        assert store.load("ddos").whole(DDOS_OBJECTS) == ddos
    finally:
        store.close()
