"""The load balancer's data plane from Python: mirrors of the C structs (bpf/include/lb/structs.h),
loading lb.o with its settings, and applying a plan of map operations (bpfnet.lb.plan)."""

from __future__ import annotations

import array
import ctypes
import ipaddress
import socket
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from bpfnet.app.counters import Counter, sum_counters
from bpfnet.ebpf import Map, Object, Objects, ObjectSpec, Program, TypedMap
from bpfnet.lb.config import LbSettings, LbState
from bpfnet.lb.hashing import IPAddress
from bpfnet.lb.plan import (
    PROTOCOL_NUMBERS,
    IPNetwork,
    MapOp,
    TableState,
    VipEntry,
    VipKeyT,
    allocate,
    applied,
    plan,
    removed_members,
    routes,
    vip_wants,
)

FAMILY_V4, FAMILY_V6 = 4, 6
# bpf_ktime_get_coarse_ns() reads CLOCK_MONOTONIC_COARSE: connection-table stamps tick at its resolution
CLOCK_MONOTONIC_COARSE = 6
COARSE_CLOCK_RES_NS = int(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}

# Names of enum lb_counter_id / lb_decap_counter_id, in order.
COUNTERS = ("rx", "pass", "drop", "tx", "redirect", "conn_hit", "conn_miss", "ring", "icmp_echo",
            "icmp_steered", "fib_ok", "fib_fallback", "drop_malformed", "drop_ip_options",
            "drop_fragment", "drop_too_big", "drop_no_real", "drop_no_route", "drop_encap", "fib_lookup",
            "udp_migrated", "stable_routed", "stable_unknown", "stable_no_id", "src_routed", "src_unrouted",
            "quic_initial", "quic_cid_routed", "quic_cid_unknown", "quic_no_cid", "quic_cid_v0", "quic_cid_v1",
            "quic_cid_v2", "quic_cid_v3", "tpr_routed", "tpr_unknown", "tpr_no_id",
            "decap_ipip", "decap_gue", "sid_conn_new", "sid_conn_moved", "drop_ttl")
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


class DownKey(ctypes.Structure):
    _fields_ = [("vip_num", ctypes.c_uint32), ("real_id", ctypes.c_uint32)]


