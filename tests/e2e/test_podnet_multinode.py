"""Three nodes joined by VXLAN: the Kubernetes network-policy conformance cases with the 3x3 model
spread over the nodes (each node holds one pod of each namespace, so 54 of the 72 pairs cross the
overlay), checked cell by cell with real sockets against the reference evaluator; and the tunnel
header seen on the fabric bridge carries the sending pod's identity as its VNI.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_multinode.py
"""

import socket
import struct
import threading
import time
import uuid
from ipaddress import IPv4Address

import pytest

from bpfnet.ebpf import pins
from bpfnet.netns import inside, list_netns
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import Node, Underlay
from bpfnet.podnet.controller import PodnetController
from bpfnet.podnet.probe import Probe, run_probes
from bpfnet.testing.conformance import CASES, check_matrix, model_state, policy

pytestmark = pytest.mark.root

TAG = "vx-" + uuid.uuid4().hex[:5]
NODES = [Node(name=f"n{i}", pod_cidr=f"10.79.{i}.0/24", netns=f"{TAG}-n{i}") for i in (1, 2, 3)]
UNDERLAY = Underlay(cidr="192.168.255.0/24", fabric_netns=f"{TAG}-fabric")
ETH_P_ALL = 0x0003


@pytest.fixture(scope="module")
def cluster():
    root = pins.pin_dir(TAG)
    controller = PodnetController(root)
    base = model_state(NODES).model_copy(update={"underlay": UNDERLAY})
    try:
        controller.start(base)
        yield controller, base
    finally:
        controller.stop(detach=True)
        pins.unpin(root)
        leftovers = [ns for ns in list_netns() if ns.startswith(TAG)]
        assert not leftovers, leftovers


def probe_of(state, a, b, port, protocol):
    pod = state.pod(a)
    return Probe(podnet_pods.pod_netns(state.node(pod.node), pod), state.pod(b).address, port, protocol)


def test_pods_are_spread_over_three_nodes_each_with_an_underlay_address(cluster):
    controller, _ = cluster
    state = controller.state
    assert {p.node for p in state.pods} == {"n1", "n2", "n3"}
    assert [str(n.underlay_address) for n in state.nodes] == ["192.168.255.1", "192.168.255.2",
                                                              "192.168.255.3"]
    for node in state.nodes:
        actual = controller.dataplanes[node.name].actual()
        remote = {p.address: state.node(p.node).underlay_address for p in state.pods
                  if p.node != node.name}
        tunnels = {prefix.network_address: entry[2] for prefix, entry in actual.ipcache.items()
                   if prefix.prefixlen == 32}
        assert {a: tunnels[a] for a in remote} == remote
        assert all(tunnels[p.address] == IPv4Address(0) for p in state.pods if p.node == node.name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_across_nodes(cluster, case):
    controller, base = cluster
    controller.apply(base)
    state = base
    for step in case.steps:
        state = step.change(state)
        controller.apply(state)
        for port, protocol in step.probes:
            check_matrix(controller.state, port, protocol)


def capture_vxlan(netns: str, ifname: str, until: float) -> list[tuple[str, str, int, int]]:
    """(outer source, outer destination, UDP destination port, VNI) of the frames seen."""
    with inside(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    seen = []
    with sock:
        sock.bind((ifname, 0))
        sock.settimeout(0.2)
        while time.monotonic() < until:
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            if len(frame) < 50 or frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_UDP:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            dport = struct.unpack_from("!H", frame, udp + 2)[0]
            vni = int.from_bytes(frame[udp + 12:udp + 15], "big")
            seen.append((socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), dport, vni))
    return seen


def test_tunnel_header_carries_the_senders_identity(cluster):
    controller, base = cluster
    controller.apply(base.model_copy(update={"policies": [policy("deny", "y", types=["Ingress"])]}))
    state = controller.state
    sender, allowed_target, denied_target = state.pod("x/a"), state.pod("x/b"), state.pod("y/b")
    assert (sender.node, allowed_target.node, denied_target.node) == ("n1", "n2", "n2")
    frames: list = []
    watcher = threading.Thread(target=lambda: frames.extend(
        capture_vxlan(UNDERLAY.fabric_netns, podnet_pods.fabric_ifname(state.node("n2")),
                      time.monotonic() + 2.0)))
    watcher.start()
    time.sleep(0.3)
    seen = controller.query("flows", {"last": 1})["seen"]
    results = run_probes([probe_of(state, "x/a", "x/b", 80, "TCP"),
                          probe_of(state, "x/a", "y/b", 80, "TCP")], 1.0)
    watcher.join()
    assert results == [True, False]
    n1, n2 = (str(state.node(n).underlay_address) for n in ("n1", "n2"))
    identities = controller.compiled.identities
    to_n2 = {vni for src, dst, port, vni in frames if (src, dst, port) == (n1, n2, 8472)}
    from_n2 = {vni for src, dst, port, vni in frames if (src, dst, port) == (n2, n1, 8472)}
    assert to_n2 == {identities["x/a"]}           # SYNs to both targets and the ACKs
    assert from_n2 == {identities["x/b"]}         # only the allowed target answered

    # Flow events: sent into the overlay on n1, refused by y/b's ingress policy on n2.
    denied = controller.query("flows", {"filters": ["--from-pod", "x/a", "--to-pod", "y/b"],
                                        "since_seen": seen})["flows"]
    by_node = {(f["node"], f["direction"], f["verdict"], f["drop_reason"]) for f in denied}
    assert by_node == {("n1", "egress", "FORWARDED", ""), ("n2", "ingress", "DROPPED", "POLICY_DENIED")}
    assert {f["source"]["identity"] for f in denied} == {identities["x/a"]}


def test_one_node_left_removes_the_fabric(cluster):
    controller, base = cluster
    one = base.model_copy(update={"nodes": base.nodes[:1],
                                  "pods": [p for p in base.pods if p.node == "n1"]})
    try:
        controller.apply(one)
        assert UNDERLAY.fabric_netns not in list_netns()
        assert not [ns for ns in list_netns() if ns.startswith(f"{TAG}-n2")]
        check_matrix(controller.state, 80, "TCP")
    finally:
        controller.apply(base)
    assert UNDERLAY.fabric_netns in list_netns()
    check_matrix(controller.state, 80, "TCP")
