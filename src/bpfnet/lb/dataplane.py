"""The load balancer's data plane from Python: mirrors of the C structs (bpf/include/lb_structs.h),
loading lb.o with its settings, and applying a plan of map operations (bpfnet.lb.plan)."""

from __future__ import annotations

import array
import ctypes
import ipaddress
import socket
from collections.abc import Collection, Iterable, Sequence

from bpfnet.ebpf import Map, Object, ObjectSpec
from bpfnet.lb.config import LbSettings, LbState
from bpfnet.lb.hashing import IPAddress
from bpfnet.lb.plan import (
    PROTOCOL_NUMBERS,
    MapOp,
    TableState,
    VipEntry,
    VipKeyT,
    allocate,
    applied,
    plan,
    removed_members,
    vip_wants,
)

FAMILY_V4, FAMILY_V6 = 4, 6
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}

# Names of enum lb_counter_id / lb_decap_counter_id, in order.
COUNTERS = ("rx", "pass", "drop", "tx", "redirect", "conn_hit", "conn_miss", "ring", "icmp_echo",
            "icmp_steered", "fib_ok", "fib_fallback", "drop_malformed", "drop_ip_options",
            "drop_fragment", "drop_too_big", "drop_no_real", "drop_no_route", "drop_encap", "fib_lookup")
DECAP_COUNTERS = ("rx", "ipip", "ip6ip6", "4in6", "gue", "pass")


class Addr(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]

    @classmethod
    def of(cls, address: IPAddress) -> Addr:
        return cls(_addr_bytes(address), address.version)

    def address(self) -> IPAddress:
        return _address(bytes(self.addr), self.family)


class VipKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint16),  # port: network order
                ("proto", ctypes.c_uint8), ("family", ctypes.c_uint8)]

    @classmethod
    def of(cls, key: VipKeyT) -> VipKey:
        address, port, proto = key
        return cls(_addr_bytes(address), socket.htons(port), proto, address.version)

    def key(self) -> VipKeyT:
        return _address(bytes(self.addr), self.family), socket.ntohs(self.port), self.proto


class VipMeta(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("vip_num", ctypes.c_uint32)]


class Flow(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint8 * 16), ("dst", ctypes.c_uint8 * 16), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2)]

    @classmethod
    def of(cls, src: IPAddress, sport: int, dst: IPAddress, dport: int, proto: int) -> Flow:
        return cls(_addr_bytes(src), _addr_bytes(dst), socket.htons(sport), socket.htons(dport), proto,
                   src.version)


