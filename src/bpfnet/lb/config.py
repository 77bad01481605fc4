"""The load balancer's desired state: one pydantic schema for YAML files, the agent API and the CLI.

Example (``bpfnet lb apply -f lb.yaml``)::

    settings:
      interface: eth0
      gateway_mac: "02:00:00:00:00:01"
    vips:
      - address: 10.200.0.1
        port: 80
        protocol: tcp
        reals:
          - {address: 10.0.0.11, weight: 1}
          - {address: 10.0.0.12, weight: 2}
        health_check: {kind: http, path: /health}
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, IPvAnyAddress, IPvAnyNetwork, field_validator, model_validator

from bpfnet.app.objects import ObjectKind
from bpfnet.lb.maglev import MaglevVersion
from bpfnet.schema import U16, U32, InterfaceName, Port, StrictModel, Text

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["tcp", "udp"]
VipFlag = Literal["hash_no_src_port", "lru_bypass", "quic", "hash_dport_only", "src_routing",
                  "udp_stable_routing", "udp_flow_migration"]
# Katran's bit values (F_HASH_NO_SRC_PORT, F_LRU_BYPASS, F_QUIC_VIP, F_HASH_DPORT_ONLY, F_SRC_ROUTING,
# F_UDP_STABLE_ROUTING_VIP, F_UDP_FLOW_MIGRATION)
FLAG_BITS: dict[str, int] = {"hash_no_src_port": 1, "lru_bypass": 2, "quic": 4, "hash_dport_only": 8,
                             "src_routing": 16, "udp_stable_routing": 256, "udp_flow_migration": 512}
UDP_FLAGS = ("quic", "udp_stable_routing", "udp_flow_migration")
MAX_SERVER_IDS = 65536  # server_ids map size (lb/maps.h LB_MAX_SERVER_IDS)
MAX_SOURCE_ROUTES = 65536  # src_routes_v4 / src_routes_v6 sizes (LB_MAX_SRC_ROUTES)
MAX_DECAP_ADDRESSES = 64  # decap_addrs size (LB_MAX_DECAP_ADDRS)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# What the lb's maps may take in kernel memory together (ring slots, connection table, reals):
# a PUT must not be able to ask for more than a small machine can give (the map creation would fail
# with ENOMEM, or worse succeed and starve the host).
MAX_MAP_BYTES = 1 << 30
RING_SLOT_BYTES = 4  # ch_rings: __u32 real id per slot
# conn_table (LRU hash): struct lb_flow key (40) + struct lb_conn value (16) + the kernel's element
# header (about 56 bytes with the LRU node)
CONN_ENTRY_BYTES = 112
REAL_BYTES = 24 + 64  # reals (struct lb_addr) + nexthops and real_stats, about
DEFAULT_CONN_TABLE_SIZE = 1 << 22


def map_bytes(settings: LbSettings) -> int:
    """About how much kernel memory the lb's maps take with these settings."""
    return (settings.max_vips * settings.ring_size * RING_SLOT_BYTES
            + settings.conn_table_size * CONN_ENTRY_BYTES + settings.max_reals * REAL_BYTES)


class _Model(StrictModel):
    pass


class HealthCheck(_Model):
    """Probe of each real of a VIP. A real that fails ``fall`` probes in a row leaves the ring (its
    established flows stay on it through the connection table); ``rise`` good probes bring it back."""

    kind: Literal["tcp", "http", "udp"] = "tcp"
    port: Port | None = Field(None, description="default: the VIP's port")
    path: Text = Field("/", description="http: path of the GET; healthy = status 2xx/3xx")
    send: Text = Field("ping", description="udp: payload sent")
    expect: Text | None = Field(None, description="udp: reply must contain this (default: any reply)")
    interval: float = Field(2.0, gt=0, le=3600)
    timeout: float = Field(1.0, gt=0, le=60)
    rise: int = Field(2, ge=1, le=100)
    fall: int = Field(3, ge=1, le=100)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        if any(c.isspace() or not c.isprintable() for c in value):
            # it goes into the probe's request line: a CR/LF would add headers or requests
            raise ValueError(f"path must not contain spaces or control characters, got {value[:80]!r}")
        return value


class Real(_Model):
    address: IPvAnyAddress
    weight: int = Field(1, ge=0, le=1_000_000, description="0 = drained: no new flows")


class DownReal(_Model):
    """A real marked down on one VIP: out of the ring like a failed health check, and the UDP flows
    of a udp_flow_migration VIP leave it (Katran's down-reals set)."""

    vip: Text = Field(description="VIP name, e.g. 10.200.0.1:53/udp")
    address: IPvAnyAddress

    @field_validator("vip")
    @classmethod
    def _vip(cls, value: str) -> str:
        return vip_name(*parse_vip_name(value))


