"""The services' tc fallback in pod.bpf.c through BPF_PROG_TEST_RUN: a TCP/UDP packet to a service
address that no socket hook translated is DNATed to a backend (checksums fixed incrementally: the
expected frames are built by scapy from scratch), its backend's reply gets the service address back,
a flow keeps its backend, a service without backends drops with SERVICE_BACKEND_NOT_FOUND (158), and
clients outside the cluster are served by pod_from_netdev (local backend: into the pod after its
ingress policy; remote backend: into the overlay with the WORLD identity; the reply comes back
through the overlay and leaves with the service address).

Node n1 holds x/a, x/b (backends) and y/a (client); node n2 holds x/c. The maps are filled as the
controller fills them: desired_maps with an Overlay, and the service entries of services.entries.
"""

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfnet.ebpf.ringbuf import RingBuffer
from bpfnet.podnet.config import Service
from bpfnet.podnet.flows import decode
from bpfnet.podnet.services import service_ids
from bpfnet.testing.conformance import policy
from support.podnet_nodes import (
    CB_OFFSET,
    SKB_CTX,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UNDERLAY,
    VXLAN_IFINDEX,
    NodeHarness,
    TwoNodes,
)

pytestmark = pytest.mark.root

CLIENT = "192.168.255.50"        # outside the cluster, on the underlay
VIP = "10.96.0.10"
WORLD_IDENTITY = 2

PODS = {  # key: (node, address, labels, fake host-veth ifindex)
    "x/a": ("n1", "10.0.0.2", {"app": "db"}, 101),
    "x/b": ("n1", "10.0.0.3", {"app": "db"}, 102),
    "y/a": ("n1", "10.0.0.4", {"app": "web"}, 103),
    "x/c": ("n2", "10.0.1.2", {"app": "db"}, 0),
}
CLUSTER = TwoNodes(PODS)
pod_mac, gateway_mac, address = CLUSTER.pod_mac, CLUSTER.gateway_mac, CLUSTER.address


def service(name, backends, protocol="TCP", port=80, target=8080):
    return Service(namespace="x", name=name, address=VIP, port=port, protocol=protocol,
                   backends=[{"pod": b.split("/")[1], "port": target} for b in backends])


class Harness(NodeHarness):
    def __init__(self):
        super().__init__(CLUSTER, "svc7_shim")
        self.ring = RingBuffer(self.dp.flow_events)

    def from_netdev(self, frame):
        result = self.dp.from_netdev.test_run(bytes(frame), ctx=bytes(SKB_CTX))
        return result.retval, result.data, struct.unpack_from("<3I", result.ctx, CB_OFFSET)

    def service_counters(self, name):
        return self.dp.service_counters(service_ids(self.state)[f"x/{name}"])

    def flows(self):
        return [decode(raw, "n1", 0.0) for raw in self.ring.consume()]

    def close(self):
        self.ring.close()
        super().close()


@pytest.fixture
def node():
    h = Harness()
    h.apply()
    yield h
    h.close()


def frame(src_ip, dst_ip, l4, src_mac="02:00:00:00:00:67", dst_mac="02:ff:00:00:00:67", ttl=64):
    return Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip, ttl=ttl, id=7) / l4


def from_pod(key, dst, l4, ttl=64):
    return frame(address(key), dst, l4, pod_mac(key), gateway_mac(key), ttl)


def tcp(sport=40000, dport=80, flags="S"):
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=8192)


def udp(sport=40000, dport=80, payload=b"ping"):
    return UDP(sport=sport, dport=dport) / Raw(payload)


def rebuilt(sent, *, src=None, dst=None, sport=None, dport=None, into=None, ttl_less=0):
    """`sent` with addresses/ports replaced and every checksum computed afresh by scapy; `into`:
    routed into that local pod (gateway MACs)."""
    ip = IP(bytes(sent[IP]))
    l4 = ip.payload
    ip.src, ip.dst = src or ip.src, dst or ip.dst
    l4.sport, l4.dport = sport or l4.sport, dport or l4.dport
    ip.ttl -= ttl_less
    del ip.chksum, l4.chksum
    eth = Ether(src=gateway_mac(into), dst=pod_mac(into)) if into else Ether(bytes(sent)[:14])
    return bytes(eth / IP(bytes(ip)))


def backend_of(out):
    """(address, port) an output frame is sent to."""
    ip = IP(out[14:])
    return ip.dst, ip.payload.dport


# --- DNAT from a pod (a) and reverse NAT (c) ---------------------------------------------------------

