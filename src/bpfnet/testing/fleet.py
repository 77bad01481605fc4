"""A fleet on one machine: hosts as network namespaces, each with its own bpfnet agent process
(own socket, pin root, podnet node) on one shared store, as the cluster issue describes them.

Each host `<prefix>-h<i>` has
- `mgmt0`, 10.97.<net>.<i+1>/24, on a bridge in the root namespace that holds .254: the management
  network where the store (etcd) listens; cutting a host off the store is taking mgmt0 down;
- `data0`, a veth whose peer stays in the root namespace: the interface the XDP apps attach to (the
  same name on every host, as a fleet's hosts have);
- an agent started inside the namespace (`nsenter --net`: only the network namespace changes, so
  bpffs and cgroups stay the machine's) with `--node h<i>` for the pod network.
Used by the cluster tests, `bpfnet bench cluster` and the lab.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bpfnet.app.client import AgentClient
from bpfnet.ebpf import Link, Object, ObjectSpec, pins
from bpfnet.netns import Topology
from bpfnet.netns.runtime import netns_path

BPFNET = Path(sys.executable).with_name("bpfnet")
MGMT_BRIDGE_SUFFIX = "mg"
STORE_HOST_OCTET = 254


@dataclass
class Host:
    index: int
    name: str  # h0, h1... : also its podnet node name
    netns: str
    address: str  # on the management network
    socket: Path
    pin_root: Path

    @property
    def pid_file(self) -> Path:
        return self.socket.with_suffix(".pid")


class Fleet:
    def __init__(self, prefix: str, size: int, *, net: int = 97, apps: str = "podnet,ddos,lb",
                 names: list[str] | None = None, directory: Path | None = None, data: bool = True) -> None:
        """`net`: the management network is 10.<net>.0.0/24. `names`: the hosts' names (default h0,
        h1...); `directory`: sockets and logs (default a new temporary one); `data`: give each host
        a data0 interface."""
        self.prefix = prefix
        self.apps = apps
        self.net = net
        self.topology = Topology(prefix)
        # short: unix socket paths max 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = data
        names = names or [f"h{i}" for i in range(size)]
        self.store_address = f"10.{net}.0.{STORE_HOST_OCTET}"  # the root namespace's side
        self._sink: Object | None = None
        self._links: list[Link] = []
        self.hosts = [Host(i, name, f"{prefix}-{name}", f"10.{net}.0.{i + 1}", self.dir / f"{name}.sock",
                           pins.PIN_ROOT / f"{prefix}-{name}") for i, name in enumerate(names[:size])]

    # -- network -------------------------------------------------------------------------------

    def build(self) -> Fleet:
        if self.data:
            self._sink = ObjectSpec.builtin("bench_sink").load()
        bridge = f"{self.prefix}{MGMT_BRIDGE_SUFFIX}"
        self.topology.bridge(bridge)
        self.topology.addr(bridge, f"{self.store_address}/24")
        for host in self.hosts:
            self.topology.netns(host.name)
            self.topology.veth("mgmt0", f"{self.prefix}m{host.index}", ns=host.netns)
            self.topology.set_master(f"{self.prefix}m{host.index}", bridge)
            self.topology.addr("mgmt0", f"{host.address}/24", ns=host.netns)
            if self._sink is not None:
                self.topology.veth("data0", f"{self.prefix}d{host.index}", ns=host.netns)
                # frames XDP_TX sends out of data0 reach its peer only if the peer runs XDP too
                self._links.append(self._sink.programs["xdp_pass"].attach_xdp(
                    socket.if_nametoindex(f"{self.prefix}d{host.index}")))
            self.topology.forwarding(True, ns=host.netns)
        return self

    def cut(self, host: Host) -> None:
        """The host loses the management network (and so the store); its data plane keeps going."""
        self.topology.down("mgmt0", ns=host.netns)

    def heal(self, host: Host) -> None:
        self.topology.up("mgmt0", ns=host.netns)

    # -- agents --------------------------------------------------------------------------------

    def start_agent(self, host: Host, store_url: str, *extra: str) -> subprocess.CompletedProcess:
        """`bpfnet agent --background` inside the host's namespace; returns the finished command."""
        argv = ["nsenter", f"--net={netns_path(host.netns)}", str(BPFNET), "agent", "--background",
                "--socket", str(host.socket), "--store", store_url, "--pin-root", str(host.pin_root),
                "--apps", self.apps, "--node", host.name, *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=180)

    def client(self, host: Host, timeout: float = 30.0) -> AgentClient:
        return AgentClient(host.socket, timeout=timeout)

    def agent_pid(self, host: Host) -> int | None:
        try:
            return int(host.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_agent(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """`kill -9` by default: no chance to clean up, as a crash."""
        pid = self.agent_pid(host)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop_agent(self, host: Host, *, detach: bool = True) -> None:
        args = ["agent", "stop", "--socket", str(host.socket)] + (["--detach"] if detach else [])
        done = subprocess.run([str(BPFNET), *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            self.kill_agent(host)

    def close(self) -> None:
        for host in self.hosts:
            self.stop_agent(host)
        for link in self._links:
            link.close()
        if self._sink is not None:
            self._sink.close()
        try:
            self.topology.close()
        finally:
            for host in self.hosts:
                pins.unpin(host.pin_root)
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()
