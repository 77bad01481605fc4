"""A plain reference evaluator of Kubernetes NetworkPolicy semantics.

Written from the Kubernetes API documentation (concepts/services-networking/network-policies and
the networking.k8s.io/v1 reference), not from the compiler: it walks pods and policies directly for
one connection and is the oracle the compiled maps and the data plane are checked against.

1. A policy selects pods of its own namespace with spec.podSelector.
2. A pod is isolated for a direction if some policy selecting it has that direction in its
   (defaulted) policyTypes.
3. A -> B is allowed iff A's egress allows it and B's ingress allows it; a direction that is not
   isolated allows everything; an isolated direction allows what some rule of some selecting
   policy of that direction matches (rules only add; there is no order).
4. A rule matches when one of its peers matches (no peers: every peer) and one of its ports
   matches (no ports: every port and protocol).
5. Peers: podSelector alone = pods of the policy's namespace; namespaceSelector alone = every pod
   of the matching namespaces; both in one peer = AND; ipBlock = the CIDR minus its excepts,
   matched against the address, whether or not it belongs to a pod.
6. Ports: protocol defaults to TCP; a number, a number range up to endPort, or a name resolved
   against the destination pod's container ports of that protocol; no port = all ports of that
   protocol.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from bpfnet.podnet.config import (
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    Pod,
    PodnetState,
)

Endpoint = Pod | IPv4Address  # a pod, or an address outside the cluster


def allowed(state: PodnetState, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
    """Whether a new connection src -> dst:port/protocol is allowed ("TCP", "UDP", "SCTP", ...)."""
    return (_direction_allows(state, "Egress", src, dst, dst, port, protocol)
            and _direction_allows(state, "Ingress", dst, src, dst, port, protocol))


def _direction_allows(state: PodnetState, direction: str, subject: Endpoint, peer: Endpoint,
                      destination: Endpoint, port: int, protocol: str) -> bool:
    if not isinstance(subject, Pod):
        return True  # NetworkPolicy only constrains pods
    policies = [p for p in state.policies
                if direction in p.spec.effective_policy_types and p.selects(subject)]
    if not policies:
        return True
    for policy in policies:
        rules = policy.spec.ingress if direction == "Ingress" else policy.spec.egress
        for rule in rules:
            peers_ok = not rule.peers or any(_peer_matches(state, policy, pr, peer)
                                             for pr in rule.peers)
            ports_ok = not rule.ports or any(_port_matches(pt, destination, port, protocol)
                                             for pt in rule.ports)
            if peers_ok and ports_ok:
                return True
    return False


def _peer_matches(state: PodnetState, policy: NetworkPolicy, peer: NetworkPolicyPeer,
                  other: Endpoint) -> bool:
    if peer.ip_block is not None:
        address = other.address if isinstance(other, Pod) else other
        return address is not None and peer.ip_block.contains(address)
    if not isinstance(other, Pod):
        return False
    if peer.namespace_selector is None:
        namespace_ok = other.namespace == policy.namespace
    else:
        namespace_ok = peer.namespace_selector.matches(state.namespace_labels(other.namespace))
    pod_ok = peer.pod_selector is None or peer.pod_selector.matches(other.labels)
    return namespace_ok and pod_ok


def _port_matches(rule_port: NetworkPolicyPort, destination: Endpoint, port: int,
                  protocol: str) -> bool:
    if rule_port.protocol.value != protocol:
        return False
    if rule_port.port is None:
        return True
    if isinstance(rule_port.port, int):
        last = rule_port.end_port if rule_port.end_port is not None else rule_port.port
        return rule_port.port <= port <= last
    if not isinstance(destination, Pod):
        return False  # a named port names a container port, which only pods have
    return destination.named_port(rule_port.port, rule_port.protocol) == port


def matrix(state: PodnetState, port: int, protocol: str) -> dict[str, dict[str, bool]]:
    """{from: {to: allowed}} over every ordered pair of pods, named NS/NAME."""
    return {a.key: {b.key: allowed(state, a, b, port, protocol) for b in state.pods}
            for a in state.pods}
