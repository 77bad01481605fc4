"""A real container runtime calls bpfnet-cni: Debian's podman 4.3 with its CNI backend, a conflist
in a test-private config dir, an image imported from busybox-static's binary, a test-private
storage root, run root and tmpdir, and a real agent. Two containers get addresses from the node's
CIDR and reach each other, directly and through a service whose backend is a container, a
NetworkPolicy blocks what it should, `podman rm` leaves nothing.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_cni_podman.py
"""

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bpfnet.app.client import AgentClient
from bpfnet.ebpf import pins
from bpfnet.netns import run
from bpfnet.podnet.config import NetworkPolicy
from support.cni_runtime import plugin_dir

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
NODE_NS = f"cnip-{TAG}-n1"
NETWORK = f"bpfnet-{TAG}"
CIDR = IPv4Network("10.82.1.0/24")
IMAGE = f"localhost/bpfnet-busybox-{TAG}:1"
# what DESIGN.md found podman needs on these machines (no CAP_SYS_RESOURCE, hybrid cgroups)
RUN_FLAGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
SERVICE = {"namespace": "shop", "name": "web", "address": "10.96.0.10", "port": 80, "protocol": "TCP",
           "selector": {"app": "server"}, "target_port": 8080}
HELLO = "#!/bin/sh\necho hello from $(hostname)\n"
POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "only-trusted", "namespace": "shop"},
          "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "trusted"}}}]}]}}


