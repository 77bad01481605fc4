"""The pod data plane of one node: ctypes mirrors of bpf/include/pod/structs.h and the map updates.

`desired_maps` turns the compiled policy plus the node's veths into the exact map contents;
`NodeDataplane.sync` diffs them against what the kernel holds and writes the difference in an
order no packet can be hurt by: new policy entries before the addresses or flags that use them,
removals after, and the policy revision bumped last so established flows are re-checked once
against the finished state.
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Self

from bpfnet.app.counters import Counter
from bpfnet.ebpf import Map, Objects, ObjectSpec, Program, TypedMap
from bpfnet.podnet.policy import CompiledPolicy, Direction, PolicyKey
from bpfnet.podnet.servicelb import BackendKey, BackendValue, ServiceEntry, SvcKey, SvcValue, write_services

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
MAC = u8 * 6
IPV4 = u8 * 4

EP_F_INGRESS_ISOLATED = 1
EP_F_EGRESS_ISOLATED = 2
CT_F_CLOSING = 1


class Outcome(IntEnum):
    """What happened to a packet (enum pod_outcome); drops carry Cilium's drop reason numbers."""

    FORWARDED = 0
    TO_STACK = 1
    DELIVERED = 2
    ARP_REPLIED = 3
    PASSED = 4
    TUNNELED = 5
    SERVICE_TRANSLATED = 6
    SERVICE_REPLIED = 7
    DROP_INVALID_SOURCE = 132
    DROP_POLICY_DENIED = 133
    DROP_INVALID_PACKET = 134
    DROP_UNKNOWN_L3 = 139
    DROP_WRITE_ERROR = 141
    DROP_CT_INSERT_FAILED = 155
    DROP_FRAGMENT = 157
    DROP_NO_SERVICE_BACKEND = 158
    DROP_NO_TUNNEL_ENDPOINT = 160
    DROP_INVALID_IDENTITY = 171
    DROP_TTL_EXCEEDED = 196
    DROP_UNKNOWN_ENDPOINT = 203


class EndpointValue(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("flags", u32), ("mac", MAC), ("node_mac", MAC)]


class IpcacheKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", IPV4)]


class IpcacheValue(ctypes.Structure):
    _fields_ = [("identity", u32), ("local_identity", u32), ("tunnel_endpoint", IPV4)]


class NodeConfig(ctypes.Structure):
    _fields_ = [("tunnel_ifindex", u32), ("underlay_addr", IPV4)]


class PolicyMapKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("endpoint", IPV4), ("identity", u32), ("direction", u8),
                ("protocol", u8), ("dport", u16)]  # dport in network order


class PolicyValue(ctypes.Structure):
    _fields_ = [("packets", u64)]


class CtKey(ctypes.Structure):
    _fields_ = [("saddr", IPV4), ("daddr", IPV4), ("sport", u16), ("dport", u16),
                ("protocol", u8), ("pad", u8 * 3)]  # ports in network order


class CtValue(ctypes.Structure):
    _fields_ = [("last_seen_ns", u64), ("packets_forward", u64), ("packets_reply", u64),
                ("revision", u32), ("flags", u32), ("tunnel_endpoint", IPV4), ("pad", u32)]


class SvcFlow(ctypes.Structure):
    _fields_ = [("backend_addr", IPV4), ("backend_port", u16), ("pad", u16), ("service_id", u32)]


class SvcFallbackCounters(ctypes.Structure):
    _fields_ = [("flows", u64), ("packets", u64)]


def mac_bytes(mac: str | bytes) -> bytes:
    return mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", ""))


def ipcache_key(prefix: IPv4Network) -> IpcacheKey:
    return IpcacheKey(prefix.prefixlen, IPV4(*prefix.network_address.packed))


def policy_map_key(entry: PolicyKey) -> PolicyMapKey:
    return PolicyMapKey(entry.prefixlen, IPV4(*entry.endpoint.packed), entry.identity,
                        int(entry.direction), entry.protocol, socket.htons(entry.port))


def policy_entry(key: PolicyMapKey) -> PolicyKey:
    bits = key.prefixlen - 80 if key.protocol else 0
    return PolicyKey(IPv4Address(bytes(key.endpoint)), key.identity, Direction(key.direction),
                     key.protocol, socket.ntohs(key.dport), bits)


@dataclass(frozen=True)
class EndpointLink:
    """A pod's veth as the node sees it."""

    ifindex: int       # host side
    mac: bytes         # the pod's eth0
    node_mac: bytes    # the host side: the pod's gateway


@dataclass(frozen=True)
class Overlay:
    """How a node reaches the pods of the others: its VXLAN device and every node's underlay address."""

    tunnel_ifindex: int
    underlay: dict[str, IPv4Address]   # node name -> underlay address


NO_TUNNEL = IPv4Address(0)


