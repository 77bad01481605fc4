"""Flow events of pod.bpf.c through BPF_PROG_TEST_RUN: the exact record a forwarded or dropped
packet leaves in the pod_flows ring buffer, and the per-connection aggregation (first packet, new
TCP flags, at most one report a second), read back with the runtime's RingBuffer and decoded with
bpfnet.podnet.flows as the agent does."""

import socket
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfnet.ebpf.ringbuf import RingBuffer
from bpfnet.podnet.config import Namespace, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import EndpointLink, NodeDataplane, desired_maps, mac_bytes
from bpfnet.podnet.flows import FlowEvent, decode
from bpfnet.podnet.policy import compile_policy
from bpfnet.testing.conformance import policy

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LO = 1
SKB_CTX = 192
PODS = {"x/a": ("10.0.0.2", 101), "x/b": ("10.0.0.3", 102), "y/a": ("10.0.0.4", 103)}
FLOW_EGRESS, FLOW_INGRESS = 0, 1
FORWARDED, DROPPED = 1, 2


def pod_mac(key):
    return f"02:00:00:00:00:{PODS[key][1] - 100:02x}"


def gateway_mac(key):
    return f"02:ff:00:00:00:{PODS[key][1] - 100:02x}"


def make_state(*policies) -> PodnetState:
    return PodnetState(
        nodes=[Node(name="n1", pod_cidr="10.0.0.0/24")],
        namespaces=[Namespace(name="x", labels={"ns": "x"}), Namespace(name="y", labels={"ns": "y"})],
        pods=[Pod(namespace=k.split("/")[0], name=k.split("/")[1], labels={"pod": k[-1]}, node="n1",
                  address=addr) for k, (addr, _) in PODS.items()],
        policies=list(policies))


LINKS = {k: EndpointLink(ifindex, mac_bytes(pod_mac(k)), mac_bytes(gateway_mac(k)))
         for k, (_, ifindex) in PODS.items()}


class Harness:
    def __init__(self):
        self.dp = NodeDataplane.load()
        self.ring = RingBuffer(self.dp.flow_events)
        self.compiled = None

    def apply(self, *policies):
        self.compiled = compile_policy(make_state(*policies))
        self.dp.sync(desired_maps(self.compiled, "n1", LINKS))

    def run(self, program, key, frame, repeat=1):
        """Run with pod `key`'s endpoint on lo (as if on its host veth) -> verdict."""
        addr = socket.inet_aton(PODS[key][0])
        original = self.dp.endpoints.lookup(addr)
        moved = type(original).from_buffer_copy(bytes(original))
        moved.ifindex = LO
        self.dp.endpoints.update(addr, moved)
        try:
            return program.test_run(bytes(frame), ctx=bytes(SKB_CTX), repeat=repeat).retval
        finally:
            self.dp.endpoints.update(addr, original)

    def send(self, key, frame, repeat=1):
        return self.run(self.dp.from_container, key, frame, repeat)

    def receive(self, key, frame):
        return self.run(self.dp.to_container, key, frame)

    def events(self):
        return [FlowEvent.from_buffer_copy(raw) for raw in self.ring.consume()]

    def close(self):
        self.ring.close()
        self.dp.close()


@pytest.fixture
def node():
    h = Harness()
    h.apply()
    yield h
    h.close()


def packet(src, dst, l4):
    return Ether(src=pod_mac(src), dst=gateway_mac(src)) / IP(src=PODS[src][0], dst=PODS[dst][0]) / l4


def tcp(sport=40000, dport=80, flags="S"):
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=8192)


def fields(event):
    """Every field of a record but the time, in a comparable form."""
    return {
        "src": socket.inet_ntoa(bytes(event.src_addr[:4])), "dst": socket.inet_ntoa(bytes(event.dst_addr[:4])),
        "rest_of_addresses": bytes(event.src_addr[4:]) + bytes(event.dst_addr[4:]),
        "sport": socket.ntohs(event.src_port), "dport": socket.ntohs(event.dst_port),
        "family": event.family, "protocol": event.protocol, "direction": event.direction,
        "verdict": event.verdict, "drop_reason": event.drop_reason, "tcp_flags": event.tcp_flags,
        "is_reply": event.is_reply, "src_identity": event.src_identity,
        "dst_identity": event.dst_identity, "ifindex": event.ifindex, "packets": event.packets,
        "bytes": event.bytes,
    }