class Podman:
    """podman with everything of its own under `base`: storage, run root, tmpdir, CNI configs."""

    def __init__(self, base: Path, cni_path: str) -> None:
        self.base = base
        self.conf_dir = base / "net.d"
        self.conf_dir.mkdir(parents=True)
        conf = base / "containers.conf"
        dirs = ", ".join(f'"{d}"' for d in cni_path.split(":"))
        conf.write_text(f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = [{dirs}]\n'
                        f'network_config_dir = "{self.conf_dir}"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.argv = ["podman", "--root", str(base / "root"), "--runroot", str(base / "runroot"),
                     "--tmpdir", str(base / "tmp"), "--events-backend", "none", "--storage-driver", "vfs",
                     "--cgroup-manager", "cgroupfs", "--runtime", "runc", "--network-backend", "cni"]

    def __call__(self, *args: str, check: bool = True, cni_args: str = "", timeout: float = 120):
        env = {**self.env, "CNI_ARGS": cni_args} if cni_args else self.env
        proc = subprocess.run([*self.argv, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc


def busybox_image(podman: Podman, workdir: Path) -> None:
    """An image of busybox-static's binary with its applets and a /bin/hello, imported (no registry)."""
    rootfs = workdir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "nc", "sleep", "ip", "hostname", "cat"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "bin" / "hello").write_text(HELLO)
    (rootfs / "bin" / "hello").chmod(0o755)
    with tarfile.open(workdir / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    podman("import", str(workdir / "rootfs.tar"), IMAGE)


@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", f"cnip-{TAG}") as sock:
        with AgentClient(sock) as client:
            client.put_state("podnet", {"nodes": [{"name": "n1", "pod_cidr": str(CIDR), "netns": NODE_NS}]})
        yield sock


@pytest.fixture(scope="module")
def podman(agent):
    workdir = Path(tempfile.mkdtemp(prefix=f"bpfnet-pm-{TAG}-"))  # podman wants a run root under 50 characters
    cgroups_before = set(Path("/sys/fs/cgroup").glob("*/libpod_parent"))
    tool = Podman(workdir / "podman", plugin_dir(workdir / "bin"))
    (tool.conf_dir / f"{NETWORK}.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": NETWORK,
        "plugins": [{"type": "bpfnet-cni", "agentSocket": str(agent), "node": "n1", "namespace": "shop"}]}))
    try:
        busybox_image(tool, workdir)
        yield tool
    finally:
        tool("rm", "--all", "--force", "--time", "0", check=False)
        tool("rmi", "--all", "--force", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        # cgroupfs leaves its (empty) parent cgroups: remove those this test made
        for parent in set(Path("/sys/fs/cgroup").glob("*/libpod_parent")) - cgroups_before:
            for cgroup in sorted(parent.glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()


def start(podman: Podman, name: str, labels: str, *command: str) -> str:
    podman("run", "--detach", *RUN_FLAGS, "--network", NETWORK, "--name", name, "--hostname", name, IMAGE, *command,
           cni_args=f"BPFNET_LABELS={labels}")
    return podman("inspect", "--format", f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}',
                  name).stdout.strip()


def fetch(podman: Podman, client: str, address: str, port: int = 8080) -> str:
    """What `nc` in container `client` reads from the server at `address:port` (empty when blocked)."""
    return podman("exec", client, "nc", "-w", "2", address, str(port), check=False, timeout=30).stdout.strip()


def test_podman_containers_on_bpfnet(agent, podman):
    server = start(podman, f"server-{TAG}", "app:server", "nc", "-ll", "-p", "8080", "-e", "/bin/hello")
    client = start(podman, f"client-{TAG}", "app:client", "sleep", "600")
    trusted = start(podman, f"trusted-{TAG}", "app:trusted", "sleep", "600")
    assert all(IPv4Address(a) in CIDR for a in (server, client, trusted)) and len({server, client, trusted}) == 3

    with AgentClient(agent) as api:
        pods = {p["name"]: p for p in api.query("podnet", "endpoints")}
        sandboxes = {p["name"]: p["sandbox"] for p in api.get_state("podnet")["pods"]}
    assert {n: (p["namespace"], p["address"], p["labels"]) for n, p in pods.items()} == {
        f"server-{TAG}": ("shop", server, {"app": "server"}),
        f"client-{TAG}": ("shop", client, {"app": "client"}),
        f"trusted-{TAG}": ("shop", trusted, {"app": "trusted"})}
    netns = {name: sandbox["netns"] for name, sandbox in sandboxes.items()}
    assert all(path.startswith("/run/netns/") and Path(path).exists() for path in netns.values())
    ids = {name: sandbox["container_id"] for name, sandbox in sandboxes.items()}
    assert ids[f"client-{TAG}"] == podman("inspect", "--format", "{{.Id}}", f"client-{TAG}").stdout.strip()

    assert fetch(podman, f"client-{TAG}", server) == f"hello from server-{TAG}"
    assert fetch(podman, f"trusted-{TAG}", server) == f"hello from server-{TAG}"
    shown = podman("exec", f"client-{TAG}", "ip", "-4", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in shown

    with AgentClient(agent) as api:   # a service whose backend is the server container
        api.update_state("podnet", lambda s: {**s, "services": [SERVICE]})
    assert fetch(podman, f"client-{TAG}", "10.96.0.10", 80) == f"hello from server-{TAG}"
    with AgentClient(agent) as api:
        assert [r["backends"] for r in api.query("podnet", "services")] == [[f"{server}:8080"]]
        served = api.stats("podnet")
    # the socket LB translated the container's connect(): its namespace is in the LB's scope
    assert served["service_connections"]["shop/web"] == 1 and served["service_fallback_flows"]["shop/web"] == 0

    with AgentClient(agent) as api:
        api.update_state("podnet", lambda s: {**s, "policies": [NetworkPolicy.model_validate(POLICY).dump()]})
    assert fetch(podman, f"client-{TAG}", server) == ""
    assert fetch(podman, f"client-{TAG}", "10.96.0.10", 80) == ""
    assert fetch(podman, f"trusted-{TAG}", server) == f"hello from server-{TAG}"
    assert fetch(podman, f"trusted-{TAG}", "10.96.0.10", 80) == f"hello from server-{TAG}"
    with AgentClient(agent) as api:
        assert api.stats("podnet")["packets"]["drop_policy_denied_ingress"] >= 1

    hosts = [line.split(":")[1].strip().split("@")[0] for line in run(NODE_NS, ["ip", "-o", "link"]).stdout.splitlines()
             if "lxc" in line]
    assert len(hosts) == 3
    podman("rm", "--force", "--time", "0", f"server-{TAG}", f"client-{TAG}", f"trusted-{TAG}")

    with AgentClient(agent) as api:
        state = api.get_state("podnet")
        assert state["pods"] == [] and api.stats("podnet")["identities"] == 0
        assert [r["backends"] for r in api.query("podnet", "services")] == [[]]   # the service has no backend left
    assert "lxc" not in run(NODE_NS, ["ip", "-o", "link"]).stdout
    assert not [r for r in run(NODE_NS, ["ip", "-4", "-o", "route"]).stdout.splitlines() if "lxc" in r]
    assert not [path for path in netns.values() if Path(path).exists()]   # podman removed its namespaces
    node_pins = pins.pin_dir(f"cnip-{TAG}") / "podnet" / "n1"
    assert list((node_pins / "links").glob("lxc*")) == []
    endpoints = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(next(node_pins.rglob("pod_endpoints")))],
                               capture_output=True, text=True, check=True).stdout
    assert json.loads(endpoints) == []
    cache = Path("/var/lib/cni/results")
    assert not [f for f in (cache.iterdir() if cache.exists() else []) if any(i in f.name for i in ids.values())]