class LpmV4(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class LpmV6(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


def _lpm_key(prefix: IPNetwork) -> bytes:
    return prefix.prefixlen.to_bytes(4, "little") + prefix.network_address.packed


def _lpm_prefix(key: LpmV4 | LpmV6) -> IPNetwork:
    return ipaddress.ip_network((bytes(key.addr), key.prefixlen))


class Conn(ctypes.Structure):
    _fields_ = [("real_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("atime_ns", ctypes.c_uint64)]


class NextHop(ctypes.Structure):
    """A next-hop cache entry (nexthops map, per CPU, by real id)."""
    _fields_ = [("real", Addr), ("in_ifindex", ctypes.c_uint32), ("stamp_ns", ctypes.c_uint64),
                ("out_ifindex", ctypes.c_uint32), ("dmac", ctypes.c_uint8 * 6), ("smac", ctypes.c_uint8 * 6)]


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
        "clock_res_ns": COARSE_CLOCK_RES_NS,
        "use_fib": settings.use_fib,
        "gateway_mac": mac,
        "use_gue": settings.encap == "gue",
        "gue_port": settings.gue_port,
        "gue_src_v4": settings.gue_source_v4.packed if settings.gue_source_v4 else bytes(4),
        "gue_src_v6": settings.gue_source_v6.packed if settings.gue_source_v6 else bytes(16),
        "tcp_server_id_routing": settings.tcp_server_id_routing,
        "inline_decap": bool(settings.decap_addresses),
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


class LbObjects(Objects):
    """lb.bpf.c: the load balancer's maps and its XDP program."""

    source = "lb"
    vip_map: TypedMap[VipKey, VipMeta]
    vip_addrs: TypedMap[Addr, ctypes.c_uint32]
    ch_rings: TypedMap[ctypes.c_uint32, ctypes.c_uint32]
    reals: TypedMap[ctypes.c_uint32, Addr]
    conn_table: TypedMap[Flow, Conn]
    lb_stats: TypedMap[ctypes.c_uint32, Counter]
    vip_stats: TypedMap[ctypes.c_uint32, Counter]
    real_stats: TypedMap[ctypes.c_uint32, Counter]
    nexthops: TypedMap[ctypes.c_uint32, NextHop]
    server_ids: TypedMap[ctypes.c_uint32, ctypes.c_uint32]
    down_reals: TypedMap[DownKey, ctypes.c_uint32]
    src_routes_v4: TypedMap[LpmV4, ctypes.c_uint32]
    src_routes_v6: TypedMap[LpmV6, ctypes.c_uint32]
    decap_addrs: TypedMap[Addr, ctypes.c_uint32]
    portless_vips: TypedMap[ctypes.c_uint32, ctypes.c_uint32]
    xdp_lb: Program


def _empty_counter(_: object) -> bytes:
    return bytes(ctypes.sizeof(Counter))


def _real_value(real: IPAddress | None) -> bytes:
    return bytes(Addr.of(real)) if real is not None else bytes(ctypes.sizeof(Addr))


# How the plan's keys and values (bpfnet.lb.plan names the maps it writes) become map bytes.
_ENCODERS: dict[str, tuple[Callable[[Any], bytes], Callable[[Any], bytes]]] = {
    "vip_map": (lambda key: bytes(VipKey.of(key)), lambda meta: bytes(VipMeta(meta.flags, meta.vip_num))),
    "vip_addrs": (lambda address: bytes(Addr.of(address)), _u32),
    "ch_rings": (_u32, _u32),
    "reals": (_u32, _real_value),
    "vip_stats": (_u32, _empty_counter),   # zeroed on every CPU for a new owner
    "real_stats": (_u32, _empty_counter),
    "server_ids": (_u32, _u32),
    "down_reals": (lambda pair: bytes(DownKey(*pair)), _u32),
    "src_routes_v4": (_lpm_key, _u32),
    "src_routes_v6": (_lpm_key, _u32),
    "decap_addrs": (lambda address: bytes(Addr.of(address)), _u32),
    "portless_vips": (_u32, _u32),
}


class Dataplane(LbObjects):
    """One loaded (or adopted) load balancer: its maps and the operations on them."""

    def __init__(self, obj: Object, settings: LbSettings) -> None:
        super().__init__(obj)
        self.settings = settings
        self.tables = self.read_tables()

    # --- state ----------------------------------------------------------------------------------
    def read_tables(self) -> TableState:
        """VIPs and reals as the maps hold them. Rings are not read back (65537 slots per VIP):
        the caller rewrites them whole after adopting, which leaves identical slots identical."""
        vips = {key.key(): VipEntry(meta.vip_num, meta.flags) for key, meta in self.vip_map.items()}
        reals = {key.value: real.address() for key, real in self.reals.items() if real.family}
        server_ids = {key.value: real_id.value for key, real_id in self.server_ids.items()}
        down = frozenset((key.vip_num, key.real_id) for key in self.down_reals.keys())
        source_routes = {_lpm_prefix(key): real_id.value for table in (self.src_routes_v4, self.src_routes_v6)
                         for key, real_id in table.items()}
        decap = frozenset(key.address() for key in self.decap_addrs.keys())
        portless = self.portless_vips.lookup(_u32(0))
        return TableState(vips=vips, reals=reals, rings={}, server_ids=server_ids, down=down,
                          source_routes=source_routes, decap=decap, portless=bool(portless and portless.value))

    def apply(self, state: LbState, down: Collection[tuple[str, IPAddress]] = ()) -> TableState:
        """Make the maps hold ``state`` (reals in ``down`` out of the rings). Raises PlanError or
        RingError before touching a map when the state does not fit."""
        size = self.settings.ring_size
        desired = allocate(self.tables, vip_wants(state, down), size, self.settings.max_vips,
                           self.settings.max_reals, routes(state, down))
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
        for raw_key, raw_value in self.conn_table.map.items_batch():
            flow = Flow.from_buffer_copy(raw_key)
            dst = _address(bytes(flow.dst), flow.family)
            vip = (dst, socket.ntohs(flow.dport), flow.proto)
            if vip not in vips:  # port-less VIP (its flows keep dport 0, or the port with dport-only)
                vip = (dst, 0, flow.proto)
            if Conn.from_buffer_copy(raw_value).real_id in reals_by_vip.get(vip, ()):
                doomed.append(raw_key)
        for key in doomed:
            self.conn_table.delete(key)
        return len(doomed)

    def execute(self, ops: Iterable[MapOp]) -> None:
        """Runs map operations in order (bpfnet.lb.plan orders them so no packet sees half a change)."""
        maps = self.maps()
        for op in ops:
            target = maps[op.map]
            encode_key, encode_value = _ENCODERS[op.map]
            if op.values is None:
                for key in op.keys:
                    target.delete(encode_key(key))
            elif op.map == "ch_rings":  # up to ring_size slots per VIP: pack them in bulk
                target.update_batch(_u32_list(op.keys), _u32_list(op.values))
            else:
                keys = [encode_key(key) for key in op.keys]
                values = [encode_value(value) for value in op.values]
                if len(keys) > 1:
                    target.update_batch(keys, values)
                elif keys:
                    target.update(keys[0], values[0])

    # --- counters -------------------------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        return read_counters(self.lb_stats, COUNTERS)

    def vip_counters(self, vip_num: int) -> tuple[int, int]:
        return sum_counters(self.vip_stats.lookup(_u32(vip_num)))

    def real_counters(self, real_id: int) -> tuple[int, int]:
        return sum_counters(self.real_stats.lookup(_u32(real_id)))


def read_counters(stats: TypedMap[ctypes.c_uint32, Counter] | Map, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """A per-CPU array of struct lb_counter as {name: {packets, bytes}}, summed over CPUs
    (lb_stats with COUNTERS, decap.bpf.c's decap_stats with DECAP_COUNTERS)."""
    typed = stats.typed(ctypes.c_uint32, Counter) if isinstance(stats, Map) else stats
    result = {}
    for index, name in enumerate(names):
        packets, nbytes = sum_counters(typed.lookup(_u32(index)))
        result[name] = {"packets": packets, "bytes": nbytes}
    return result
