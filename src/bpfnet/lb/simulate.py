"""Which real the data plane picks for a flow: Katran's simulator, answered by the kernel's program.

A private copy of lb.o shares the live VIP, ring and real maps but has its own connection table and
counters, so asking changes nothing. The answer for a new flow comes from a SYN run through that copy
(BPF_PROG_TEST_RUN); an established flow may instead be pinned by the live connection table, which is
looked up directly.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from bpfnet.lb.config import LbSettings
from bpfnet.lb.dataplane import (
    CLOCK_MONOTONIC_COARSE,
    COARSE_CLOCK_RES_NS,
    COUNTERS,
    Dataplane,
    Flow,
    LbObjects,
    lb_spec,
    read_counters,
)
from bpfnet.lb.hashing import IPAddress
from bpfnet.lb.plan import PROTOCOL_NUMBERS

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
_LB_MAC = bytes.fromhex("020000000002")
_CLIENT_MAC = bytes.fromhex("020000000003")
_SIM_GATEWAY = "02:00:00:00:00:01"
_F_LRU_BYPASS, _F_HASH_NO_SRC_PORT, _F_HASH_DPORT_ONLY = 2, 1, 8


@dataclass(frozen=True)
class Pick:
    verdict: str                    # "tx" (to a real), "pass" (not a VIP), "drop"
    real: IPAddress | None = None   # for a new flow (the ring)
    drop_reason: str | None = None
    established_real: IPAddress | None = None  # where the live connection table pins the flow

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "real": _str(self.real), "drop_reason": self.drop_reason,
                "established_real": _str(self.established_real)}


def _str(address: IPAddress | None) -> str | None:
    return None if address is None else str(address)


def flow_frame(client: IPAddress, sport: int, vip: IPAddress, dport: int, protocol: str,
               syn: bool = True) -> bytes:
    """A minimal Ethernet frame of the flow (checksums left 0: the load balancer does not read them)."""
    proto = PROTOCOL_NUMBERS[protocol]
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02 if syn else 0x10, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    if client.version != vip.version:
        raise ValueError(f"client {client} and VIP {vip} are of different IP versions")
    if vip.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, client.packed, vip.packed)
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, client.packed, vip.packed)
        ethertype = 0x86DD
    return _LB_MAC + _CLIENT_MAC + struct.pack("!H", ethertype) + ip + l4


def outer_destination(frame: bytes) -> IPAddress:
    """The destination of the outer header of an encapsulated frame."""
    if struct.unpack_from("!H", frame, 12)[0] == 0x0800:
        return ipaddress.IPv4Address(frame[30:34])
    return ipaddress.IPv6Address(frame[38:54])


class Simulator:
    def __init__(self, settings: LbSettings, dataplane: Dataplane) -> None:
        private = settings.model_copy(update={"use_fib": False, "gateway_mac": _SIM_GATEWAY, "encap": "ipip"})
        spec = lb_spec(private)
        spec.set_max_entries("conn_table", 16)
        for typed in (dataplane.vip_map, dataplane.vip_addrs, dataplane.ch_rings, dataplane.reals,
                      dataplane.server_ids, dataplane.down_reals, dataplane.src_routes_v4, dataplane.src_routes_v6,
                      dataplane.portless_vips):
            spec.reuse_map(typed.map.name, typed.map)
        self.dataplane = dataplane
        self.objects = LbObjects.load(spec)  # a private copy of the program over the live tables
        self.program = self.objects.xdp_lb

    def close(self) -> None:
        self.objects.close()

    def pick(self, client: IPAddress | str, sport: int, vip: IPAddress | str, dport: int,
             protocol: str = "tcp") -> Pick:
        client, vip = ipaddress.ip_address(client), ipaddress.ip_address(vip)
        before = self._drops()
        result = self.program.test_run(flow_frame(client, sport, vip, dport, protocol))
        self.objects.conn_table.map.clear()
        established = self.established_real(client, sport, vip, dport, protocol)
        if result.retval == XDP_TX:
            return Pick("tx", outer_destination(result.data), established_real=established)
        if result.retval == XDP_DROP:
            after = self._drops()
            reason = next((name.removeprefix("drop_") for name in after if after[name] > before[name]), None)
            return Pick("drop", drop_reason=reason, established_real=established)
        return Pick("pass")

    def _drops(self) -> dict[str, int]:
        counters = read_counters(self.objects.lb_stats, COUNTERS)
        return {name: value["packets"] for name, value in counters.items() if name.startswith("drop_")}

    def established_real(self, client: IPAddress, sport: int, vip: IPAddress, dport: int,
                         protocol: str) -> IPAddress | None:
        """The real the live connection table holds for this flow, if any (and still valid)."""
        proto = PROTOCOL_NUMBERS[protocol]
        vips = self.dataplane.tables.vips
        entry = vips.get((vip, dport, proto))
        if entry is None:
            entry = vips.get((vip, 0, proto))
            if entry is None:
                return None
            if not entry.flags & _F_HASH_DPORT_ONLY:
                dport = 0
        if entry.flags & _F_LRU_BYPASS:
            return None
        if entry.flags & _F_HASH_NO_SRC_PORT:
            sport = 0
        conn = self.dataplane.conn_table.lookup(Flow.of(client, sport, vip, dport, proto))
        if conn is None:
            return None
        timeout_ns = int(self.dataplane.settings.udp_timeout * 1e9)
        now = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)  # the data plane's clock (lb.bpf.c)
        if proto == socket.IPPROTO_UDP and timeout_ns and now - conn.atime_ns + COARSE_CLOCK_RES_NS > timeout_ns:
            return None
        return self.dataplane.tables.reals.get(conn.real_id)