@dataclass
class DesiredMaps:
    endpoints: dict[IPv4Address, tuple[int, int, bytes, bytes]] = field(default_factory=dict)
    # prefix -> (identity, local identity, tunnel endpoint: the node holding a remote pod, else 0)
    ipcache: dict[IPv4Network, tuple[int, int, IPv4Address]] = field(default_factory=dict)
    policy: set[PolicyKey] = field(default_factory=set)
    node: tuple[int, IPv4Address] = (0, NO_TUNNEL)  # (tunnel ifindex, own underlay address)


def desired_maps(compiled: CompiledPolicy, node: str, links: dict[str, EndpointLink],
                 overlay: Overlay | None = None) -> DesiredMaps:
    """Map contents for `node`: its endpoints that have a veth, every ipcache entry (pods of other
    nodes with their node's underlay address when there is an overlay), their policy."""
    remote = {}
    if overlay is not None:
        remote = {IPv4Network(ep.address): overlay.underlay[ep.node]
                  for ep in compiled.endpoints.values()
                  if ep.node != node and ep.node in overlay.underlay}
    desired = DesiredMaps(ipcache={prefix: (e.identity, e.local_identity, remote.get(prefix, NO_TUNNEL))
                                   for prefix, e in compiled.ipcache.items()})
    if overlay is not None:
        desired.node = (overlay.tunnel_ifindex, overlay.underlay.get(node, NO_TUNNEL))
    for endpoint in compiled.endpoints_on(node):
        link = links.get(endpoint.pod)
        if link is None:
            continue
        flags = ((EP_F_INGRESS_ISOLATED if endpoint.ingress_isolated else 0)
                 | (EP_F_EGRESS_ISOLATED if endpoint.egress_isolated else 0))
        desired.endpoints[endpoint.address] = (link.ifindex, flags, link.mac, link.node_mac)
        desired.policy |= endpoint.entries
    return desired


@dataclass
class SyncResult:
    added: int = 0
    changed: int = 0
    removed: int = 0

    @property
    def total(self) -> int:
        return self.added + self.changed + self.removed


class PodObjects(Objects):
    """pod.bpf.c: a node's maps and its four tc programs."""

    source = "pod"
    endpoints: Annotated[TypedMap[ctypes.c_uint32, EndpointValue], "pod_endpoints"]  # by IPv4 address
    ipcache: Annotated[TypedMap[IpcacheKey, IpcacheValue], "pod_ipcache"]
    policy: Annotated[TypedMap[PolicyMapKey, PolicyValue], "pod_policy"]
    conntrack: Annotated[TypedMap[CtKey, CtValue], "pod_conntrack"]
    revision_map: Annotated[Map, "pod_revision"]
    node_map: Annotated[TypedMap[ctypes.c_uint32, NodeConfig], "pod_node"]
    flow_events: Annotated[Map, "pod_flows"]            # ring buffer of flows.FlowEvent
    flow_lost_map: Annotated[TypedMap[ctypes.c_uint32, ctypes.c_uint64], "pod_flow_lost"]
    metrics_map: Annotated[TypedMap[ctypes.c_uint32, Counter], "pod_metrics"]
    services: Annotated[TypedMap[SvcKey, SvcValue], "pod_services"]
    backends: Annotated[TypedMap[BackendKey, BackendValue], "pod_backends"]
    service_stats: Annotated[TypedMap[ctypes.c_uint32, SvcFallbackCounters], "pod_svc_stats"]
    service_flows: Annotated[TypedMap[CtKey, SvcFlow], "pod_svc_flows"]
    from_container: Annotated[Program, "pod_from_container"]
    to_container: Annotated[Program, "pod_to_container"]
    from_overlay: Annotated[Program, "pod_from_overlay"]
    from_netdev: Annotated[Program, "pod_from_netdev"]


