"""etcd members on loopback for tests, the lab and benchmarks: each member with its own data
directory and free ports, all removed by `close()` (also after a failure, as a context manager).

    with EtcdCluster(3) as cluster:
        store = EtcdStore(cluster.endpoints)
        cluster.kill(0)          # SIGKILL one member; cluster.start_member(0) brings it back
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bpfnet.errors import BpfnetError

START_TIMEOUT = 30.0


class EtcdClusterError(BpfnetError):
    """etcd is missing, or a member did not start."""


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None

    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (all held at once, so they differ), released for etcd to bind."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EtcdCluster:
    """`size` etcd members on 127.0.0.1 in one new cluster, under a temporary directory."""

    def __init__(self, size: int = 1, *, binary: str = "etcd", extra_args: tuple[str, ...] = (),
                 host: str = "127.0.0.1", base: Path | None = None) -> None:
        """`host`: the address the members listen on (clients and peers), e.g. a fleet's management
        network's address in the root namespace. `base`: the directory of the members' data and
        logs (default: a new temporary one); `kill_leftovers(base)` ends members a crash left."""
        path = shutil.which(binary)
        if path is None:
            raise EtcdClusterError(f"{binary} is not installed: run scripts/setup.sh (Debian package etcd-server)")
        self.binary = path
        self.extra_args = extra_args
        self.token = f"bpfnet-test-{uuid.uuid4().hex[:8]}"
        self.base = Path(tempfile.mkdtemp(prefix="bpfnet-etcd-")) if base is None else base
        self.base.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * size)
        self.members = [EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], self.base / f"m{i}",
                                   self.base / f"m{i}.log", host=host) for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def start(self) -> EtcdCluster:
        try:
            for index in range(len(self.members)):
                self.start_member(index, wait=False)
            for index in range(len(self.members)):
                self.wait_healthy(index)
        except BaseException:
            self.close()
            raise
        return self

    def start_member(self, index: int, *, wait: bool = True) -> None:
        """Start (or restart, with its data) member `index`."""
        member = self.members[index]
        if member.running:
            return
        cluster = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)
        argv = [self.binary, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-client-urls", f"http://{member.endpoint}",
                "--advertise-client-urls", f"http://{member.endpoint}",
                "--listen-peer-urls", f"http://{member.host}:{member.peer_port}",
                "--initial-advertise-peer-urls", f"http://{member.host}:{member.peer_port}",
                "--initial-cluster", cluster, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--logger", "zap", *self.extra_args]
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              start_new_session=True)
        if wait:
            self.wait_healthy(index)

    def wait_healthy(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Until the member says it is healthy (it has a leader)."""
        member = self.members[index]
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not member.running:
                raise EtcdClusterError(f"etcd member {member.name} exited: {self._tail(member)}")
            try:
                answer = httpx.get(f"http://{member.endpoint}/health", timeout=1.0)
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    return
                last = answer.text[:200]
            except (httpx.HTTPError, ValueError) as err:
                last = str(err)
            time.sleep(0.05)
        raise EtcdClusterError(f"etcd member {member.name} not healthy after {timeout:.0f} s ({last}): "
                               f"{self._tail(member)}")

    @staticmethod
    def _tail(member: EtcdMember) -> str:
        try:
            lines = member.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " / ".join(lines[-3:])

    def kill(self, index: int) -> None:
        """SIGKILL member `index` (its data stays)."""
        self._signal(index, signal.SIGKILL)

    def stop(self, index: int) -> None:
        """SIGTERM member `index` and wait for it."""
        self._signal(index, signal.SIGTERM)

    def pause(self, index: int) -> None:
        """SIGSTOP member `index`: it holds its connections and answers nothing (a hung host)."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        process = self.members[index].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)

    def _signal(self, index: int, signum: int) -> None:
        process = self.members[index].process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        if signum != signal.SIGKILL:
            process.send_signal(signal.SIGCONT)  # a paused member must run to see a SIGTERM
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        for index in range(len(self.members)):
            with contextlib.suppress(OSError):
                self.kill(index)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill_leftovers(base: Path) -> int:
    """SIGKILL etcd processes whose data directory is under `base` (a run that crashed); how many."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"etcd") and any(str(base).encode() in arg for arg in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
    return killed