class Conn(ctypes.Structure):
    _fields_ = [("real_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("atime_ns", ctypes.c_uint64)]


class NextHop(ctypes.Structure):
    """A next-hop cache entry (nexthops map, per CPU, by real id)."""
    _fields_ = [("real", Addr), ("in_ifindex", ctypes.c_uint32), ("stamp_ns", ctypes.c_uint64),
                ("out_ifindex", ctypes.c_uint32), ("dmac", ctypes.c_uint8 * 6), ("smac", ctypes.c_uint8 * 6)]


class Counter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def _addr_bytes(address: IPAddress) -> ctypes.Array:
    return (ctypes.c_uint8 * 16)(*address.packed.ljust(16, b"\0"))


def _address(raw: bytes, family: int) -> IPAddress:
    return ipaddress.IPv4Address(raw[:4]) if family == FAMILY_V4 else ipaddress.IPv6Address(raw)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _u32_list(values: Sequence[int]) -> list[bytes]:
    blob = array.array("I", values).tobytes()
    return [blob[i:i + 4] for i in range(0, len(blob), 4)]


def constants(settings: LbSettings) -> dict[str, int | bool | bytes]:
    """The `const volatile` settings of lb.bpf.c."""
    mac = bytes.fromhex(settings.gateway_mac.replace(":", "")) if settings.gateway_mac else bytes(6)
    return {
        "ring_size": settings.ring_size,
        "max_frame_size": settings.max_frame_size,
        "udp_timeout_ns": int(settings.udp_timeout * 1e9),
        "use_fib": settings.use_fib,
        "gateway_mac": mac,
        "use_gue": settings.encap == "gue",
        "gue_port": settings.gue_port,
        "gue_src_v4": settings.gue_source_v4.packed if settings.gue_source_v4 else bytes(4),
        "gue_src_v6": settings.gue_source_v6.packed if settings.gue_source_v6 else bytes(16),
    }


def lb_spec(settings: LbSettings) -> ObjectSpec:
    spec = ObjectSpec.builtin("lb")
    for name in ("vip_map", "vip_addrs", "vip_stats"):
        spec.set_max_entries(name, settings.max_vips)
    spec.set_max_entries("ch_rings", settings.max_vips * settings.ring_size)
    for name in ("reals", "real_stats", "nexthops"):
        spec.set_max_entries(name, settings.max_reals)
    spec.set_max_entries("conn_table", settings.conn_table_size)
    spec.constants.update(constants(settings))
    return spec


def sum_counters(per_cpu: list[Counter]) -> tuple[int, int]:
    return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)


class Dataplane:
    """The maps of one loaded (or adopted) load balancer and the operations on them."""

    MAP_NAMES = ("vip_map", "vip_addrs", "ch_rings", "reals", "conn_table", "lb_stats", "vip_stats",
                 "real_stats", "nexthops")

    def __init__(self, maps: dict[str, Map], settings: LbSettings) -> None:
        self.maps = maps
        self.settings = settings
        self.vip_map = maps["vip_map"].typed(VipKey, VipMeta)
        self.reals = maps["reals"].typed(ctypes.c_uint32, Addr)
        self.conn_table = maps["conn_table"].typed(Flow, Conn)
        self.tables = self.read_tables()

    @classmethod
    def from_object(cls, obj: Object, settings: LbSettings) -> Dataplane:
        return cls({name: obj.maps[name] for name in cls.MAP_NAMES}, settings)

    # --- state ----------------------------------------------------------------------------------
    def read_tables(self) -> TableState:
        """VIPs and reals as the maps hold them. Rings are not read back (65537 slots per VIP):
        the caller rewrites them whole after adopting, which leaves identical slots identical."""
        vips = {key.key(): VipEntry(meta.vip_num, meta.flags) for key, meta in self.vip_map.items()}
        reals = {key.value: real.address() for key, real in self.reals.items() if real.family}
        return TableState(vips=vips, reals=reals, rings={})

    def apply(self, state: LbState, down: Collection[tuple[str, IPAddress]] = ()) -> TableState:
        """Make the maps hold ``state`` (reals in ``down`` out of the rings). Raises PlanError or
        RingError before touching a map when the state does not fit."""
        size = self.settings.ring_size
        desired = allocate(self.tables, vip_wants(state, down), size, self.settings.max_vips,
                           self.settings.max_reals)
        self.execute(plan(self.tables, desired, size))
        stale = removed_members(self.tables, desired)
        self.tables = applied(self.tables, desired, size)
        if stale:
            self.forget_flows(stale)
        return self.tables

    def forget_flows(self, reals_by_vip: dict[VipKeyT, frozenset[int]]) -> int:
        """Delete connection-table entries of these VIPs' flows that name these reals."""
        vips = set(self.tables.vips) | set(reals_by_vip)
        doomed = []
        for raw_key, raw_value in self.maps["conn_table"].items_batch():
            flow = Flow.from_buffer_copy(raw_key)
            dst = _address(bytes(flow.dst), flow.family)
            vip = (dst, socket.ntohs(flow.dport), flow.proto)
            if vip not in vips:  # port-less VIP (its flows keep dport 0, or the port with dport-only)
                vip = (dst, 0, flow.proto)
            if Conn.from_buffer_copy(raw_value).real_id in reals_by_vip.get(vip, ()):
                doomed.append(raw_key)
        for key in doomed:
            self.maps["conn_table"].delete(key)
        return len(doomed)

    def execute(self, ops: Iterable[MapOp]) -> None:
        """Runs map operations in order (bpfnet.lb.plan orders them so no packet sees half a change)."""
        for op in ops:
            target = self.maps[op.map]
            if op.values is None:
                for key in op.keys:
                    target.delete(self._key(op.map, key))
            elif op.map == "ch_rings":  # up to ring_size slots per VIP: pack them in bulk
                target.update_batch(_u32_list(op.keys), _u32_list(op.values))
            else:
                keys = [self._key(op.map, key) for key in op.keys]
                values = [self._value(op.map, value) for value in op.values]
                if len(keys) > 1:
                    target.update_batch(keys, values)
                elif keys:
                    target.update(keys[0], values[0])

    def _key(self, map_name: str, key) -> bytes:
        if map_name == "vip_map":
            return bytes(VipKey.of(key))
        if map_name == "vip_addrs":
            return bytes(Addr.of(key))
        return _u32(key)

    def _value(self, map_name: str, value) -> bytes:
        if map_name == "vip_map":
            return bytes(VipMeta(value.flags, value.vip_num))
        if map_name == "vip_addrs":
            return _u32(value)
        if map_name == "reals":
            return bytes(Addr.of(value)) if value is not None else bytes(ctypes.sizeof(Addr))
        if map_name in ("vip_stats", "real_stats"):  # zeroed on every CPU for a new owner
            return bytes(ctypes.sizeof(Counter))
        return _u32(value)

    # --- counters -------------------------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        return read_counters(self.maps["lb_stats"], COUNTERS)

    def vip_counters(self, vip_num: int) -> tuple[int, int]:
        return sum_counters(self.maps["vip_stats"].typed(ctypes.c_uint32, Counter).lookup(_u32(vip_num)))

    def real_counters(self, real_id: int) -> tuple[int, int]:
        return sum_counters(self.maps["real_stats"].typed(ctypes.c_uint32, Counter).lookup(_u32(real_id)))


def read_counters(stats: Map, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """A per-CPU array of struct lb_counter as {name: {packets, bytes}}, summed over CPUs
    (lb_stats with COUNTERS, decap.bpf.c's decap_stats with DECAP_COUNTERS)."""
    typed = stats.typed(ctypes.c_uint32, Counter)
    result = {}
    for index, name in enumerate(names):
        packets, nbytes = sum_counters(typed.lookup(_u32(index)))
        result[name] = {"packets": packets, "bytes": nbytes}
    return result