def test_tcp_syn_from_a_pod_to_a_service_is_dnated_with_correct_checksums(node):
    node.apply([service("db", ["x/b"])])
    sent = from_pod("y/a", VIP, tcp())
    verdict, out, (target, _, _) = node.send("y/a", sent)
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["x/b"][3])
    assert out == rebuilt(sent, dst=address("x/b"), dport=8080, into="x/b", ttl_less=1)
    assert node.counters() == {("SERVICE_TRANSLATED", "EGRESS"): 1, ("FORWARDED", "EGRESS"): 1}
    assert node.service_counters("db") == {"flows": 1, "packets": 1}


def test_udp_to_a_service_is_dnated_and_a_zero_checksum_stays_zero(node):
    node.apply([service("dns", ["x/b"], "UDP", 53, 5353)])
    sent = from_pod("y/a", VIP, udp(dport=53))
    verdict, out, _ = node.send("y/a", sent)
    assert verdict == TC_ACT_REDIRECT
    assert out == rebuilt(sent, dst=address("x/b"), dport=5353, into="x/b", ttl_less=1)
    no_checksum = from_pod("y/a", VIP, UDP(sport=40001, dport=53, chksum=0) / Raw(b"ping"))
    verdict, out, _ = node.send("y/a", no_checksum)
    assert verdict == TC_ACT_REDIRECT
    assert UDP(out[34:]).chksum == 0 and IP(out[14:]).dst == address("x/b")


def test_the_backends_reply_gets_the_service_address_back(node):
    node.apply([service("db", ["x/b"])])
    node.send("y/a", from_pod("y/a", VIP, tcp(sport=40000)))
    reply = from_pod("x/b", address("y/a"), tcp(sport=8080, dport=40000, flags="SA"))
    verdict, out, (target, _, _) = node.send("x/b", reply)
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["y/a"][3])
    assert out == rebuilt(reply, src=VIP, sport=80, into="y/a", ttl_less=1)
    assert node.counters()[("SERVICE_REPLIED", "EGRESS")] == 1


def test_the_reply_of_a_remote_backend_is_reverse_nated_on_the_way_in(node):
    node.apply([service("db", ["x/c"], "UDP")])
    sent = from_pod("y/a", VIP, udp())
    verdict, out, (target, endpoint, tunnel_id) = node.send("y/a", sent)
    assert (verdict, target, tunnel_id) == (TC_ACT_REDIRECT, VXLAN_IFINDEX, node.identity("y/a"))
    assert endpoint == int.from_bytes(UNDERLAY["n2"].packed, "little")
    assert out == rebuilt(sent, dst=address("x/c"), dport=8080)  # the backend's node routes it
    reply = frame(address("x/c"), address("y/a"), udp(sport=8080, dport=40000, payload=b"pong"))
    verdict, out, target = node.from_overlay(reply, node.identity("x/c"))
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["y/a"][3])
    assert out == rebuilt(reply, src=VIP, sport=80, into="y/a", ttl_less=1)


def test_a_flow_keeps_its_backend_and_flows_spread_over_the_set(node):
    node.apply([service("db", ["x/a", "x/b"], "UDP")])
    chosen = {}
    for sport in range(41000, 41032):
        first = backend_of(node.send("y/a", from_pod("y/a", VIP, udp(sport=sport)))[1])
        again = backend_of(node.send("y/a", from_pod("y/a", VIP, udp(sport=sport)))[1])
        assert first == again
        chosen[sport] = first
    assert set(chosen.values()) == {(address(k), 8080) for k in ("x/a", "x/b")}
    assert node.service_counters("db") == {"flows": 32, "packets": 64}

    # A backend joins: the hash would move flows, but each existing flow keeps its backend.
    node.apply([service("db", ["x/a", "x/b", "x/c"], "UDP")])
    for sport, backend in chosen.items():
        assert backend_of(node.send("y/a", from_pod("y/a", VIP, udp(sport=sport)))[1]) == backend
    new = {backend_of(node.send("y/a", from_pod("y/a", VIP, udp(sport=sport)))[1])
           for sport in range(42000, 42032)}
    assert (address("x/c"), 8080) in new

    # A backend leaves: its flows pick again from the set, the others stay where they are.
    node.apply([service("db", ["x/a", "x/c"], "UDP")])
    for sport, backend in chosen.items():
        now = backend_of(node.send("y/a", from_pod("y/a", VIP, udp(sport=sport)))[1])
        if backend == (address("x/a"), 8080):
            assert now == backend
        else:
            assert now in {(address("x/a"), 8080), (address("x/c"), 8080)}


