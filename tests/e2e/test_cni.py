"""bpfnet-cni driven the way `cnitool` drives a plugin, with a real agent: namespaces made by the
test stand for the runtime's (a named one under /run/netns and a process's /proc/PID/ns/net), the
spec's variables and stdin, a conflist chaining Debian's reference `tuning` plugin after it.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_cni.py
"""

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bpfnet.app.client import AgentClient
from bpfnet.ebpf import pins
from bpfnet.netns import inside, run
from bpfnet.podnet.config import NetworkPolicy
from support.cni_runtime import BPFNET_CNI, call, chain, plugin_dir, tcp_exchange

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
NODE_NS = f"cni-{TAG}-n1"
CIDR = IPv4Network("10.81.1.0/24")
POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "only-trusted", "namespace": "shop"},
          "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "trusted"}}}]}]}}


@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", f"cni-{TAG}") as sock:
        with AgentClient(sock) as client:
            client.put_state("podnet", {"nodes": [{"name": "n1", "pod_cidr": str(CIDR), "netns": NODE_NS}]})
        yield sock
    assert not Path("/run/netns", NODE_NS).exists()


@pytest.fixture(scope="module")
def runtime():
    """Three 'containers': two named namespaces and one of a process (/proc/PID/ns/net)."""
    names = [f"cni-{TAG}-c1", f"cni-{TAG}-c2"]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        yield {"client": f"/run/netns/{names[0]}", "server": f"/run/netns/{names[1]}",
               "trusted": f"/proc/{holder.pid}/ns/net"}
    finally:
        holder.kill()
        holder.wait()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def conflist(agent, tmp_path_factory):
    return {"cniVersion": "1.0.0", "name": "bpfnet-test", "plugins": [
        {"type": "bpfnet-cni", "agentSocket": str(agent), "node": "n1", "namespace": "shop"},
        {"type": "tuning", "mtu": 1400, "sysctl": {"net.core.somaxconn": "4096"}}]}


@pytest.fixture(scope="module")
def cni_path(tmp_path_factory):
    return plugin_dir(tmp_path_factory.mktemp("cni-bin"))


def args(name, labels):
    return f"IgnoreUnknown=1;K8S_POD_NAME={name};BPFNET_LABELS={labels}"


def state(sock):
    with AgentClient(sock) as client:
        return client.get_state_and_revision("podnet")


def bpf_map(sock_name, name):
    """Entries of the node's pinned map `name` (bpftool's JSON)."""
    path = next((pins.pin_dir(f"cni-{TAG}") / "podnet" / "n1").rglob(name))
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def added(agent, runtime, conflist, cni_path):
    """ADD of the three containers: the client through the whole chain (bpfnet-cni, then tuning)."""
    results = {"client": chain("ADD", conflist, cni_path, container=f"{TAG}-client", netns=runtime["client"],
                               args=args("client", "app:client"))}
    for name in ("server", "trusted"):
        results[name] = chain("ADD", {**conflist, "plugins": conflist["plugins"][:1]}, cni_path,
                              container=f"{TAG}-{name}", netns=runtime[name], args=args(name, f"app:{name}"))
    for answer in results.values():
        assert answer.code == 0, answer.stdout + answer.stderr
    return {name: answer.output for name, answer in results.items()}


def address(result):
    return result["ips"][0]["address"].split("/")[0]


