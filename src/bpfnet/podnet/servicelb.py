"""Socket-level load balancing for services: the Python side of bpf/sock_lb.bpf.c.

connect()/sendmsg() to a service address are rewritten to a backend by cgroup hooks; this module
keeps the services and backends maps equal to a list of `ServiceEntry` without a packet ever seeing
a half-written backend set: the new set is written under a fresh revision, the service is pointed
at it, and only then is the old revision deleted.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

from bpfnet.ebpf import AttachType, Link, Map, Object, Objects, ObjectSpec, Program, TypedMap

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FLAG_AFFINITY = 1
class SvcKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("family", ctypes.c_uint8)]


class SvcValue(ctypes.Structure):
    _fields_ = [("revision", ctypes.c_uint32), ("count", ctypes.c_uint16), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("service_id", ctypes.c_uint32)]


class BackendKey(ctypes.Structure):
    _fields_ = [("revision", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class BackendValue(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class ScopeClient(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 4), ("identity", ctypes.c_uint32)]


class SvcCounters(ctypes.Structure):
    _fields_ = [("connects", ctypes.c_uint64), ("datagrams", ctypes.c_uint64), ("refused", ctypes.c_uint64)]


@dataclass(frozen=True)
class Backend:
    address: str
    port: int


@dataclass(frozen=True)
class ServiceEntry:
    """One service address as the socket hooks see it."""

    service_id: int
    address: str
    port: int
    protocol: str
    backends: tuple[Backend, ...] = ()
    affinity: bool = False

    def key(self) -> SvcKey:
        return SvcKey(_addr16(self.address), socket.htons(self.port), PROTOCOLS[self.protocol],
                      _family(self.address))


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _addr16(address: str):
    packed = ipaddress.ip_address(address).packed
    return (ctypes.c_uint8 * 16)(*packed.ljust(16, b"\0"))


def write_services(services: TypedMap, backends: TypedMap, entries: Iterable[ServiceEntry]) -> None:
    """Make a (services, backends) map pair hold exactly `entries`: each changed backend set is
    written under a fresh revision, the service pointed at it, and only then the old one deleted.
    The socket LB and every node's tc fallback (pod/structs.h) keep their sets this way."""
    wanted = {bytes(e.key()): e for e in entries}
    current = {bytes(k): v for k, v in services.items()}
    revision = max((v.revision for v in current.values()), default=0)
    retired: list[SvcValue] = []
    for raw_key, entry in wanted.items():
        old = current.get(raw_key)
        if old is not None and _same(backends, old, entry):
            continue
        revision += 1
        keys = [BackendKey(revision, slot) for slot in range(len(entry.backends))]
        values = [BackendValue(_addr16(b.address), socket.htons(b.port), _family(b.address))
                  for b in entry.backends]
        backends.update_batch(keys, values)
        value = SvcValue(revision, len(entry.backends), FLAG_AFFINITY if entry.affinity else 0, 0,
                         entry.service_id)
        services.update(SvcKey.from_buffer_copy(raw_key), value)
        if old is not None:
            retired.append(old)
    for raw_key, old in current.items():
        if raw_key not in wanted:
            services.delete(SvcKey.from_buffer_copy(raw_key))
            retired.append(old)
    for old in retired:
        backends.delete_batch([BackendKey(old.revision, slot) for slot in range(old.count)])


def _same(backends: TypedMap, value: SvcValue, entry: ServiceEntry) -> bool:
    if (value.count, value.service_id, bool(value.flags & FLAG_AFFINITY)) != (
            len(entry.backends), entry.service_id, entry.affinity):
        return False
    for slot, backend in enumerate(entry.backends):
        stored = backends.lookup(BackendKey(value.revision, slot))
        if stored is None or (bytes(stored.addr), socket.ntohs(stored.port)) != (
                bytes(_addr16(backend.address)), backend.port):
            return False
    return True


