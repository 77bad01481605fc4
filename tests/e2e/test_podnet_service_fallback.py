"""The services' tc fallback end to end, on two nodes joined by VXLAN: a client outside the
cluster (a namespace on the underlay fabric with a route for the service range via node n1) reaches
backends on n1 AND n2 over real TCP and UDP, the replies come from the service address; an ipBlock
policy on the backends refusing that client shows POLICY_DENIED drops; pods keep using the socket
LB (its counters move, the fallback's do not), except a pod sending through a raw socket, which the
fallback serves; and a pod reaches a service whose only backend is on the other node.

Run under the shared lock:
flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_service_fallback.py
"""

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from scapy.layers.inet import IP, UDP

from bpfnet.ebpf import pins
from bpfnet.netns import inside, list_netns
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import (
    ContainerPort,
    Namespace,
    Node,
    Pod,
    PodnetState,
    Protocol,
    Service,
    Underlay,
)
from bpfnet.podnet.controller import PodnetController
from bpfnet.testing.conformance import policy

pytestmark = pytest.mark.root

TAG = "svc7-" + uuid.uuid4().hex[:5]
NODES = [Node(name=f"n{i}", pod_cidr=f"10.77.{i}.0/24", netns=f"{TAG}-n{i}") for i in (1, 2)]
UNDERLAY = Underlay(cidr="192.168.255.0/24", fabric_netns=f"{TAG}-fabric")
OUTSIDE_NS = f"{TAG}-out"
OUTSIDE_ADDR = "192.168.255.200"
SERVICE_RANGE = "10.96.7.0/24"
VIP = "10.96.7.10"
REMOTE_ONLY_VIP = "10.96.7.11"
EMPTY_VIP = "10.96.7.12"
CLIENT = str(Path(__file__).with_name("socket_client.py"))
SERVED = [ContainerPort.serve(80, Protocol.TCP), ContainerPort.serve(80, Protocol.UDP)]


def base_state() -> PodnetState:
    pods = [("shop", "db-1", "n1", {"app": "db"}), ("shop", "db-2", "n2", {"app": "db"}),
            ("web", "client", "n1", {"app": "web"})]
    services = [Service(namespace="shop", name="db", address=VIP, port=80, protocol=proto,
                        selector={"app": "db"}, target_port=80) for proto in ("TCP", "UDP")]
    services[1] = services[1].model_copy(update={"name": "db-udp"})
    services.append(Service(namespace="shop", name="remote-only", address=REMOTE_ONLY_VIP, port=80,
                            backends=[{"pod": "db-2", "port": 80}]))
    services.append(Service(namespace="shop", name="empty", address=EMPTY_VIP, port=80,
                            selector={"app": "nothing"}, target_port=80))
    return PodnetState(
        nodes=NODES, underlay=UNDERLAY,
        namespaces=[Namespace(name="shop", labels={"team": "shop"}),
                    Namespace(name="web", labels={"team": "web"})],
        pods=[Pod(namespace=ns, name=name, node=node, labels=labels, ports=SERVED)
              for ns, name, node, labels in pods],
        services=services)


def plug_outside_client(n1_underlay: str) -> None:
    """A namespace standing for a machine outside the cluster, on the fabric bridge, with a route
    for the service range via node n1's underlay address."""
    pyroute2_netns.create(OUTSIDE_NS)
    podnet_pods.plug_outside(UNDERLAY, OUTSIDE_NS, OUTSIDE_ADDR, "svc7out")
    with inside(OUTSIDE_NS):
        ipr = IPRoute()
    try:
        ipr.route("add", dst=SERVICE_RANGE, gateway=n1_underlay)
    finally:
        ipr.close()


@pytest.fixture(scope="module")
def cluster():
    root = pins.pin_dir(TAG)
    controller = PodnetController(root)
    try:
        controller.start(base_state())
        plug_outside_client(str(controller.state.node("n1").underlay_address))
        yield controller
    finally:
        if OUTSIDE_NS in list_netns():
            pyroute2_netns.remove(OUTSIDE_NS)
        controller.stop(detach=True)
        pins.unpin(root)
        leftovers = [ns for ns in list_netns() if ns.startswith(TAG)]
        assert not leftovers, leftovers


def exchange(netns, address, count, protocol="tcp", port=80):
    """socket_client.py in `netns`: one outcome per try ([answer, peer] / "timeout" / ...)."""
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, CLIENT, address, str(port),
                          str(count), protocol], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def pod_netns(controller, key):
    pod = controller.state.pod(key)
    return podnet_pods.pod_netns(controller.state.node(pod.node), pod)


def rows(controller):
    return {r["name"]: r for r in controller.query("services", {})}


def flows(controller, **match):
    return [f for f in controller.recent_flows()
            if all(getattr(f, k) == v for k, v in match.items())]


