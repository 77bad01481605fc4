"""pod.bpf.c through BPF_PROG_TEST_RUN: exact verdicts, output frames, redirect targets, conntrack
states, policy lookup precedence and every drop reason.

The maps are filled the way the controller fills them: a PodnetState compiled by the policy compiler
and written by NodeDataplane.sync. test_run runs the program on lo, so while a pod sends (or
receives, for pod_to_container) its endpoint entry carries lo's ifindex, as if the packet were on the
pod's host veth. The redirect target is read back from skb->cb[0] through ctx_out.
"""

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from bpfnet.podnet.config import Namespace, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import (
    EndpointLink,
    EndpointValue,
    NodeDataplane,
    desired_maps,
    mac_bytes,
)
from bpfnet.podnet.policy import Direction, compile_policy
from bpfnet.testing.conformance import policy

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LO = 1
SKB_CTX = 192  # sizeof(struct __sk_buff): ctx_out must hold all of it
CB_OFFSET = 48

PODS = {  # key: (address, labels, fake host-veth ifindex)
    "x/a": ("10.0.0.2", {"pod": "a"}, 101),
    "x/b": ("10.0.0.3", {"pod": "b"}, 102),
    "y/a": ("10.0.0.4", {"pod": "a"}, 103),
}
WORLD = "192.168.1.1"
ROUTER = "10.0.0.1"  # the node's own address: identity host


def pod_mac(key):
    return f"02:00:00:00:00:{PODS[key][2] - 100:02x}"


def gateway_mac(key):
    return f"02:ff:00:00:00:{PODS[key][2] - 100:02x}"


def address(key):
    return PODS[key][0]


def make_state(*policies) -> PodnetState:
    return PodnetState(
        nodes=[Node(name="n1", pod_cidr="10.0.0.0/24")],
        namespaces=[Namespace(name="x", labels={"ns": "x"}), Namespace(name="y", labels={"ns": "y"})],
        pods=[Pod(namespace=k.split("/")[0], name=k.split("/")[1], labels=labels, node="n1",
                  address=addr, ports=[]) for k, (addr, labels, _) in PODS.items()],
        policies=list(policies))


LINKS = {k: EndpointLink(ifindex, mac_bytes(pod_mac(k)), mac_bytes(gateway_mac(k)))
         for k, (_, _, ifindex) in PODS.items()}


class Harness:
    def __init__(self):
        self.dp = NodeDataplane.load()

    def apply(self, *policies):
        return self.dp.sync(desired_maps(compile_policy(make_state(*policies)), "n1", LINKS))

    def _run(self, program, key, frame):
        """Run with pod `key`'s endpoint on lo; -> (verdict, output frame, cb[0])."""
        addr = bytes(map(int, address(key).split(".")))
        original = self.dp.endpoints.lookup(addr)
        moved = EndpointValue.from_buffer_copy(bytes(original))
        moved.ifindex = LO
        self.dp.endpoints.update(addr, moved)
        try:
            result = program.test_run(bytes(frame), ctx=bytes(SKB_CTX))
        finally:
            self.dp.endpoints.update(addr, original)
        return result.retval, result.data, struct.unpack_from("<I", result.ctx, CB_OFFSET)[0]

    def send(self, key, frame):
        """A frame leaving pod `key` (pod_from_container)."""
        return self._run(self.dp.from_container, key, frame)

    def receive(self, key, frame):
        """A frame the node's stack sends to pod `key` (pod_to_container)."""
        return self._run(self.dp.to_container, key, frame)

    def counters(self):
        return {(o.name, d.name): packets for (o, d), (packets, _) in self.dp.counters().items()}


@pytest.fixture
def node():
    h = Harness()
    h.apply()
    yield h
    h.dp.close()


def from_pod(key, dst, l4, ttl=64):
    return Ether(src=pod_mac(key), dst=gateway_mac(key)) / IP(src=address(key), dst=dst, ttl=ttl) / l4


