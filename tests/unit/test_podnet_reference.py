"""The reference evaluator against expectations written from the Kubernetes e2e suite.

Expected tables are built the way test/e2e/network/netpol builds them (start all-allowed, then
ExpectAllIngress / ExpectAllEgress / ExpectPeer / Expect), independently of the evaluator.
"""

from ipaddress import IPv4Address

import pytest

from bpfnet.podnet.config import Node
from bpfnet.testing import reference
from bpfnet.testing.conformance import (
    SELECT_A,
    B,
    model_state,
    namespaces,
    pod_cidr_block,
    policy,
    set_namespace_labels,
    set_pod_labels,
)

NODE = Node(name="n1", pod_cidr="10.0.0.0/24")
ALL = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]


class Reachability:
    def __init__(self, default=True):
        self.cells = {(a, b): default for a in ALL for b in ALL}

    def expect(self, src, dst, value):
        self.cells[(src, dst)] = value

    def all_ingress(self, dst, value):
        for src in ALL:
            self.cells[(src, dst)] = value

    def all_egress(self, src, value):
        for dst in ALL:
            self.cells[(src, dst)] = value

    def peer(self, value, from_ns=None, from_pod=None, to_ns=None, to_pod=None):
        def match(key, ns, pod):
            n, p = key.split("/")
            return (ns is None or n == ns) and (pod is None or p == pod)
        for (a, b) in self.cells:
            if match(a, from_ns, from_pod) and match(b, to_ns, to_pod):
                self.cells[(a, b)] = value


def observed(state, port=80, proto="TCP"):
    m = reference.matrix(state, port, proto)
    return {(a, b): m[a][b] for a in ALL for b in ALL if a != b}


def expected(r):
    return {k: v for k, v in r.cells.items() if k[0] != k[1]}


@pytest.fixture
def model():
    return model_state([NODE])


def with_policies(state, *policies):
    return state.model_copy(update={"policies": list(policies)})


def test_no_policy_allows_everything(model):
    assert all(observed(model).values())


def test_default_deny_ingress(model):
    s = with_policies(model, policy("deny", "x", types=["Ingress"]))
    r = Reachability()
    r.peer(False, to_ns="x")
    assert observed(s) == expected(r)


def test_default_deny_egress(model):
    s = with_policies(model, policy("deny", "x", egress=[], types=["Egress"]))
    r = Reachability()
    r.peer(False, from_ns="x")
    assert observed(s) == expected(r)


def test_pod_a_only_from_b(model):
    s = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [B]}]))
    r = Reachability()
    r.all_ingress("x/a", False)
    r.expect("x/b", "x/a", True)
    assert observed(s) == expected(r)


def test_namespace_and_pod_selector_and_vs_or(model):
    both = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [{**namespaces(ns="y"), **B}]}]))
    r = Reachability()
    r.all_ingress("x/a", False)
    r.expect("y/b", "x/a", True)
    assert observed(both) == expected(r)

    either = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [namespaces(ns="y"), B]}]))
    r = Reachability()
    r.all_ingress("x/a", False)
    r.peer(True, from_ns="y", to_ns="x", to_pod="a")
    r.expect("x/b", "x/a", True)  # podSelector alone: pods of the policy's namespace
    assert observed(either) == expected(r)


def test_named_port_and_numbers(model):
    s = with_policies(model, policy("p", "x", ingress=[{"ports": [{"port": "serve-81-tcp"}]}]))
    r = Reachability()
    r.peer(False, to_ns="x")
    assert observed(s, 80) == expected(r)
    assert all(observed(s, 81).values())
    assert not reference.allowed(s, s.pod("y/a"), s.pod("x/a"), 81, "UDP")


def test_end_port(model):
    s = with_policies(model, policy("p", "x", ingress=[{"ports": [{"port": 81, "endPort": 83}]}]))
    assert all(observed(s, 81).values()) and all(observed(s, 83, "TCP").values())
    r = Reachability()
    r.peer(False, to_ns="x")
    assert observed(s, 80) == expected(r) == observed(s, 84)


def test_ip_block_except_matches_pod_addresses(model):
    s = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [pod_cidr_block(model, ("x/b",))]}]))
    r = Reachability()
    r.expect("x/b", "x/a", False)
    assert observed(s) == expected(r)
    world = IPv4Address("192.168.7.7")
    assert not reference.allowed(s, world, s.pod("x/a"), 80, "TCP")
    assert reference.allowed(s, IPv4Address("10.0.0.200"), s.pod("x/a"), 80, "TCP")


def test_egress_to_ip_block_and_world(model):
    s = with_policies(model, policy("p", "x", SELECT_A, egress=[{"to": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]))
    assert reference.allowed(s, s.pod("x/a"), IPv4Address("192.168.1.1"), 80, "TCP")
    assert not reference.allowed(s, s.pod("x/a"), IPv4Address("10.9.9.9"), 80, "TCP")
    r = Reachability()
    r.all_egress("x/a", False)
    r.all_ingress("x/a", False)  # no policyTypes: Ingress is implied, with no ingress rules
    assert observed(s) == expected(r)


def test_egress_named_port_needs_a_pod_destination(model):
    s = with_policies(model, policy("p", "x", SELECT_A, egress=[{"ports": [{"port": "serve-80-tcp"}]}]))
    assert reference.allowed(s, s.pod("x/a"), s.pod("z/c"), 80, "TCP")
    assert not reference.allowed(s, s.pod("x/a"), s.pod("z/c"), 81, "TCP")
    assert not reference.allowed(s, s.pod("x/a"), IPv4Address("192.168.1.1"), 80, "TCP")


def test_icmp_only_passes_rules_without_ports(model):
    s = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"ports": [{"protocol": "UDP"}]}]))
    assert not reference.allowed(s, s.pod("y/a"), s.pod("x/a"), 0, "ICMP")
    s = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [{"namespaceSelector": {}}]}]))
    assert reference.allowed(s, s.pod("y/a"), s.pod("x/a"), 0, "ICMP")


def test_label_changes_move_pods_in_and_out(model):
    s = with_policies(model, policy("p", "x", SELECT_A, ingress=[{"from": [namespaces(ns="y")]}]))
    assert not reference.allowed(s, s.pod("z/b"), s.pod("x/a"), 80, "TCP")
    s2 = set_namespace_labels("z", {"ns": "y"})(s)
    assert reference.allowed(s2, s2.pod("z/b"), s2.pod("x/a"), 80, "TCP")
    s3 = set_pod_labels("x/a", {"pod": "q"})(s)
    assert reference.allowed(s3, s3.pod("z/b"), s3.pod("x/a"), 80, "TCP")
