"""pod.bpf.c's tunnel path through BPF_PROG_TEST_RUN: a packet for a pod of another node leaves with
the tunnel key set (remote = that node's underlay address, id = the SENDER's identity) towards the
VXLAN device; a packet from the overlay is judged with the identity of its tunnel key, not the one
its source address maps to.

Node n1 holds x/a, x/b, y/a; node n2 holds x/c and y/b. The maps are filled by desired_maps with an
Overlay, as the controller does. pod_from_container records the key it set in skb->cb[1..2] (read
back through ctx_out); pod_from_overlay is entered through a small shim that sets a tunnel key with
bpf_skb_set_tunnel_key and tail-calls it, since test_run cannot hand a program a received tunnel
key otherwise.
"""

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpfnet.testing.conformance import policy
from support.podnet_nodes import (
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

PODS = {  # key: (node, address, labels, fake host-veth ifindex)
    "x/a": ("n1", "10.0.0.2", {"pod": "a"}, 101),
    "x/b": ("n1", "10.0.0.3", {"pod": "b"}, 102),
    "y/a": ("n1", "10.0.0.4", {"pod": "a"}, 103),
    "x/c": ("n2", "10.0.1.2", {"pod": "c"}, 0),
    "y/b": ("n2", "10.0.1.3", {"pod": "b"}, 0),
}
CLUSTER = TwoNodes(PODS)
pod_mac, gateway_mac, address = CLUSTER.pod_mac, CLUSTER.gateway_mac, CLUSTER.address


class Harness(NodeHarness):
    def __init__(self):
        super().__init__(CLUSTER, "vx_shim")

    def apply(self, *policies, overlay=True):
        return super().apply(policies=policies, overlay=overlay)


@pytest.fixture
def node():
    h = Harness()
    h.apply()
    yield h
    h.close()


def packet(src, dst, l4, ttl=64):
    return Ether(src=pod_mac(src), dst=gateway_mac(src)) / IP(src=address(src), dst=address(dst), ttl=ttl) / l4


def tcp(sport=40000, dport=80, flags="S"):
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=8192)


def routed(frame, key):
    ip = frame[IP].copy()
    ip.ttl -= 1
    del ip.chksum
    return bytes(Ether(src=gateway_mac(key), dst=pod_mac(key)) / ip)


def be32(addr: IPv4Address) -> int:
    """A network-order address as the u32 skb->cb holds it (little-endian host)."""
    return int.from_bytes(addr.packed, "little")


# --- sending into the overlay -----------------------------------------------------------------------

def test_packet_for_a_remote_pod_gets_the_senders_identity_as_tunnel_id(node):
    frame = packet("x/a", "y/b", tcp())
    verdict, out, (target, endpoint, tunnel_id) = node.send("x/a", frame)
    assert (verdict, target) == (TC_ACT_REDIRECT, VXLAN_IFINDEX)
    assert (endpoint, tunnel_id) == (be32(UNDERLAY["n2"]), node.identity("x/a"))
    assert out == bytes(frame)  # inner packet untouched: the receiving node routes it
    assert node.counters() == {("TUNNELED", "EGRESS"): 1}


def test_ipcache_carries_the_tunnel_endpoint_of_remote_pods_only(node):
    ipcache = node.dp.actual().ipcache
    tunnel = {str(prefix.network_address): entry[2] for prefix, entry in ipcache.items()}
    assert tunnel["10.0.1.2"] == tunnel["10.0.1.3"] == UNDERLAY["n2"]
    assert tunnel["10.0.0.2"] == tunnel["10.0.0.1"] == IPv4Address(0)
    assert node.dp.actual().node == (VXLAN_IFINDEX, UNDERLAY["n1"])


def test_egress_policy_applies_before_the_tunnel(node):
    node.apply(policy("deny", "x", {"matchLabels": {"pod": "a"}}, types=["Egress"]))
    frame = packet("x/a", "y/b", tcp())
    assert node.send("x/a", frame)[:2] == (TC_ACT_SHOT, bytes(frame))
    assert node.counters() == {("DROP_POLICY_DENIED", "EGRESS"): 1}


def test_ingress_policy_of_a_remote_pod_is_left_to_its_node(node):
    node.apply(policy("deny", "y", types=["Ingress"]))  # selects y/b on n2
    assert node.send("x/a", packet("x/a", "y/b", tcp()))[0] == TC_ACT_REDIRECT