def tcp(sport=40000, dport=80, flags="S"):
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=8192)


def routed(frame, key):
    """What the destination pod `key` must receive: gateway MACs, TTL one less."""
    ip = frame[IP].copy()
    ip.ttl -= 1
    del ip.chksum
    return bytes(Ether(src=gateway_mac(key), dst=pod_mac(key)) / ip)


# --- forwarding and ARP ---------------------------------------------------------------------------

def test_pod_to_local_pod_is_routed_into_its_namespace(node):
    frame = from_pod("x/a", address("y/a"), tcp())
    verdict, out, target = node.send("x/a", frame)
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["y/a"][2])
    assert out == routed(frame, "y/a")
    assert node.counters() == {("FORWARDED", "EGRESS"): 1}


def test_pod_to_world_goes_to_the_stack_unchanged(node):
    frame = from_pod("x/a", WORLD, UDP(sport=5000, dport=53) / Raw(b"q"))
    verdict, out, target = node.send("x/a", frame)
    assert (verdict, out, target) == (TC_ACT_OK, bytes(frame), 0)
    assert node.counters() == {("TO_STACK", "EGRESS"): 1}


def test_arp_for_the_gateway_is_answered_with_the_host_veth_mac(node):
    request = Ether(src=pod_mac("x/a"), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=pod_mac("x/a"), psrc=address("x/a"), hwdst="00:00:00:00:00:00", pdst="169.254.1.1")
    verdict, out, target = node.send("x/a", request)
    reply = Ether(src=gateway_mac("x/a"), dst=pod_mac("x/a")) / ARP(
        op=2, hwsrc=gateway_mac("x/a"), psrc="169.254.1.1", hwdst=pod_mac("x/a"), pdst=address("x/a"))
    assert (verdict, target) == (TC_ACT_REDIRECT, LO)  # back out of the same veth, to the pod
    assert out == bytes(reply)
    assert node.counters() == {("ARP_REPLIED", "EGRESS"): 1}


def test_gratuitous_arp_and_arp_replies_pass(node):
    garp = Ether(src=pod_mac("x/a"), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=pod_mac("x/a"), psrc=address("x/a"), pdst=address("x/a"))
    reply = Ether(src=pod_mac("x/a"), dst=gateway_mac("x/a")) / ARP(
        op=2, hwsrc=pod_mac("x/a"), psrc=address("x/a"), pdst=ROUTER)
    assert node.send("x/a", garp)[:2] == (TC_ACT_OK, bytes(garp))
    assert node.send("x/a", reply)[:2] == (TC_ACT_OK, bytes(reply))


# --- policy -------------------------------------------------------------------------------------

DENY_INGRESS_X = policy("deny", "x", types=["Ingress"])
DENY_EGRESS_XA = policy("deny", "x", {"matchLabels": {"pod": "a"}}, types=["Egress"])


def test_ingress_denied_by_the_destination_policy(node):
    node.apply(DENY_INGRESS_X)
    frame = from_pod("y/a", address("x/b"), tcp())
    assert node.send("y/a", frame)[:2] == (TC_ACT_SHOT, bytes(frame))
    assert node.counters() == {("DROP_POLICY_DENIED", "INGRESS"): 1}
    assert node.send("x/b", from_pod("x/b", address("y/a"), tcp()))[0] == TC_ACT_REDIRECT


def test_egress_denied_by_the_source_policy(node):
    node.apply(DENY_EGRESS_XA)
    assert node.send("x/a", from_pod("x/a", address("y/a"), tcp()))[0] == TC_ACT_SHOT
    assert node.send("x/a", from_pod("x/a", WORLD, tcp()))[0] == TC_ACT_SHOT
    assert node.counters() == {("DROP_POLICY_DENIED", "EGRESS"): 2}


def ingress_rule(rule):
    return policy("p", "x", {"matchLabels": {"pod": "a"}}, ingress=[rule])


B_PEER = {"podSelector": {"matchLabels": {"pod": "b"}}}
Y_PEER = {"namespaceSelector": {"matchLabels": {"ns": "y"}}}


