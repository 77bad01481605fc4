"""The policy compiler: pods + NetworkPolicies -> identities, ipcache and per-endpoint policy entries.

The data plane answers "may this packet pass?" with a few lookups in an LPM policy map whose key is
(endpoint, remote identity, direction, protocol, destination port) — protocol and port last, so a
prefix can leave them out (any protocol) or cover a power-of-two block of ports (port ranges), as
Cilium's policy map does. The packet's remote address is first resolved through the ipcache (an
LPM map: address/prefix -> identity) into two identities:

- the label identity of a pod (HOST for a node's own address, WORLD otherwise), which selector
  rules are keyed by, and
- the local identity of the ipcache entry itself (one per pod address and per policy prefix), which
  ipBlock rules and egress named ports are keyed by. This is where we follow Kubernetes rather than
  Cilium: an ipBlock matches pod addresses too. An ipBlock with except compiles to the local
  identities of the entries inside the CIDR and not inside an except; because every CIDR and
  every except is itself an ipcache prefix, the longest match of any address lands on an entry
  that is exactly as inside/outside the block as the address.

Lookup order in the data plane (all allows, so any hit allows): remote label identity (exact port,
port range, any port, any protocol by LPM), then identity ANY (L3 wildcard), then the local
identity. An endpoint no policy selects in a direction is not isolated and skips the lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network

from bpfnet.podnet.config import (
    ConfigError,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    Pod,
    PodnetState,
)
from bpfnet.podnet.identity import (
    ANY,
    HOST,
    WORLD,
    LabelSet,
    allocate_identities,
    allocate_local_identities,
)


class Direction(IntEnum):
    INGRESS = 0
    EGRESS = 1

    @property
    def policy_type(self) -> str:
        return "Ingress" if self is Direction.INGRESS else "Egress"


ANY_PROTOCOL = 0
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}
# Key bits before the protocol: endpoint (32) + identity (32) + direction (8).
PREFIX_ANY_PROTOCOL = 72
PREFIX_ANY_PORT = 80


@dataclass(frozen=True, order=True)
class PolicyKey:
    """One allow entry of an endpoint: remote identity, direction, protocol, port block."""

    endpoint: IPv4Address
    identity: int
    direction: Direction
    protocol: int = ANY_PROTOCOL
    port: int = 0          # first port of the block
    port_bits: int = 0     # leading bits of `port` that must match: 16 = one port, 0 = any port

    @property
    def prefixlen(self) -> int:
        if self.protocol == ANY_PROTOCOL:
            return PREFIX_ANY_PROTOCOL
        return PREFIX_ANY_PORT + self.port_bits

    def describe_ports(self) -> str:
        """any, TCP/any, TCP/80 or TCP/80-87 (one block)."""
        if self.protocol == ANY_PROTOCOL:
            return "any"
        name = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.port_bits == 0:
            return f"{name}/any"
        last = self.port + (1 << (16 - self.port_bits)) - 1
        return f"{name}/{self.port}" + (f"-{last}" if last != self.port else "")


@dataclass(frozen=True)
class IpcacheEntry:
    identity: int          # label identity (pods), HOST or WORLD
    local_identity: int    # this entry's own identity, for ipBlock and per-pod rules


@dataclass
class EndpointPolicy:
    pod: str
    address: IPv4Address
    node: str
    identity: int
    ingress_isolated: bool = False
    egress_isolated: bool = False
    entries: set[PolicyKey] = field(default_factory=set)
    selected_by: dict[Direction, list[str]] = field(default_factory=dict)


@dataclass
class CompiledPolicy:
    identities: dict[str, int]                        # pod key -> identity
    label_sets: dict[int, LabelSet]                   # identity -> its labels
    ipcache: dict[IPv4Network, IpcacheEntry]
    endpoints: dict[str, EndpointPolicy]              # pod key -> its compiled policy

    def endpoints_on(self, node: str) -> list[EndpointPolicy]:
        return [ep for ep in self.endpoints.values() if ep.node == node]


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """Cover first..last with aligned power-of-two blocks: [(start, leading bits)], fewest blocks."""
    blocks = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while first + size - 1 > last:
            size >>= 1
        blocks.append((first, 16 - size.bit_length() + 1))
        first += size
    return blocks


def compile_policy(state: PodnetState) -> CompiledPolicy:
    return _Compiler(state).compile()


class _Compiler:
    def __init__(self, state: PodnetState):
        missing = [p.key for p in state.pods if p.address is None]
        if missing:
            raise ConfigError(f"pods without an address cannot be compiled: {', '.join(missing)}")
        self.state = state
        self.label_set = {p.key: LabelSet.of(p.labels, state.namespace_labels(p.namespace))
                          for p in state.pods}
        identities = allocate_identities(self.label_set.values())
        self.identity = {key: identities[ls] for key, ls in self.label_set.items()}
        self.ipcache = self._ipcache()

    def _ipcache(self) -> dict[IPv4Network, IpcacheEntry]:
        labelled: dict[IPv4Network, int] = {}
        for policy in self.state.policies:
            for peer in _peers(policy):
                if peer.ip_block is not None:
                    for prefix in (peer.ip_block.cidr, *peer.ip_block.except_):
                        labelled[prefix] = WORLD
        for node in self.state.nodes:
            labelled[IPv4Network(node.router_address)] = HOST
        for pod in self.state.pods:
            labelled[IPv4Network(pod.address)] = self.identity[pod.key]
        local = allocate_local_identities(str(prefix) for prefix in labelled)
        return {prefix: IpcacheEntry(identity, local[str(prefix)])
                for prefix, identity in sorted(labelled.items())}

    def compile(self) -> CompiledPolicy:
        endpoints = {pod.key: self._endpoint(pod) for pod in self.state.pods}
        return CompiledPolicy(
            identities=dict(self.identity),
            label_sets={self.identity[k]: ls for k, ls in self.label_set.items()},
            ipcache=self.ipcache,
            endpoints=endpoints,
        )

    def _endpoint(self, pod: Pod) -> EndpointPolicy:
        endpoint = EndpointPolicy(pod=pod.key, address=pod.ip, node=pod.node,
                                  identity=self.identity[pod.key])
        for direction in Direction:
            selecting = [p for p in self.state.policies
                         if direction.policy_type in p.spec.effective_policy_types and p.selects(pod)]
            endpoint.selected_by[direction] = [p.key for p in selecting]
            if direction is Direction.INGRESS:
                endpoint.ingress_isolated = bool(selecting)
            else:
                endpoint.egress_isolated = bool(selecting)
            for policy in selecting:
                rules = policy.spec.ingress if direction is Direction.INGRESS else policy.spec.egress
                for rule in rules:
                    endpoint.entries |= self._rule_entries(pod, policy, direction, rule.peers,
                                                           rule.ports)
        return endpoint

    def _rule_entries(self, pod: Pod, policy: NetworkPolicy, direction: Direction,
                      peers: list[NetworkPolicyPeer], ports: list[NetworkPolicyPort]
                      ) -> set[PolicyKey]:
        entries: set[PolicyKey] = set()

        def add(identity: int, protocol: int = ANY_PROTOCOL, first: int = 0, last: int = 65535):
            if protocol == ANY_PROTOCOL:
                entries.add(PolicyKey(pod.ip, identity, direction))
                return
            for start, bits in port_blocks(first, last):
                entries.add(PolicyKey(pod.ip, identity, direction, protocol, start, bits))

        # Remote identities the rule's peers stand for; per-pod peers are needed by egress named
        # ports, whose number depends on the destination pod.
        remote = self._peer_identities(policy, peers)
        if not ports:
            for identity in remote:
                add(identity)
            return entries
        for port in ports:
            protocol = port.protocol.number
            if isinstance(port.port, str) and direction is Direction.EGRESS:
                for target in self._peer_pods(policy, peers):
                    number = target.named_port(port.port, port.protocol)
                    if number is not None:
                        add(self._pod_local_identity(target), protocol, number, number)
                continue
            if isinstance(port.port, str):
                number = pod.named_port(port.port, port.protocol)
                if number is None:
                    continue  # this pod has no such named port: the rule allows nothing here
                first, last = number, number
            elif port.port is None:
                first, last = 0, 65535
            else:
                first = port.port
                last = port.end_port if port.end_port is not None else port.port
            for identity in remote:
                add(identity, protocol, first, last)
        return entries

    def _peer_identities(self, policy: NetworkPolicy, peers: list[NetworkPolicyPeer]) -> set[int]:
        if not peers:
            return {ANY}
        identities: set[int] = set()
        for peer in peers:
            if peer.ip_block is not None:
                block = peer.ip_block
                identities |= {
                    entry.local_identity for prefix, entry in self.ipcache.items()
                    if prefix.subnet_of(block.cidr)
                    and not any(prefix.subnet_of(e) for e in block.except_)
                }
            else:
                identities |= {self.identity[p.key] for p in self.state.pods
                               if _selector_peer_matches(self.state, policy, peer, p)}
        return identities

    def _peer_pods(self, policy: NetworkPolicy, peers: list[NetworkPolicyPeer]) -> list[Pod]:
        if not peers:
            return list(self.state.pods)
        return [p for p in self.state.pods if any(
            peer.ip_block.contains(p.ip) if peer.ip_block is not None
            else _selector_peer_matches(self.state, policy, peer, p) for peer in peers)]

    def _pod_local_identity(self, pod: Pod) -> int:
        return self.ipcache[IPv4Network(pod.address)].local_identity


def _peers(policy: NetworkPolicy) -> list[NetworkPolicyPeer]:
    return ([peer for rule in policy.spec.ingress for peer in rule.peers]
            + [peer for rule in policy.spec.egress for peer in rule.peers])


def _selector_peer_matches(state: PodnetState, policy: NetworkPolicy, peer: NetworkPolicyPeer,
                           pod: Pod) -> bool:
    """podSelector alone: the policy's namespace; namespaceSelector alone: any pod there; both: AND."""
    if peer.namespace_selector is None:
        namespace_ok = pod.namespace == policy.namespace
    else:
        namespace_ok = peer.namespace_selector.matches(state.namespace_labels(pod.namespace))
    return namespace_ok and (peer.pod_selector is None or peer.pod_selector.matches(pod.labels))