def test_a_new_tcp_connection_on_a_reused_port_picks_from_the_current_set(node):
    node.apply([service("db", ["x/b"])])
    sports = range(43000, 43016)
    for sport in sports:
        assert backend_of(node.send("y/a", from_pod("y/a", VIP, tcp(sport=sport)))[1]) == (address("x/b"), 8080)
    node.apply([service("db", ["x/a", "x/b"])])
    after_syn = set()
    for sport in sports:  # the connection goes on with its backend; a fresh SYN picks again
        assert backend_of(node.send("y/a", from_pod("y/a", VIP, tcp(sport=sport, flags="A")))[1]) == (
            address("x/b"), 8080)
        after_syn.add(backend_of(node.send("y/a", from_pod("y/a", VIP, tcp(sport=sport)))[1]))
    assert after_syn == {(address("x/a"), 8080), (address("x/b"), 8080)}


def test_policy_applies_to_the_real_backend(node):
    deny_web = policy("db-only-from-db", "x", {"matchLabels": {"app": "db"}},
                      ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}])
    node.apply([service("db", ["x/b"])], [deny_web])
    sent = from_pod("y/a", VIP, tcp())
    verdict, _, _ = node.send("y/a", sent)
    assert verdict == TC_ACT_SHOT
    assert node.counters()[("DROP_POLICY_DENIED", "INGRESS")] == 1
    dropped = [f for f in node.flows() if f.verdict == "DROPPED"]
    assert [(f.destination.address, f.destination.port, f.drop_reason) for f in dropped] == [
        (address("x/b"), 8080, "POLICY_DENIED")]


def test_translation_reports_a_translated_flow_event_naming_the_backend(node):
    node.apply([service("db", ["x/b"])])
    node.send("y/a", from_pod("y/a", VIP, tcp()))
    node.send("y/a", from_pod("y/a", VIP, tcp()))  # a retransmitted SYN: the same flow
    node.send("y/a", from_pod("y/a", VIP, tcp(flags="A")))
    flows = node.flows()
    translated = [f for f in flows if f.verdict == "TRANSLATED"]
    assert len(translated) == 1  # once per flow
    assert node.service_counters("db") == {"flows": 1, "packets": 3}
    event = translated[0]
    assert (event.source.address, event.source.identity) == (address("y/a"), node.identity("y/a"))
    assert (event.destination.address, event.destination.port, event.destination.identity) == (
        address("x/b"), 8080, node.identity("x/b"))
    assert event.direction == "egress" and event.protocol == "TCP"


def test_a_service_without_backends_drops_with_reason_158(node):
    node.apply([service("empty", [])])
    sent = from_pod("y/a", VIP, tcp())
    assert node.send("y/a", sent)[:2] == (TC_ACT_SHOT, bytes(sent))
    assert node.counters() == {("DROP_NO_SERVICE_BACKEND", "EGRESS"): 1}
    [event] = node.flows()
    assert (event.verdict, event.drop_reason) == ("DROPPED", "SERVICE_BACKEND_NOT_FOUND")
    assert (event.destination.address, event.destination.port) == (VIP, 80)


def test_other_ports_and_protocols_of_the_service_address_are_left_alone(node):
    node.apply([service("db", ["x/b"])])
    for sent in (from_pod("y/a", VIP, tcp(dport=81)), from_pod("y/a", VIP, udp(dport=80))):
        verdict, out, _ = node.send("y/a", sent)
        assert (verdict, out) == (TC_ACT_OK, bytes(sent))
    assert "SERVICE_TRANSLATED" not in {o for o, _ in node.counters()}


@pytest.mark.parametrize("raw", [
    bytes(from_pod("y/a", VIP, tcp()))[:14 + 20 + 14],   # ports and flags, but no checksum
    bytes(from_pod("y/a", VIP, tcp()))[:14 + 20 + 2],    # not even both ports
    bytes(from_pod("y/a", VIP, udp()))[:14 + 20 + 6],    # UDP header cut before its checksum
])
def test_truncated_packets_to_a_service_are_dropped_unchanged_without_state(node, raw):
    node.apply([service("db", ["x/b"]), service("dns", ["x/b"], "UDP")])
    verdict, out, _ = node.send("y/a", raw)
    assert (verdict, out) == (TC_ACT_SHOT, raw)
    assert node.counters() == {("DROP_INVALID_PACKET", "EGRESS"): 1}
    assert not list(node.dp.obj.maps["pod_svc_flows"].keys())


# --- clients outside the cluster (b) -----------------------------------------------------------------

def outside(dst, l4):
    return frame(CLIENT, dst, l4, "02:aa:00:00:00:01", "02:bb:00:00:00:01")