class SockLbObjects(Objects):
    """sock_lb.bpf.c: the service tables and one program per cgroup socket hook."""

    source = "sock_lb"
    scope: Annotated[TypedMap[ctypes.c_uint64, ScopeClient], "netns_scope"]
    flow_events: Annotated[Map, "sock_flows"]           # ring buffer of flows.FlowEvent
    flow_lost_map: Annotated[TypedMap[ctypes.c_uint32, ctypes.c_uint64], "sock_flow_lost"]
    services: TypedMap[SvcKey, SvcValue]
    backends: TypedMap[BackendKey, BackendValue]
    counters_map: Annotated[TypedMap[ctypes.c_uint32, SvcCounters], "counters"]
    sock_connect4: Program
    sock_connect6: Program
    sock_sendmsg4: Program
    sock_sendmsg6: Program
    sock_recvmsg4: Program
    sock_recvmsg6: Program
    sock_getpeername4: Program
    sock_getpeername6: Program

    def hooks(self) -> list[tuple[Program, AttachType]]:
        """Each program with the cgroup hook it attaches to."""
        return [(self.sock_connect4, AttachType.CGROUP_INET4_CONNECT),
                (self.sock_connect6, AttachType.CGROUP_INET6_CONNECT),
                (self.sock_sendmsg4, AttachType.CGROUP_UDP4_SENDMSG),
                (self.sock_sendmsg6, AttachType.CGROUP_UDP6_SENDMSG),
                (self.sock_recvmsg4, AttachType.CGROUP_UDP4_RECVMSG),
                (self.sock_recvmsg6, AttachType.CGROUP_UDP6_RECVMSG),
                (self.sock_getpeername4, AttachType.CGROUP_INET4_GETPEERNAME),
                (self.sock_getpeername6, AttachType.CGROUP_INET6_GETPEERNAME)]


class SocketLoadBalancer(SockLbObjects):
    """The loaded socket-LB object: its maps, and links attaching its hooks to a cgroup."""

    def __init__(self, obj: Object) -> None:
        super().__init__(obj)
        self.links: list[Link] = []

    @classmethod
    def load(cls, spec: ObjectSpec | None = None, pin_dir: Path | None = None, **kwargs: Any) -> Self:
        """`scoped=True`: translate only sockets of the network namespaces given to `set_scope` (a
        pod network's own) and report their connect() translations to `flow_events`; otherwise
        every socket of the cgroups the hooks attach to, unreported."""
        spec = spec or cls.spec()
        spec.constants["scoped"] = bool(kwargs.pop("scoped", False))
        return super().load(spec, pin_dir, **kwargs)

    def attach(self, cgroup: Path, pin_dir: Path | None = None) -> list[Link]:
        """Attach every hook to `cgroup` (the cgroup v2 root covers every process). With `pin_dir`
        the links are pinned there, and links pinned by an earlier process are adopted: their
        programs are replaced atomically with this object's."""
        for program, attach_type in self.hooks():
            pinned = Path(pin_dir) / f"link_{program.name}" if pin_dir is not None else None
            if pinned is not None and pinned.exists():
                link = Link.from_pin(pinned)
                link.update(program)
            else:
                link = program.attach_cgroup(cgroup, attach_type)
                if pinned is not None:
                    link.pin(pinned)
            self.links.append(link)
        return self.links

    def detach(self) -> None:
        """Detach the hooks even where pinned links keep them."""
        for link in self.links:
            link.detach()
        self.close()

    def apply(self, entries: Iterable[ServiceEntry]) -> None:
        """Make the maps hold exactly `entries`."""
        write_services(self.services, self.backends, entries)

    def set_scope(self, clients: Mapping[int, tuple[str, int]]) -> None:
        """Make the scope hold exactly these network namespaces: netns cookie -> the address and
        identity its connect() translations are reported with (TRANSLATED flow events)."""
        current = {key.value: (str(ipaddress.IPv4Address(bytes(value.addr))), value.identity)
                   for key, value in self.scope.items()}
        for cookie, (address, identity) in clients.items():
            if current.get(cookie) != (address, identity):
                self.scope.update(ctypes.c_uint64(cookie),
                                  ScopeClient((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(address).packed), identity))
        for cookie in current.keys() - clients.keys():
            self.scope.delete(ctypes.c_uint64(cookie))

    def lost_flow_events(self) -> int:
        """TRANSLATED events the hooks could not write because sock_flows was full (all CPUs)."""
        return sum(count.value for count in self.flow_lost_map.lookup(ctypes.c_uint32(0)))

    def counters(self, service_id: int) -> dict[str, int]:
        per_cpu = self.counters_map.lookup(ctypes.c_uint32(service_id)) or []
        return {field: sum(getattr(c, field) for c in per_cpu) for field, *_ in SvcCounters._fields_}

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links.clear()
        super().close()