def expected(node, src, dst, frame, **overrides):
    ids = node.compiled.identities
    base = {"src": PODS[src][0], "dst": PODS[dst][0], "rest_of_addresses": bytes(24),
            "sport": frame.sport, "dport": frame.dport, "family": 4,
            "protocol": frame[IP].proto, "direction": FLOW_EGRESS, "verdict": FORWARDED,
            "drop_reason": 0, "tcp_flags": int(frame[TCP].flags) if TCP in frame else 0,
            "is_reply": 0, "src_identity": ids[src], "dst_identity": ids[dst], "ifindex": LO,
            "packets": 1, "bytes": len(frame)}
    return {**base, **overrides}


# --- exact records ----------------------------------------------------------------------------------

def test_forwarded_packet_leaves_one_exact_record(node):
    frame = packet("x/a", "y/a", tcp())
    before = time.monotonic_ns()
    assert node.send("x/a", frame) == TC_ACT_REDIRECT
    after = time.monotonic_ns()
    events = node.events()
    assert [fields(e) for e in events] == [expected(node, "x/a", "y/a", frame)]
    assert before <= events[0].time_ns <= after   # bpf_ktime_get_ns is CLOCK_MONOTONIC


def test_policy_drop_is_reported_with_reason_and_the_refusing_direction(node):
    node.apply(policy("deny", "y", types=["Ingress"]))
    frame = packet("x/a", "y/a", tcp())
    assert node.send("x/a", frame) == TC_ACT_SHOT
    assert [fields(e) for e in node.events()] == [
        expected(node, "x/a", "y/a", frame, verdict=DROPPED, drop_reason=133, direction=FLOW_INGRESS)]


def test_egress_drop_and_invalid_source_drop(node):
    node.apply(policy("deny", "x", {"matchLabels": {"pod": "a"}}, types=["Egress"]))
    frame = packet("x/a", "y/a", UDP(sport=5000, dport=53) / Raw(b"q"))
    assert node.send("x/a", frame) == TC_ACT_SHOT
    spoofed = packet("x/b", "y/a", UDP(sport=5000, dport=53))  # x/b's address from x/a's veth
    assert node.send("x/a", spoofed) == TC_ACT_SHOT
    assert [fields(e) for e in node.events()] == [
        expected(node, "x/a", "y/a", frame, verdict=DROPPED, drop_reason=133),
        expected(node, "x/b", "y/a", spoofed, verdict=DROPPED, drop_reason=132)]


def test_reply_is_marked_and_delivery_from_the_stack_is_ingress(node):
    syn = packet("x/a", "y/a", tcp(flags="S"))
    synack = packet("y/a", "x/a", tcp(sport=80, dport=40000, flags="SA"))
    assert node.send("x/a", syn) == TC_ACT_REDIRECT
    assert node.send("y/a", synack) == TC_ACT_REDIRECT
    from_stack = Ether() / IP(src="10.0.0.1", dst=PODS["x/b"][0]) / tcp(sport=9, dport=80)
    assert node.receive("x/b", from_stack) == TC_ACT_OK
    got = [fields(e) for e in node.events()]
    assert got[:2] == [expected(node, "x/a", "y/a", syn),
                       expected(node, "y/a", "x/a", synack, is_reply=1)]
    assert (got[2]["src"], got[2]["direction"], got[2]["src_identity"], got[2]["verdict"]) == (
        "10.0.0.1", FLOW_INGRESS, 1, FORWARDED)  # the node itself: identity host


def test_records_decode_to_named_pods(node):
    node.apply(policy("deny", "y", types=["Ingress"]))
    assert node.send("x/a", packet("x/a", "y/a", tcp())) == TC_ACT_SHOT
    names = {addr: (k.split("/")[0], k.split("/")[1], ()) for k, (addr, _) in PODS.items()}
    raw = bytes(node.events()[0])
    flow = decode(raw, "n1", 0.0, lambda a: names.get(a, ("", "", ())))
    assert (flow.source.name, flow.destination.name, flow.verdict, flow.drop_reason, flow.direction) == (
        "x/a", "y/a", "DROPPED", "POLICY_DENIED", "ingress")