def test_outside_client_reaches_backends_on_both_nodes_with_replies_from_the_service(cluster):
    before = rows(cluster)
    tcp = exchange(OUTSIDE_NS, VIP, 40)
    udp = exchange(OUTSIDE_NS, VIP, 40, "udp")
    assert {answer for answer, _ in tcp} == {"shop/db-1", "shop/db-2"}, tcp
    assert {answer for answer, _ in udp} == {"shop/db-1", "shop/db-2"}, udp
    assert {peer for _, peer in tcp + udp} == {VIP}
    after = rows(cluster)
    # Every connection is one new flow of the fallback (TIME_WAIT keeps connect() from reusing a
    # tuple), every datagram one translated packet (two sockets may draw the same UDP port: one
    # flow); the socket LB is not used by a namespace outside the cluster.
    assert after["db"]["fallback_flows"] - before["db"]["fallback_flows"] == 40
    assert after["db-udp"]["fallback_packets"] - before["db-udp"]["fallback_packets"] == 40
    assert (after["db"]["connects"], after["db-udp"]["datagrams"]) == (
        before["db"]["connects"], before["db-udp"]["datagrams"])
    translated = flows(cluster, verdict="TRANSLATED")
    assert {(f.source.address, f.destination.pod) for f in translated} >= {
        (OUTSIDE_ADDR, "db-1"), (OUTSIDE_ADDR, "db-2")}


def test_pods_use_the_socket_lb_not_the_fallback(cluster):
    before = rows(cluster)
    cluster.collect_flows()
    seen, sock_before = cluster.flows.seen, cluster.stats()["flows"]["by_type"]["sock"]
    tcp = exchange(pod_netns(cluster, "web/client"), VIP, 10)
    assert {answer for answer, _ in tcp} <= {"shop/db-1", "shop/db-2"} and len(tcp) == 10
    assert {peer for _, peer in tcp} == {VIP}
    after = rows(cluster)
    assert after["db"]["connects"] - before["db"]["connects"] == 10
    assert after["db"]["fallback_flows"] == before["db"]["fallback_flows"]
    assert after["db"]["fallback_packets"] == before["db"]["fallback_packets"]
    # Each connect() the socket LB translated is one TRANSLATED event naming client and backend.
    translated = [f for f in cluster.recent_flows(after=seen) if f.verdict == "TRANSLATED"]
    identities = cluster.compiled.identities
    assert len(translated) == 10
    assert cluster.stats()["flows"]["by_type"]["sock"] - sock_before == 10  # counted as socket LB events
    assert {(f.node, f.source.pod, f.source.identity, f.destination.port) for f in translated} == {
        ("n1", "client", identities["web/client"], 80)}
    assert {(f.destination.pod, f.destination.identity) for f in translated} <= {
        ("db-1", identities["shop/db-1"]), ("db-2", identities["shop/db-2"])}


def test_a_pods_raw_socket_is_served_by_the_fallback(cluster):
    """A datagram built by scapy and sent through a raw socket passes no socket hook: the
    fallback translates it; the reply comes back to a UDP socket from the service address."""
    client = cluster.state.pod("web/client")
    before = rows(cluster)
    answers = []
    for sport in range(47000, 47008):
        with inside(pod_netns(cluster, "web/client")):
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with receiver, raw:
            receiver.bind(("0.0.0.0", sport))
            receiver.settimeout(5)
            datagram = IP(src=str(client.address), dst=VIP) / UDP(sport=sport, dport=80) / b"hi"
            raw.sendto(bytes(datagram), (VIP, 0))
            data, peer = receiver.recvfrom(100)
            answers.append((data.decode().strip(), peer))
    assert {answer for answer, _ in answers} <= {"shop/db-1", "shop/db-2"}
    assert {peer for _, peer in answers} == {(VIP, 80)}
    after = rows(cluster)
    assert after["db-udp"]["fallback_flows"] - before["db-udp"]["fallback_flows"] == 8
    assert after["db-udp"]["datagrams"] == before["db-udp"]["datagrams"]


def test_a_pod_reaches_a_service_whose_only_backend_is_on_another_node(cluster):
    tcp = exchange(pod_netns(cluster, "web/client"), REMOTE_ONLY_VIP, 5)
    outside = exchange(OUTSIDE_NS, REMOTE_ONLY_VIP, 5)
    assert tcp == [["shop/db-2", REMOTE_ONLY_VIP]] * 5
    assert outside == [["shop/db-2", REMOTE_ONLY_VIP]] * 5


def test_an_empty_service_drops_the_outside_client_with_backend_not_found(cluster):
    assert exchange(OUTSIDE_NS, EMPTY_VIP, 1) == ["timeout"]
    dropped = flows(cluster, drop_reason="SERVICE_BACKEND_NOT_FOUND")
    assert dropped and {(f.source.address, f.destination.address) for f in dropped} == {
        (OUTSIDE_ADDR, EMPTY_VIP)}


def test_an_ipblock_policy_on_the_backends_refuses_the_outside_client(cluster):
    pods_only = policy("db-from-pods", "shop", {"matchLabels": {"app": "db"}},
                       ingress=[{"from": [{"ipBlock": {"cidr": "10.77.0.0/16"}}]}])
    cluster.apply(cluster.state.model_copy(update={"policies": [pods_only]}))
    try:
        assert exchange(OUTSIDE_NS, VIP, 4) == ["timeout"] * 4
        denied = flows(cluster, drop_reason="POLICY_DENIED")
        assert denied and {(f.source.address, f.direction) for f in denied} == {(OUTSIDE_ADDR, "ingress")}
        assert {f.destination.pod for f in denied} <= {"db-1", "db-2"}
    finally:
        cluster.apply(cluster.state.model_copy(update={"policies": []}))
    assert {answer for answer, _ in exchange(OUTSIDE_NS, VIP, 4)} <= {"shop/db-1", "shop/db-2"}