class ServerId(_Model):
    """A server id (in QUIC connection ids, UDP stable routing headers, TCP options) and the real
    that owns it (Katran's server_id_map)."""

    id: int = Field(ge=1, le=2**32 - 1)
    address: IPvAnyAddress


class Vip(_Model):
    address: IPvAnyAddress
    port: U16 = Field(description="0 = every port of the address (port-less VIP)")
    protocol: Protocol = "tcp"
    flags: list[VipFlag] = Field(default_factory=list)
    maglev: MaglevVersion = Field("v2", description="v2: shares follow weights; v1: Katran's default")
    reals: list[Real] = Field(default_factory=list)
    health_check: HealthCheck | None = None

    @property
    def name(self) -> str:
        return vip_name(self.address, self.port, self.protocol)

    @property
    def flag_bits(self) -> int:
        return sum(FLAG_BITS[f] for f in set(self.flags))

    @model_validator(mode="after")
    def _check_reals(self) -> Vip:
        if self.port == 0 and self.health_check is not None and self.health_check.port is None:
            raise ValueError(f"VIP {self.name} has no port: its health_check needs a port")
        for flag in UDP_FLAGS:
            if flag in self.flags and self.protocol != "udp":
                raise ValueError(f"VIP {self.name}: flag {flag} applies to UDP VIPs only")
        seen = set()
        for real in self.reals:
            if real.address in seen:
                raise ValueError(f"VIP {self.name}: real {real.address} is listed twice")
            seen.add(real.address)
            if self.address.version == 6 and real.address.version == 4:
                raise ValueError(f"VIP {self.name}: real {real.address} is IPv4, an IPv6 VIP needs "
                                 "IPv6 reals (there is no 6-in-4 encapsulation)")
        return self


class SourceRoute(_Model):
    """Clients in `prefix` go to the real `address` on VIPs with the src_routing flag (Katran's
    LPM source routing: the longest prefix wins)."""

    prefix: IPvAnyNetwork = Field(description="client network, e.g. 192.168.0.0/16 (host bits zero)")
    address: IPvAnyAddress

    @model_validator(mode="after")
    def _family(self) -> SourceRoute:
        if self.prefix.version == 6 and self.address.version == 4:
            raise ValueError(f"source route {self.prefix} -> {self.address}: IPv6 clients need an IPv6 real "
                             "(there is no 6-in-4 encapsulation)")
        return self