@pytest.mark.parametrize("rule, sender, l4, allowed", [
    # exact port of an identity
    ({"from": [B_PEER], "ports": [{"port": 80}]}, "x/b", tcp(dport=80), True),
    ({"from": [B_PEER], "ports": [{"port": 80}]}, "x/b", tcp(dport=81), False),
    ({"from": [B_PEER], "ports": [{"port": 80}]}, "y/a", tcp(dport=80), False),
    # port block of a range (80-90 = 80/13 + 88/15 + 90/16)
    ({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]}, "x/b", tcp(dport=87), True),
    ({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]}, "x/b", tcp(dport=90), True),
    ({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]}, "x/b", tcp(dport=91), False),
    ({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]}, "x/b", tcp(dport=79), False),
    # any port of one protocol
    ({"from": [Y_PEER], "ports": [{"protocol": "UDP"}]}, "y/a", UDP(sport=1, dport=9999), True),
    ({"from": [Y_PEER], "ports": [{"protocol": "UDP"}]}, "y/a", tcp(dport=9999), False),
    # any protocol of an identity, including ICMP
    ({"from": [Y_PEER]}, "y/a", ICMP(type=8, id=7), True),
    ({"from": [Y_PEER]}, "x/b", ICMP(type=8, id=7), False),
    # L3 wildcard: ports from anyone
    ({"ports": [{"port": 81}]}, "y/a", tcp(dport=81), True),
    ({"ports": [{"port": 81}]}, "x/b", tcp(dport=80), False),
    ({"ports": [{"port": 81}]}, "x/b", ICMP(type=8, id=7), False),
    # ipBlock by address, pods included (Kubernetes, not Cilium), except honoured
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.3/32"]}}]}, "y/a", tcp(), True),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.3/32"]}}]}, "x/b", tcp(), False),
])
def test_policy_lookup(node, rule, sender, l4, allowed):
    node.apply(ingress_rule(rule))
    verdict, _, target = node.send(sender, from_pod(sender, address("x/a"), l4))
    assert (verdict, target) == ((TC_ACT_REDIRECT, PODS["x/a"][2]) if allowed else (TC_ACT_SHOT, 0))
    hits = sum(node.dp.policy_hits().values())
    assert hits == (1 if allowed else 0)