def test_outside_client_is_served_by_a_local_backend(node):
    node.apply([service("db", ["x/b"])])
    sent = outside(VIP, tcp())
    verdict, out, (target, _, _) = node.from_netdev(sent)
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["x/b"][3])
    assert out == rebuilt(sent, dst=address("x/b"), dport=8080, into="x/b", ttl_less=1)
    # The backend's reply leaves through the stack with the service address as its source.
    reply = from_pod("x/b", CLIENT, tcp(sport=8080, dport=40000, flags="SA"))
    verdict, out, _ = node.send("x/b", reply)
    assert verdict == TC_ACT_OK
    assert out == rebuilt(reply, src=VIP, sport=80)
    assert node.counters() == {("SERVICE_TRANSLATED", "INGRESS"): 1, ("FORWARDED", "INGRESS"): 1,
                               ("SERVICE_REPLIED", "EGRESS"): 1, ("TO_STACK", "EGRESS"): 1}


def test_outside_client_to_a_remote_backend_goes_into_the_overlay_as_world(node):
    node.apply([service("db", ["x/c"], "UDP")])
    sent = outside(VIP, udp())
    verdict, out, (target, endpoint, tunnel_id) = node.from_netdev(sent)
    assert (verdict, target, tunnel_id) == (TC_ACT_REDIRECT, VXLAN_IFINDEX, WORLD_IDENTITY)
    assert endpoint == int.from_bytes(UNDERLAY["n2"].packed, "little")
    assert out == rebuilt(sent, dst=address("x/c"), dport=8080)
    # The reply comes back through the overlay; this node holds the NAT and hands it to the stack.
    reply = frame(address("x/c"), CLIENT, udp(sport=8080, dport=40000, payload=b"pong"))
    verdict, out, target = node.from_overlay(reply, node.identity("x/c"))
    assert (verdict, target) == (TC_ACT_OK, 0)
    assert out == rebuilt(reply, src=VIP, sport=80)
    assert node.counters()[("SERVICE_REPLIED", "INGRESS")] == 1


def test_a_backend_node_sends_replies_to_outside_clients_back_to_the_translating_node(node):
    # Seen from n1 as the backend's node: n2 translated an outside client's flow to x/b.
    node.apply()
    inbound = frame(CLIENT, address("x/b"), tcp(dport=8080))
    assert node.from_overlay(inbound, WORLD_IDENTITY, remote=UNDERLAY["n2"])[0] == TC_ACT_REDIRECT
    reply = from_pod("x/b", CLIENT, tcp(sport=8080, dport=40000, flags="SA"))
    verdict, out, (target, endpoint, tunnel_id) = node.send("x/b", reply)
    assert (verdict, target, tunnel_id) == (TC_ACT_REDIRECT, VXLAN_IFINDEX, node.identity("x/b"))
    assert endpoint == int.from_bytes(UNDERLAY["n2"].packed, "little")
    assert out == bytes(reply)  # n2 reverses the NAT
    # A pod's own flows to the world still leave through the stack.
    assert node.send("x/b", from_pod("x/b", CLIENT, tcp(sport=45000)))[0] == TC_ACT_OK


def test_ingress_policy_of_a_local_backend_refuses_an_outside_client(node):
    pods_only = policy("db-from-pods", "x", {"matchLabels": {"app": "db"}},
                       ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}])
    node.apply([service("db", ["x/b"])], [pods_only])
    sent = outside(VIP, tcp())
    assert node.from_netdev(sent)[0] == TC_ACT_SHOT
    assert node.counters()[("DROP_POLICY_DENIED", "INGRESS")] == 1
    [dropped] = [f for f in node.flows() if f.verdict == "DROPPED"]
    assert (dropped.source.address, dropped.destination.address, dropped.drop_reason) == (
        CLIENT, address("x/b"), "POLICY_DENIED")


def test_netdev_leaves_everything_but_service_traffic_alone(node):
    node.apply([service("db", ["x/b"])])
    vxlan = outside(str(UNDERLAY["n1"]), UDP(sport=50000, dport=8472) / Raw(bytes(50)))
    for sent in (vxlan, outside(VIP, tcp(dport=81)), bytes(outside(VIP, tcp()))[:14 + 20 + 2]):
        verdict, out, _ = node.from_netdev(sent)
        assert (verdict, out) == (TC_ACT_OK, bytes(sent))
    assert node.counters() == {} and node.flows() == []


def test_outside_client_to_an_empty_service_is_dropped(node):
    node.apply([service("empty", [])])
    assert node.from_netdev(outside(VIP, tcp()))[0] == TC_ACT_SHOT
    assert node.counters() == {("DROP_NO_SERVICE_BACKEND", "INGRESS"): 1}