class LbSettings(_Model):
    """Data-plane settings; changing one reloads the program (maps and flows are kept, except when a
    size changes)."""

    interface: InterfaceName | None = Field(None, description="attach the XDP program here (None: load only)")
    xdp_mode: Literal["native", "generic"] = "native"
    use_fib: bool = Field(True, description="next hop MAC from the kernel's FIB (bpf_fib_lookup)")
    gateway_mac: str | None = Field(None, description="next hop when the FIB has no answer")
    encap: Literal["ipip", "gue"] = "ipip"
    gue_port: Port = 6080
    gue_source_v4: ipaddress.IPv4Address | None = None
    gue_source_v6: ipaddress.IPv6Address | None = None
    tcp_server_id_routing: bool = Field(
        False, description="Katran's TPR: non-SYN TCP packets with a server id option (kind 0xB7) go to its real")
    decap_addresses: list[IPvAnyAddress] = Field(
        default_factory=list, max_length=MAX_DECAP_ADDRESSES,
        description="the LB's own addresses: IPIP/GUE packets sent to them are decapsulated, then balanced")
    max_frame_size: Annotated[U32, Field(ge=64, le=9216)] = Field(
        1514, description="larger frames to a VIP are dropped")
    udp_timeout: float = Field(30.0, ge=0, le=86400,
                               description="seconds a UDP flow keeps its real (0 = forever)")
    # map sizes (u32 max_entries; ch_rings holds max_vips * ring_size slots), bounded together by
    # MAX_MAP_BYTES
    ring_size: Annotated[U32, Field(ge=3, le=1_000_003)] = 65537
    max_vips: Annotated[U32, Field(ge=1, le=4096)] = 64
    max_reals: Annotated[U32, Field(ge=2, le=65536)] = 4096
    # 4,194,304 flows (about 470 MB of kernel memory: the LRU hash is preallocated), one common LRU:
    # production-sized as Katran's default (8M) is, within MAX_MAP_BYTES with the default rings
    conn_table_size: Annotated[U32, Field(ge=16, le=16_000_000)] = DEFAULT_CONN_TABLE_SIZE

    @field_validator("gateway_mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if not _MAC.match(value):
                raise ValueError(f"gateway_mac must look like 02:00:00:00:00:01, got {value!r}")
        return value

    @field_validator("decap_addresses")
    @classmethod
    def _unique(cls, value: list) -> list:
        twice = next((a for a in value if value.count(a) > 1), None)
        if twice is not None:
            raise ValueError(f"decap address {twice} is listed twice")
        return value

    @field_validator("ring_size")
    @classmethod
    def _prime(cls, value: int) -> int:
        if any(value % d == 0 for d in range(2, int(value ** 0.5) + 1)):
            raise ValueError(f"ring_size must be prime (Maglev needs it), got {value}")
        return value

    @model_validator(mode="after")
    def _fits_memory(self) -> LbSettings:
        size = map_bytes(self)
        if size > MAX_MAP_BYTES:
            raise ValueError(
                f"the maps would take about {size / 2**20:,.0f} MiB (max_vips {self.max_vips} x ring_size "
                f"{self.ring_size} = {self.max_vips * self.ring_size:,} ring slots of {RING_SLOT_BYTES} bytes, "
                f"conn_table_size {self.conn_table_size:,} entries of about {CONN_ENTRY_BYTES} bytes); "
                f"the limit is {MAX_MAP_BYTES // 2**20:,} MiB")
        return self


class LbState(_Model):
    settings: LbSettings = Field(default_factory=LbSettings)
    vips: list[Vip] = Field(default_factory=list)
    server_ids: list[ServerId] = Field(default_factory=list, description="server id -> real address")
    down_reals: list[DownReal] = Field(default_factory=list, description="reals marked down, per VIP")
    source_routes: list[SourceRoute] = Field(default_factory=list,
                                             description="client prefix -> real (src_routing VIPs)")

    @model_validator(mode="after")
    def _check(self) -> LbState:
        names = set()
        for vip in self.vips:
            if vip.name in names:
                raise ValueError(f"VIP {vip.name} is defined twice")
            names.add(vip.name)
        if len(self.vips) > self.settings.max_vips:
            raise ValueError(f"{len(self.vips)} VIPs, settings.max_vips is {self.settings.max_vips}")
        listed = {(vip.name, real.address) for vip in self.vips for real in vip.reals}
        for down in self.down_reals:
            if (down.vip, down.address) not in listed:
                raise ValueError(f"down_reals: VIP {down.vip} has no real {down.address} (mark it up first "
                                 "to remove it)")
        ids: set[int] = set()
        for server in self.server_ids:
            if server.id in ids:
                raise ValueError(f"server id {server.id} is listed twice")
            ids.add(server.id)
        if len(ids) > MAX_SERVER_IDS:
            raise ValueError(f"{len(ids)} server ids, the data plane holds at most {MAX_SERVER_IDS}")
        prefixes = [route.prefix for route in self.source_routes]
        if len(set(prefixes)) != len(prefixes):
            twice = next(p for p in prefixes if prefixes.count(p) > 1)
            raise ValueError(f"source route {twice} is listed twice")
        for version in (4, 6):
            if sum(p.version == version for p in prefixes) > MAX_SOURCE_ROUTES:
                raise ValueError(f"more than {MAX_SOURCE_ROUTES} IPv{version} source routes")
        reals = ({real.address for vip in self.vips for real in vip.reals} | {s.address for s in self.server_ids}
                 | {r.address for r in self.source_routes})
        if len(reals) > self.settings.max_reals - 1:
            raise ValueError(f"{len(reals)} distinct reals, settings.max_reals allows {self.settings.max_reals - 1}")
        if self.settings.encap == "gue":
            families = {address.version for address in reals}
            for version, source in ((4, self.settings.gue_source_v4), (6, self.settings.gue_source_v6)):
                if version in families and source is None:
                    raise ValueError(f"settings.gue_source_v{version} is needed: GUE to IPv{version} reals")
        return self

    def vip(self, name: str) -> Vip:
        for vip in self.vips:
            if vip.name == name:
                return vip
        raise KeyError(f"no VIP {name} (VIPs: {', '.join(v.name for v in self.vips) or 'none'})")


# the per-object API: a VIP (without its reals) and each real, under its VIP
LB_OBJECTS = (ObjectKind("vips", "vips", lambda vip: vip.name,
                         children=(ObjectKind("reals", "reals", lambda real: str(real.address)),)),)


def vip_name(address: IPAddress, port: int, protocol: str) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}/{protocol}"


def parse_vip_name(text: str) -> tuple[IPAddress, int, Protocol]:
    """'10.0.0.1:80/tcp', '[fc00::1]:443/udp', '10.0.0.1:0/tcp' -> (address, port, protocol)."""
    match = re.fullmatch(r"\[?([0-9a-fA-F:.]+?)\]?:(\d+)(?:/(tcp|udp))?", text.strip())
    if not match:
        raise ValueError(f"VIP must look like 10.0.0.1:80/tcp or [fc00::1]:80/udp, got {text!r}")
    try:
        address = ipaddress.ip_address(match.group(1))
    except ValueError:
        raise ValueError(f"VIP {text!r}: {match.group(1)!r} is not an IP address") from None
    port = int(match.group(2))
    if port > 65535:
        raise ValueError(f"VIP {text!r}: port {port} is over 65535")
    return address, port, "udp" if match.group(3) == "udp" else "tcp"