# --- aggregation ------------------------------------------------------------------------------------

def test_many_packets_of_one_flow_make_one_record(node):
    frame = packet("x/a", "y/a", UDP(sport=5000, dport=53) / Raw(b"q"))
    for _ in range(5):
        assert node.send("x/a", frame) == TC_ACT_REDIRECT
    assert node.send("x/a", frame, repeat=50) == TC_ACT_REDIRECT  # the TTL lasts 63 runs
    assert [fields(e) for e in node.events()] == [expected(node, "x/a", "y/a", frame)]


def test_new_tcp_flags_are_reported_with_the_packets_since_the_last_record(node):
    syn = packet("x/a", "y/a", tcp(flags="S"))
    ack = packet("x/a", "y/a", tcp(flags="A"))
    psh = packet("x/a", "y/a", tcp(flags="PA") / Raw(b"data"))
    for frame in (syn, syn, ack, ack, ack, psh, psh):  # SYN retransmitted; PSH new once
        assert node.send("x/a", frame) == TC_ACT_REDIRECT
    got = [(e.tcp_flags, e.packets, e.bytes) for e in node.events()]
    assert got == [(0x02, 1, len(syn)),
                   (0x12, 2, len(syn) + len(ack)),     # the retransmitted SYN and the first ACK
                   (0x18 | 0x10, 3, 2 * len(ack) + len(psh))]


def test_a_busy_flow_is_reported_again_after_a_second(node):
    frame = packet("x/a", "y/a", UDP(sport=5000, dport=53))
    assert node.send("x/a", frame) == TC_ACT_REDIRECT
    assert node.send("x/a", frame, repeat=10) == TC_ACT_REDIRECT
    assert len(node.events()) == 1
    time.sleep(1.1)   # more than the report interval has certainly passed
    assert node.send("x/a", frame) == TC_ACT_REDIRECT
    assert [e.packets for e in node.events()] == [11]


def test_drops_are_never_aggregated_and_a_full_ring_counts_lost_events(node):
    node.apply(policy("deny", "y", types=["Ingress"]))
    frame = packet("x/a", "y/a", tcp())
    total = 60_000   # the 4 MiB ring holds 47,662 records of 88 bytes
    assert node.send("x/a", frame, repeat=total) == TC_ACT_SHOT
    kept = len(node.events())
    lost = node.dp.lost_flow_events()
    assert kept + lost == total and lost > 0
    assert node.send("x/a", frame) == TC_ACT_SHOT   # room again after reading
    assert len(node.events()) == 1 and node.dp.lost_flow_events() == lost


@pytest.mark.parametrize("frame, reason, has_tuple", [
    (Ether(src=pod_mac("x/a"), dst=gateway_mac("x/a"), type=0x86DD) / (b"\x60" + bytes(60)), 139, False),
    (Ether(src=pod_mac("x/a"), dst=gateway_mac("x/a")) / IP(src=PODS["x/a"][0], dst=PODS["y/a"][0], proto=6)
     / b"\x00\x01", 134, False),  # a TCP header cut short
    (packet("x/a", "y/a", UDP(sport=1, dport=2)).copy(), 157, False),
    (Ether(src=pod_mac("x/a"), dst=gateway_mac("x/a")) / IP(src=PODS["x/a"][0], dst=PODS["y/a"][0], ttl=1)
     / UDP(sport=1, dport=2), 196, True),
])
def test_every_drop_reason_leaves_a_record(node, frame, reason, has_tuple):
    if reason == 157:
        frame[IP].flags = "MF"
    assert node.send("x/a", frame) == TC_ACT_SHOT
    events = node.events()
    assert [(e.verdict, e.drop_reason, e.direction, e.packets, e.bytes) for e in events] == [
        (DROPPED, reason, FLOW_EGRESS, 1, len(frame))]
    src = socket.inet_ntoa(bytes(events[0].src_addr[:4]))
    assert src == (PODS["x/a"][0] if has_tuple else "0.0.0.0")