class NodeDataplane(PodObjects):
    """The loaded pod.o of one node: its maps, its programs and the operations on them.
    `load(max_entries={map name: entries})` resizes maps before loading."""

    @classmethod
    def load(cls, spec: ObjectSpec | None = None, pin_dir: Path | None = None, **kwargs: Any) -> Self:
        spec = spec or cls.spec()
        for name, entries in (kwargs.pop("max_entries", None) or {}).items():
            spec.set_max_entries(name, entries)
        return super().load(spec, pin_dir, **kwargs)

    # --- state ------------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        value = self.revision_map.lookup(bytes(4))
        return int.from_bytes(value, "little") if value else 0

    def bump_revision(self) -> None:
        self.revision_map.update(bytes(4), ((self.revision + 1) & 0xFFFFFFFF).to_bytes(4, "little"))

    def actual(self) -> DesiredMaps:
        actual = DesiredMaps()
        for key, value in self.endpoints.items():
            actual.endpoints[IPv4Address(bytes(key))] = (value.ifindex, value.flags,
                                                         bytes(value.mac), bytes(value.node_mac))
        for prefix_key, entry in self.ipcache.items():
            prefix = IPv4Network((bytes(prefix_key.addr), prefix_key.prefixlen))
            actual.ipcache[prefix] = (entry.identity, entry.local_identity,
                                      IPv4Address(bytes(entry.tunnel_endpoint)))
        actual.policy = {policy_entry(key) for key, _ in self.policy.items()}
        config = self.node_map.lookup(u32(0))
        actual.node = (config.tunnel_ifindex, IPv4Address(bytes(config.underlay_addr)))
        return actual

    def sync(self, desired: DesiredMaps) -> SyncResult:
        """Make the maps hold `desired`, in an order that never opens or closes a gap."""
        actual = self.actual()
        result = SyncResult()
        for entry in desired.policy - actual.policy:
            self.policy.update(policy_map_key(entry), PolicyValue())
            result.added += 1
        if actual.node != desired.node:
            ifindex, underlay = desired.node
            self.node_map.update(u32(0), NodeConfig(ifindex, IPV4(*underlay.packed)))
            result.changed += 1
        for prefix, (identity, local, tunnel) in desired.ipcache.items():
            if actual.ipcache.get(prefix) != (identity, local, tunnel):
                self.ipcache.update(ipcache_key(prefix),
                                    IpcacheValue(identity, local, IPV4(*tunnel.packed)))
                result.changed += 1
        for address, (ifindex, flags, mac, node_mac) in desired.endpoints.items():
            if actual.endpoints.get(address) != (ifindex, flags, mac, node_mac):
                self.endpoints.update(address.packed,
                                      EndpointValue(ifindex, flags, MAC(*mac), MAC(*node_mac)))
                result.changed += 1
        for entry in actual.policy - desired.policy:
            self.policy.delete(policy_map_key(entry))
            result.removed += 1
        for address in actual.endpoints.keys() - desired.endpoints.keys():
            self.endpoints.delete(address.packed)
            result.removed += 1
        for prefix in actual.ipcache.keys() - desired.ipcache.keys():
            self.ipcache.delete(ipcache_key(prefix))
            result.removed += 1
        if result.total:
            self.bump_revision()
        return result

    def apply_services(self, entries: list[ServiceEntry]) -> None:
        """The services the tc fallback serves (the socket LB's entries), then forget the flows
        whose backend is no longer in their service's set: their next packet picks again."""
        write_services(self.services, self.backends, entries)
        current = {(e.service_id, IPv4Address(b.address).packed, b.port)
                   for e in entries for b in e.backends}
        stale = [key for key, flow in self.service_flows.items()
                 if (flow.service_id, bytes(flow.backend_addr), socket.ntohs(flow.backend_port)) not in current]
        for key in stale:
            self.service_flows.delete(key)

    # --- observation ------------------------------------------------------------------------
    def service_counters(self, service_id: int) -> dict[str, int]:
        """Flows and packets the tc fallback translated for a service on this node."""
        per_cpu = self.service_stats.lookup(u32(service_id)) or []
        return {field: sum(getattr(c, field) for c in per_cpu) for field, *_ in SvcFallbackCounters._fields_}

    def counters(self) -> dict[tuple[Outcome, Direction], tuple[int, int]]:
        """(outcome, direction) -> (packets, bytes), summed over CPUs; only nonzero slots."""
        totals = {}
        for outcome in Outcome:
            for direction in Direction:
                per_cpu = self.metrics_map.lookup(u32((outcome << 1) | direction))
                packets = sum(c.packets for c in per_cpu)
                if packets:
                    totals[(outcome, direction)] = (packets, sum(c.bytes for c in per_cpu))
        return totals

    def lost_flow_events(self) -> int:
        """Flow events the kernel could not write because pod_flows was full (all CPUs)."""
        return sum(count.value for count in self.flow_lost_map.lookup(u32(0)))

    def policy_hits(self) -> dict[PolicyKey, int]:
        return {policy_entry(key): value.packets for key, value in self.policy.items()}

    def flows(self) -> list[dict]:
        flows = []
        for key, value in self.conntrack.items():
            flows.append({
                "source": f"{IPv4Address(bytes(key.saddr))}:{socket.ntohs(key.sport)}",
                "destination": f"{IPv4Address(bytes(key.daddr))}:{socket.ntohs(key.dport)}",
                "protocol": key.protocol, "packets_forward": value.packets_forward,
                "packets_reply": value.packets_reply, "revision": value.revision,
                "closing": bool(value.flags & CT_F_CLOSING), "last_seen_ns": value.last_seen_ns,
            })
        return flows

    def expire_flows(self, now_ns: int, timeouts: ConntrackTimeouts) -> int:
        """Delete conntrack entries idle longer than their timeout; `now_ns` on CLOCK_MONOTONIC."""
        expired = [key for key, value in self.conntrack.items()
                   if now_ns - value.last_seen_ns > timeouts.for_entry(key, value) * 1e9]
        for key in expired:
            self.conntrack.delete(key)
        return len(expired)


@dataclass(frozen=True)
class ConntrackTimeouts:
    """Idle timeouts in seconds (Cilium's defaults)."""

    tcp: float = 21600.0
    tcp_closing: float = 10.0
    other: float = 60.0

    def for_entry(self, key: CtKey, value: CtValue) -> float:
        if key.protocol != socket.IPPROTO_TCP:
            return self.other
        return self.tcp_closing if value.flags & CT_F_CLOSING else self.tcp