def test_remote_pod_without_a_vxlan_device_is_dropped(node):
    node.apply(overlay=False)
    assert node.send("x/a", packet("x/a", "y/b", tcp()))[0] == TC_ACT_OK  # no endpoint: stack
    node.dp.ipcache.update(*_remote_entry(node, "y/b"))
    assert node.send("x/a", packet("x/a", "y/b", tcp()))[0] == TC_ACT_SHOT
    assert node.counters()[("DROP_NO_TUNNEL_ENDPOINT", "EGRESS")] == 1


def _remote_entry(node, key):
    from bpfnet.podnet.dataplane import IPV4, IpcacheKey, IpcacheValue
    value = node.dp.ipcache.lookup(IpcacheKey(32, IPV4(*IPv4Address(address(key)).packed)))
    return (IpcacheKey(32, IPV4(*IPv4Address(address(key)).packed)),
            IpcacheValue(value.identity, value.local_identity, IPV4(*UNDERLAY["n2"].packed)))


# --- receiving from the overlay ---------------------------------------------------------------------

ONLY_FROM_B = policy("p", "x", {"matchLabels": {"pod": "a"}},
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}},
                                         "namespaceSelector": {}}]}])


def test_overlay_packet_is_routed_into_the_destination_pod(node):
    frame = packet("y/b", "x/a", tcp())
    verdict, out, target = node.from_overlay(frame, node.identity("y/b"))
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["x/a"][3])
    assert out == routed(frame, "x/a")
    assert node.counters() == {("FORWARDED", "INGRESS"): 1}


def test_ingress_decision_uses_the_tunnel_identity_not_the_source_address(node):
    node.apply(ONLY_FROM_B)
    # From x/c's address (pod=c: denied by address) but carrying y/b's identity (pod=b): allowed.
    allowed = packet("x/c", "x/a", tcp(sport=40001))
    assert node.from_overlay(allowed, node.identity("y/b"))[0] == TC_ACT_REDIRECT
    # From y/b's address (pod=b: allowed by address) but carrying x/c's identity: dropped.
    denied = packet("y/b", "x/a", tcp(sport=40002))
    assert node.from_overlay(denied, node.identity("x/c"))[:2] == (TC_ACT_SHOT, bytes(denied))
    assert node.counters() == {("FORWARDED", "INGRESS"): 1, ("DROP_POLICY_DENIED", "INGRESS"): 1}


def test_reply_from_the_overlay_passes_a_denying_ingress_policy(node):
    node.apply(policy("deny", "x", types=["Ingress"]))
    assert node.send("x/a", packet("x/a", "y/b", tcp(sport=41000, flags="S")))[0] == TC_ACT_REDIRECT
    reply = packet("y/b", "x/a", tcp(sport=80, dport=41000, flags="SA"))
    assert node.from_overlay(reply, node.identity("y/b"))[0] == TC_ACT_REDIRECT
    new = packet("y/b", "x/a", tcp(sport=41001, dport=80))
    assert node.from_overlay(new, node.identity("y/b"))[0] == TC_ACT_SHOT


@pytest.mark.parametrize("frame, identity, reason", [
    (packet("y/b", "x/a", UDP(sport=1, dport=2)), 0, "DROP_INVALID_IDENTITY"),
    (Ether(src=pod_mac("y/b"), dst=gateway_mac("y/b")) / IP(src=address("y/b"), dst="10.0.0.99") / tcp(),
     300, "DROP_UNKNOWN_ENDPOINT"),
    (Ether(src=pod_mac("y/b"), dst=gateway_mac("y/b"), type=0x86DD) / (b"\x60" + bytes(60)), 300,
     "DROP_UNKNOWN_L3"),
    (packet("y/b", "x/a", tcp(), ttl=1), 300, "DROP_TTL_EXCEEDED"),
])
def test_overlay_drops(node, frame, identity, reason):
    assert node.from_overlay(frame, identity)[0] == TC_ACT_SHOT
    assert node.counters() == {(reason, "INGRESS"): 1}


def test_overlay_packet_without_a_tunnel_key_is_dropped(node):
    result = node.dp.from_overlay.test_run(bytes(packet("y/b", "x/a", tcp())), ctx=bytes(SKB_CTX))
    assert result.retval == TC_ACT_SHOT
    assert node.counters() == {("DROP_INVALID_IDENTITY", "INGRESS"): 1}
