"""Kubernetes network-policy conformance with real sockets, cell by cell against the reference.

One node namespace with the 3x3 model (x, y, z × a, b, c, each serving 80/81 on TCP and UDP),
driven through PodnetController directly. Every case of bpfnet.testing.conformance is applied step
by step; after each step the 72 ordered pairs (the diagonal is ignored, as upstream) are probed in
parallel and compared with the reference evaluator. As upstream, cells that disagree are probed a
second time with a longer timeout before the case fails.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_conformance.py
"""

import socket
import threading
import uuid

import pytest

from bpfnet.ebpf import pins
from bpfnet.netns import inside, list_netns
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import Node
from bpfnet.podnet.controller import PodnetController
from bpfnet.podnet.probe import Probe, run_probes
from bpfnet.testing import reference
from bpfnet.testing.conformance import CASES, check_matrix, model_state, policy

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
NODE = Node(name="n1", pod_cidr="10.77.1.0/24", netns=f"pn-{TAG}")


@pytest.fixture(scope="module")
def cluster():
    root = pins.pin_dir(f"pn-{TAG}")
    controller = PodnetController(root)
    base = model_state([NODE])
    try:
        controller.start(base)
        yield controller, base
    finally:
        controller.stop(detach=True)
        pins.unpin(root)
        leftovers = [ns for ns in list_netns() if ns.startswith(f"pn-{TAG}")]
        assert not leftovers, leftovers


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance(cluster, case):
    controller, base = cluster
    controller.apply(base)
    state = base
    for step in case.steps:
        state = step.change(state)
        controller.apply(state)
        for port, protocol in step.probes:
            check_matrix(controller.state, port, protocol)


def test_node_reaches_isolated_pods_and_replies_return(cluster):
    controller, base = cluster
    controller.apply(base.model_copy(update={"policies": [policy("deny", "x", types=["Ingress", "Egress"])]}))
    target = controller.state.pod("x/a")
    with inside(NODE.netns):
        sock = socket.create_connection((str(target.address), 80), timeout=3)
    with sock:
        assert sock.recv(64) == b"x/a\n"
    assert controller.stats()["packets"]["delivered_ingress"] >= 1


def _listener(ns, port):
    with inside(ns):
        server = socket.create_server(("0.0.0.0", port))
    return server


def test_policy_change_keeps_allowed_connections_and_cuts_the_others(cluster):
    controller, base = cluster
    controller.apply(base)
    state = controller.state
    server = _listener(podnet_pods.pod_netns(NODE, state.pod("x/b")), 9000)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.extend(server.accept() for _ in range(2)))
    thread.start()
    clients = {}
    for name in ("y/a", "z/a"):
        with inside(podnet_pods.pod_netns(NODE, state.pod(name))):
            clients[name] = socket.create_connection((str(state.pod("x/b").address), 9000), timeout=3)
    thread.join(5)
    server.close()
    peers = {conn.getpeername()[0]: conn for conn, _ in accepted}
    try:
        def exchange(name):
            client = clients[name]
            conn = peers[str(state.pod(name).address)]
            try:
                client.sendall(b"ping")
                conn.settimeout(1.5)
                got = conn.recv(4)
                conn.sendall(b"pong")
                client.settimeout(1.5)
                return got == b"ping" and client.recv(4) == b"pong"
            except OSError:
                return False
        assert exchange("y/a") and exchange("z/a")
        # x/b now accepts port 9000 from namespace y only: y/a's connection lives on, z/a's is cut.
        controller.apply(base.model_copy(update={"policies": [policy(
            "p", "x", {"matchLabels": {"pod": "b"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                      "ports": [{"port": 9000}]}])]}))
        assert exchange("y/a")
        assert not exchange("z/a")
        assert exchange("y/a")
    finally:
        for sock in [*clients.values(), *peers.values()]:
            sock.close()


def test_agent_restart_adopts_the_running_data_plane(cluster):
    controller, base = cluster
    deny = base.model_copy(update={"policies": [policy("deny", "y", types=["Ingress"])]})
    controller.apply(deny)
    controller.stop(detach=False)  # programs stay attached, maps pinned
    try:
        assert check_matrix(deny.with_addresses(), 80, "TCP") == 72 - 3 * 8  # enforced while down
    finally:
        controller.start(deny)
    before = controller.dataplanes["n1"].revision
    controller.apply(deny)
    assert controller.dataplanes["n1"].revision == before  # adopted maps already matched
    check_matrix(controller.state, 81, "UDP")


def test_endpoint_query_shows_entries_with_hits(cluster):
    controller, base = cluster
    controller.apply(base.model_copy(update={"policies": [policy(
        "p", "x", {"matchLabels": {"pod": "a"}}, ingress=[{"ports": [{"port": 80, "endPort": 81}]}])]}))
    state = controller.state
    ok = run_probes([Probe(podnet_pods.pod_netns(NODE, state.pod("y/c")), state.pod("x/a").address, 81, "TCP")])
    assert ok == [True]
    shown = controller.query("endpoint", {"pod": "x/a"})
    assert shown["selected_by"] == {"Ingress": ["x/p"], "Egress": []}
    assert [(e["ports"], e["remote"]) for e in shown["entries"]] == [("TCP/80-81", "reserved:any")]
    assert shown["entries"][0]["hits"] >= 1
    rows = {r["name"]: r for r in controller.query("endpoints", {}) if r["namespace"] == "x"}
    assert rows["a"]["address"] == str(state.pod("x/a").address) and rows["a"]["identity"] >= 256


def test_two_nodes_each_enforce_policy_for_their_pods():
    nodes = [Node(name="n1", pod_cidr="10.77.2.0/24", netns=f"pn-{TAG}-n1"),
             Node(name="n2", pod_cidr="10.77.3.0/24", netns=f"pn-{TAG}-n2")]
    root = pins.pin_dir(f"pn-{TAG}-2n")
    controller = PodnetController(root)
    try:
        state = model_state(nodes, namespace_names=("x", "y"))
        controller.start(state.model_copy(update={"policies": [policy("deny", "x", types=["Ingress"])]}))
        state = controller.state
        assert sorted(controller.dataplanes) == ["n1", "n2"]
        same_node = [(a, b) for a in state.pods for b in state.pods if a is not b and a.node == b.node]
        probes = [Probe(podnet_pods.pod_netns(state.node(a.node), a), b.address, 80, "TCP")
                  for a, b in same_node]
        observed = run_probes(probes, 1.0)
        expected = [reference.allowed(state, a, b, 80, "TCP") for a, b in same_node]
        assert observed == expected and True in expected and False in expected
        for node in nodes:  # each node's ipcache knows every pod, its endpoints only its own
            actual = controller.dataplanes[node.name].actual()
            assert len(actual.endpoints) == sum(p.node == node.name for p in state.pods)
            assert all(any(p.address in prefix for prefix in actual.ipcache) for p in state.pods)
    finally:
        controller.stop(detach=True)
        pins.unpin(root)
    assert not [ns for ns in list_netns() if ns.startswith(f"pn-{TAG}-n")]