def test_from_the_stack_world_by_ip_block_and_host_always(node):
    node.apply(ingress_rule({"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}]}))

    def inbound(src):
        return Ether(src=gateway_mac("x/a"), dst=pod_mac("x/a")) / IP(src=src, dst=address("x/a")) / tcp()
    assert node.receive("x/a", inbound("192.168.2.2"))[0] == TC_ACT_OK
    assert node.receive("x/a", inbound(WORLD))[0] == TC_ACT_SHOT          # in the except
    assert node.receive("x/a", inbound("172.16.0.1"))[0] == TC_ACT_SHOT   # outside the CIDR
    assert node.receive("x/a", inbound(ROUTER))[0] == TC_ACT_OK           # the node itself
    assert node.counters() == {("DELIVERED", "INGRESS"): 2, ("DROP_POLICY_DENIED", "INGRESS"): 2}


def test_to_container_passes_what_is_not_for_its_pod(node):
    arp = Ether(src=gateway_mac("x/a"), dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=ROUTER, pdst=address("x/a"))
    other = Ether(src=gateway_mac("x/a"), dst=pod_mac("x/a")) / IP(src=WORLD, dst="10.0.0.99") / tcp()
    assert node.receive("x/a", arp)[0] == TC_ACT_OK
    assert node.receive("x/a", other)[0] == TC_ACT_OK
    assert node.counters() == {("PASSED", "INGRESS"): 2}


# --- conntrack ----------------------------------------------------------------------------------

def test_reply_passes_an_isolated_pod_after_the_forward_direction(node):
    node.apply(DENY_INGRESS_X)
    reply = from_pod("y/a", address("x/a"), tcp(sport=80, dport=40000, flags="SA"))
    assert node.send("y/a", reply)[0] == TC_ACT_SHOT                      # no flow yet: denied
    assert node.send("x/a", from_pod("x/a", address("y/a"), tcp()))[0] == TC_ACT_REDIRECT
    verdict, out, target = node.send("y/a", reply)
    assert (verdict, target) == (TC_ACT_REDIRECT, PODS["x/a"][2])          # the reply passes
    assert out == routed(reply, "x/a")
    new = from_pod("y/a", address("x/a"), tcp(sport=80, dport=40001))
    assert node.send("y/a", new)[0] == TC_ACT_SHOT                        # a new flow does not
    (flow,) = node.dp.flows()
    assert (flow["source"], flow["destination"]) == ("10.0.0.2:40000", "10.0.0.4:80")
    assert (flow["packets_forward"], flow["packets_reply"]) == (1, 1)
    assert node.counters() == {("FORWARDED", "EGRESS"): 2, ("DROP_POLICY_DENIED", "INGRESS"): 2}


def test_policy_change_rechecks_established_flows_once(node):
    keep = from_pod("x/a", address("y/a"), tcp(sport=41000, dport=81, flags="A"))
    cut = from_pod("x/a", address("y/a"), tcp(sport=42000, dport=80, flags="A"))
    assert node.send("x/a", keep)[0] == node.send("x/a", cut)[0] == TC_ACT_REDIRECT
    revision = node.dp.revision
    node.apply(policy("p", "x", {"matchLabels": {"pod": "a"}}, egress=[{"ports": [{"port": 81}]}]))
    assert node.dp.revision == revision + 1
    assert node.send("x/a", keep)[0] == TC_ACT_REDIRECT   # still allowed: not cut
    assert node.send("x/a", cut)[0] == TC_ACT_SHOT        # no longer allowed
    flows = {f["destination"]: f["revision"] for f in node.dp.flows()}
    assert flows["10.0.0.4:81"] == revision + 1 and flows["10.0.0.4:80"] == revision
    assert node.apply(policy("p", "x", {"matchLabels": {"pod": "a"}}, egress=[{"ports": [{"port": 81}]}])).total == 0
    assert node.dp.revision == revision + 1               # nothing changed: no re-checks


def test_icmp_echo_and_related_errors_follow_their_flow(node):
    node.apply(DENY_INGRESS_X)
    echo = from_pod("x/a", address("y/a"), ICMP(type=8, id=77, seq=1))
    echo_reply = from_pod("y/a", address("x/a"), ICMP(type=0, id=77, seq=1))
    assert node.send("y/a", echo_reply)[0] == TC_ACT_SHOT
    assert node.send("x/a", echo)[0] == TC_ACT_REDIRECT
    assert node.send("y/a", echo_reply)[0] == TC_ACT_REDIRECT
    udp = from_pod("x/a", address("y/a"), UDP(sport=5000, dport=81) / Raw(b"x"))
    unreachable = from_pod("y/a", address("x/a"), ICMP(type=3, code=3) / udp[IP])
    assert node.send("y/a", unreachable)[0] == TC_ACT_SHOT    # about nothing we track
    assert node.send("x/a", udp)[0] == TC_ACT_REDIRECT
    assert node.send("y/a", unreachable)[0] == TC_ACT_REDIRECT  # related to the UDP flow


# --- drop reasons -------------------------------------------------------------------------------

def x_to_gateway():
    return Ether(src=pod_mac("x/a"), dst=gateway_mac("x/a"))


@pytest.mark.parametrize("frame, reason", [
    (x_to_gateway() / IP(src=address("x/a"), dst=address("y/a"), ihl=4) / tcp(), "DROP_INVALID_PACKET"),
    (bytes(from_pod("x/a", address("y/a"), tcp()))[:14 + 20 + 2], "DROP_INVALID_PACKET"),
    (from_pod("x/a", address("y/a"), ICMP(type=3, code=1) / Raw(b"\x45\x00")), "DROP_INVALID_PACKET"),
    (x_to_gateway() / IP(src=address("x/a"), dst=address("y/a"), flags="MF") / UDP(), "DROP_FRAGMENT"),
    (x_to_gateway() / IP(src=address("x/a"), dst=address("y/a"), frag=10) / Raw(b"x" * 8), "DROP_FRAGMENT"),
    (x_to_gateway() / IPv6(src="fe80::1", dst="ff02::2"), "DROP_UNKNOWN_L3"),
    (x_to_gateway() / IP(src="10.0.0.3", dst=address("y/a")) / tcp(), "DROP_INVALID_SOURCE"),
    (x_to_gateway() / ARP(op=1, psrc="10.0.0.3", pdst="169.254.1.1"), "DROP_INVALID_SOURCE"),
    (x_to_gateway() / ARP(op=1, hwlen=8, psrc=address("x/a"), pdst="169.254.1.1"), "DROP_INVALID_PACKET"),
    (from_pod("x/a", address("y/a"), tcp(), ttl=1), "DROP_TTL_EXCEEDED"),
])
def test_drop_reasons(node, frame, reason):
    verdict, _, target = node.send("x/a", frame)
    assert (verdict, target) == (TC_ACT_SHOT, 0)
    assert node.counters() == {(reason, "EGRESS"): 1}


def test_sync_writes_exactly_the_compiled_state(node):
    result = node.apply(DENY_INGRESS_X, ingress_rule({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]}))
    assert result.added == 3 and result.removed == 0
    entries = node.dp.actual()
    assert {str(a): v[1] for a, v in entries.endpoints.items()} == {"10.0.0.2": 1, "10.0.0.3": 1, "10.0.0.4": 0}
    compiled = compile_policy(make_state(DENY_INGRESS_X))
    expected = compile_policy(make_state(
        DENY_INGRESS_X, ingress_rule({"from": [B_PEER], "ports": [{"port": 80, "endPort": 90}]})))
    assert entries.policy == expected.endpoints["x/a"].entries
    removed = node.dp.sync(desired_maps(compiled, "n1", LINKS))
    assert removed.removed == 3 and not node.dp.actual().policy
    assert all(e.direction is Direction.INGRESS for e in entries.policy)


def test_policy_bench_measures_the_intended_paths():
    """The benchmark's test_run scenarios really exercise a policy drop and an established flow
    (asserted inside), and apply-to-enforcement ends with the last policy in the map."""
    from bpfnet.bench import policy as bench

    runs = bench.TestRunBench(counts=(10, 1000), repeat=10)
    try:
        assert runs.new_flow(1000) > 0 and runs.established(10) > 0
        assert len(runs.dataplanes[1000].policy_hits()) == 1000
    finally:
        runs.close()
    assert bench.apply_to_enforcement(50) > 0


def test_idle_flows_expire_by_protocol_and_state(node):
    from bpfnet.podnet.dataplane import ConntrackTimeouts

    node.send("x/a", from_pod("x/a", address("y/a"), tcp(sport=1, flags="S")))
    node.send("x/a", from_pod("x/a", address("y/a"), tcp(sport=2, flags="F")))
    node.send("x/a", from_pod("x/a", address("y/a"), UDP(sport=3, dport=53)))
    last_seen = max(f["last_seen_ns"] for f in node.dp.flows())
    timeouts = ConntrackTimeouts(tcp=100, tcp_closing=10, other=50)
    assert node.dp.expire_flows(last_seen + int(5e9), timeouts) == 0
    assert node.dp.expire_flows(last_seen + int(20e9), timeouts) == 1   # the closing TCP flow
    assert node.dp.expire_flows(last_seen + int(60e9), timeouts) == 1   # UDP
    assert [f["source"] for f in node.dp.flows()] == ["10.0.0.2:1"]
    assert node.dp.expire_flows(last_seen + int(200e9), timeouts) == 1