def test_add_result_follows_the_spec_and_the_chain_applied(added, runtime):
    client = added["client"]
    assert client["cniVersion"] == "1.0.0"
    host, pod = client["interfaces"]
    assert host["name"].startswith("lxc") and "sandbox" not in host
    assert pod == {"name": "eth0", "mac": pod["mac"], "sandbox": runtime["client"]}
    assert client["ips"] == [{"address": f"{address(client)}/32", "gateway": "169.254.1.1", "interface": 1}]
    assert client["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert client["dns"] == {}
    addresses = {IPv4Address(address(r)) for r in added.values()}
    assert len(addresses) == 3 and all(a in CIDR for a in addresses)
    assert added["trusted"]["interfaces"][1]["sandbox"] == runtime["trusted"]

    shown = run(runtime["client"], ["ip", "-j", "addr", "show", "eth0"]).stdout
    link = json.loads(shown)[0]
    assert link["address"] == pod["mac"] and link["mtu"] == 1400  # tuning ran after bpfnet-cni
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == [address(client)]
    with inside(runtime["client"]):
        assert Path("/proc/sys/net/core/somaxconn").read_text().strip() == "4096"
    routes = json.loads(run(runtime["client"], ["ip", "-j", "route"]).stdout)
    assert {"dst": "default", "gateway": "169.254.1.1", "dev": "eth0"}.items() <= routes[0].items()


def test_containers_reach_each_other_and_a_policy_blocks(agent, added, runtime):
    server, client, trusted = (address(added[n]) for n in ("server", "client", "trusted"))
    assert tcp_exchange(runtime["client"], runtime["server"], server, 8080) == f"hello {client}".encode()
    assert tcp_exchange(runtime["trusted"], runtime["server"], server, 8081) == f"hello {trusted}".encode()
    assert tcp_exchange(runtime["server"], runtime["client"], client, 8082) == f"hello {server}".encode()

    with AgentClient(agent) as api:
        api.update_state("podnet", lambda s: {**s, "policies": [NetworkPolicy.model_validate(POLICY).dump()]})
        endpoints = {e["name"]: e for e in api.query("podnet", "endpoints")}
    assert {e["labels"]["app"] for e in endpoints.values()} == {"client", "server", "trusted"}
    assert tcp_exchange(runtime["client"], runtime["server"], server, 8083, timeout=1.0) is None
    assert tcp_exchange(runtime["trusted"], runtime["server"], server, 8084) == f"hello {trusted}".encode()
    assert tcp_exchange(runtime["server"], runtime["client"], client, 8085) == f"hello {server}".encode()
    with AgentClient(agent) as api:
        assert api.stats("podnet")["packets"]["drop_policy_denied_ingress"] >= 1
        api.update_state("podnet", lambda s: {**s, "policies": []})
    assert tcp_exchange(runtime["client"], runtime["server"], server, 8086) == f"hello {client}".encode()


def test_check_passes_then_fails_after_a_change(agent, added, runtime, conflist, cni_path):
    client = dict(container=f"{TAG}-client", netns=runtime["client"], args=args("client", "app:client"))
    assert chain("CHECK", conflist, cni_path, prev_result=added["client"], **client).code == 0

    run(runtime["client"], ["ip", "addr", "add", "10.99.0.1/32", "dev", "eth0"])
    failed = chain("CHECK", conflist, cni_path, prev_result=added["client"], **client)
    assert failed.code == 1 and failed.error == 102, failed.stdout
    assert "has addresses" in failed.output["msg"] and "10.99.0.1/32" in failed.output["msg"]
    run(runtime["client"], ["ip", "addr", "del", "10.99.0.1/32", "dev", "eth0"])
    assert chain("CHECK", conflist, cni_path, prev_result=added["client"], **client).code == 0

    moved = {**added["client"], "ips": [{**added["client"]["ips"][0], "address": "10.81.1.200/32"}]}
    wrong = chain("CHECK", conflist, cni_path, prev_result=moved, **client)
    assert wrong.error == 102 and "the pod has" in wrong.output["msg"]

    run(runtime["server"], ["ip", "link", "set", "eth0", "down"])
    down = call(BPFNET_CNI, "CHECK", {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test",
                                      "prevResult": added["server"]},
                container=f"{TAG}-server", netns=runtime["server"])
    assert down.error == 102 and "eth0 is down" in down.output["msg"]
    run(runtime["server"], ["ip", "link", "set", "eth0", "up"])  # the routes went with the link
    routeless = call(BPFNET_CNI, "CHECK", {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test",
                                           "prevResult": added["server"]},
                     container=f"{TAG}-server", netns=runtime["server"])
    assert routeless.error == 102 and "no default route via 169.254.1.1 dev eth0" in routeless.output["msg"]
    run(runtime["server"], ["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])
    run(runtime["server"], ["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])

    unknown = call(BPFNET_CNI, "CHECK", {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "x",
                                         "prevResult": added["server"]},
                   container="never-added", netns=runtime["server"])
    assert unknown.error == 3


def test_a_restarted_agent_adopts_the_containers(agent, added, runtime, conflist, cni_path):
    def agent_cli(*argv):
        done = subprocess.run([sys.executable, "-m", "bpfnet.agent", *argv, "--socket", str(agent)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    server, client = address(added["server"]), address(added["client"])
    agent_cli("stop")  # the data plane stays
    try:
        assert tcp_exchange(runtime["client"], runtime["server"], server, 8090) == f"hello {client}".encode()
    finally:
        agent_cli("--state-db", str(Path(agent).parent / "state.db"), "--apps", "podnet",
                  "--pin-root", str(pins.pin_dir(f"cni-{TAG}")), "--background")
    for name in ("client", "server", "trusted"):  # same veths (index, MACs), addresses and routes
        answer = chain("CHECK", {**conflist, "plugins": conflist["plugins"][:1]}, cni_path,
                       prev_result=added[name], container=f"{TAG}-{name}", netns=runtime[name])
        assert answer.code == 0, answer.stdout
    assert tcp_exchange(runtime["client"], runtime["server"], server, 8091) == f"hello {client}".encode()


def test_errors_carry_the_spec_codes_and_change_nothing(agent, added, runtime, conflist):
    conf = {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test"}
    before = state(agent)
    cases = [
        (3, dict(conf=conf, container="c9", netns=f"/run/netns/cni-{TAG}-absent")),
        (2, dict(conf={**conf, "ipam": {"type": "host-local"}}, container="c9", netns=runtime["client"])),
        (1, dict(conf={**conf, "cniVersion": "0.3.1"}, container="c9", netns=runtime["client"])),
        (4, dict(conf=conf, container="c9", netns=runtime["client"], ifname="")),
        (4, dict(conf=conf, container="c9", netns=runtime["client"], args="K8S_POD_NAME=Bad_Name")),
        (100, dict(conf={**conf, "agentSocket": "/run/bpfnet-absent.sock"}, container="c9", netns=runtime["client"])),
        # the pod's name is taken by another container: the agent's state refuses it
        (101, dict(conf=conf, container="c9", netns=runtime["client"], ifname="eth1", args=args("server", "a:b"))),
    ]
    for code, kw in cases:
        answer = call(BPFNET_CNI, "ADD", kw.pop("conf"), **kw)
        assert (answer.code, answer.error) == (1, code), (code, answer.stdout, answer.stderr)
        assert answer.output["cniVersion"] in ("1.0.0", "0.3.1") and answer.output["msg"]
    assert state(agent) == before
    assert "eth1" not in run(runtime["client"], ["ip", "link"]).stdout


def test_del_twice_and_of_unknown_containers_leaves_nothing(agent, added, runtime, conflist, cni_path):
    hosts = [r["interfaces"][0]["name"] for r in added.values()]
    links_dir = pins.pin_dir(f"cni-{TAG}") / "podnet" / "n1" / "links"
    assert len(bpf_map(agent, "pod_endpoints")) == 3 and len(list(links_dir.glob("lxc*"))) == 6

    for name in ("client", "server", "trusted"):
        plugins = conflist if name == "client" else {**conflist, "plugins": conflist["plugins"][:1]}
        for _ in range(2):  # DEL twice
            answer = chain("DEL", plugins, cni_path, container=f"{TAG}-{name}", netns=runtime[name],
                           prev_result=added[name])
            assert (answer.code, answer.stdout) == (0, ""), answer.stdout + answer.stderr
    conf = {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test"}
    assert call(BPFNET_CNI, "DEL", conf, container="never-seen").code == 0          # unknown, no netns
    assert call(BPFNET_CNI, "DEL", conf, container=f"{TAG}-client", netns="/run/netns/gone").code == 0

    pods = state(agent)[0]
    assert pods["pods"] == [] and pods["nodes"][0]["name"] == "n1"
    node_links = run(NODE_NS, ["ip", "-o", "link"]).stdout
    assert not [h for h in hosts if h in node_links]
    for name in ("client", "server", "trusted"):                  # the runtime's namespaces stay
        assert Path(runtime[name]).exists()
        assert "eth0" not in run(runtime[name], ["ip", "-o", "link"]).stdout
    assert bpf_map(agent, "pod_endpoints") == []
    prefixes = {json.dumps(e["key"]) for e in bpf_map(agent, "pod_ipcache")}
    assert len(prefixes) == 1  # the node's router address alone: no pod /32 left
    assert list(links_dir.glob("lxc*")) == []
    with AgentClient(agent) as api:
        assert api.query("podnet", "endpoints") == [] and api.stats("podnet")["identities"] == 0
    assert not [r for r in run(NODE_NS, ["ip", "-4", "-o", "route"]).stdout.splitlines() if "lxc" in r]


def test_parallel_adds_and_dels_all_land(agent, conflist):
    """Runtimes start containers at once: each ADD's write is retried when another got in between."""
    conf = {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test"}
    names = [f"cni-{TAG}-p{i}" for i in range(4)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def add(i):
            return call(BPFNET_CNI, "ADD", conf, container=f"{TAG}-p{i}", netns=f"/run/netns/{names[i]}",
                        args=args(f"p{i}", "app:p"))
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(add, range(len(names))))
        assert [a.code for a in answers] == [0] * len(names), [a.stdout for a in answers]
        assert len({address(a.output) for a in answers}) == len(names)
        assert len(state(agent)[0]["pods"]) == len(names)
        with ThreadPoolExecutor(len(names)) as pool:
            dels = list(pool.map(lambda i: call(BPFNET_CNI, "DEL", conf, container=f"{TAG}-p{i}"), range(len(names))))
        assert [a.code for a in dels] == [0] * len(names), [a.stdout for a in dels]
        assert state(agent)[0]["pods"] == []
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_namespace_removed_without_del_blocks_nobody(agent, conflist):
    """The runtime deleted a namespace and never called DEL: other containers still come and go,
    the lost one has no endpoint, CHECK says why, and its DEL still succeeds."""
    conf = {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "bpfnet-test"}
    lost, other = f"cni-{TAG}-lost", f"cni-{TAG}-other"
    for name in (lost, other):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        first = call(BPFNET_CNI, "ADD", conf, container=f"{TAG}-lost", netns=f"/run/netns/{lost}",
                     args=args("lost", "a:b"))
        assert first.code == 0, first.stdout
        subprocess.run(["ip", "netns", "del", lost], check=True)
        second = call(BPFNET_CNI, "ADD", conf, container=f"{TAG}-other", netns=f"/run/netns/{other}",
                      args=args("other", "a:b"))
        assert second.code == 0, second.stdout
        assert len(bpf_map(agent, "pod_endpoints")) == 1   # the other's; the lost one has none
        checked = call(BPFNET_CNI, "CHECK", {**conf, "prevResult": first.output}, container=f"{TAG}-lost",
                       netns=f"/run/netns/{lost}")
        assert checked.error == 102 and "does not exist" in checked.output["msg"], checked.stdout
        for container in (f"{TAG}-lost", f"{TAG}-other"):
            assert call(BPFNET_CNI, "DEL", conf, container=container).code == 0
        assert state(agent)[0]["pods"] == [] and bpf_map(agent, "pod_endpoints") == []
        assert "lxc" not in run(NODE_NS, ["ip", "-o", "link"]).stdout
    finally:
        for name in (lost, other):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
