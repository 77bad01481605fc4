"""Packet fingerprints: the header fields a sample is described by, and conjunctions of
field = value predicates that render as tcpdump (pcap-filter) expressions.

A fingerprint is evaluated twice with the same meaning: here in Python on parsed samples (to
estimate coverage and collateral), and by libpcap -> cBPF -> eBPF in the data plane. So every
field reads exactly the bytes its rendered expression reads:

- IPv4 transport fields come after the IHL-sized header and only in first fragments (as
  libpcap's `tcp[...]`, `udp ... port` do).
- IPv6 transport fields are read only when the fixed header's next header is the transport
  itself (no extension headers), at absolute offsets `ip6[40 + ...]`; the scope says
  `ip6[6] = proto`, so packets with extension headers are never matched.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bpfnet.errors import BpfnetError

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PORT_PROTOCOLS = (TCP, UDP)
_PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp"}
_TCP_FLAG_NAMES = [(0x01, "tcp-fin"), (0x02, "tcp-syn"), (0x04, "tcp-rst"), (0x08, "tcp-push"),
                   (0x10, "tcp-ack"), (0x20, "tcp-urg"), (0x40, "tcp-ece"), (0x80, "tcp-cwr")]
_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q, _ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
_ADDRESS_BITS = {4: 32, 6: 128}
# Source prefix levels from most to least specific: (IPv4 length, IPv6 length).
SOURCE_PREFIX_LEVELS = ((32, 128), (24, 64), (16, 48), (8, 32))


class ParseError(BpfnetError, ValueError):
    """The bytes are not an IPv4/IPv6 packet the detector can describe."""


@dataclass(frozen=True, slots=True)
class PacketFields:
    """The header fields of one sampled packet. Addresses are integers (fast prefix math);
    fields the packet does not carry are None. (The parsers below build it positionally.)"""

    family: int  # 4 or 6
    protocol: int  # IPv4 protocol / IPv6 fixed header's next header
    src: int
    dst: int
    ttl: int  # IPv4 TTL / IPv6 hop limit
    ip_length: int  # IPv4 total length / IPv6 payload length
    ip_id: int | None = None  # IPv4 only
    frag: int | None = None  # IPv4 flags + fragment offset word (ip[6:2])
    src_port: int | None = None
    dst_port: int | None = None
    tcp_flags: int | None = None
    payload: bytes = b""  # transport payload bytes present in the sample
    vlan: int | None = None  # 802.1Q/802.1ad tag id; rules (plain pcap-filter) never match tagged frames

    @property
    def src_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src) if self.family == 4 else ipaddress.IPv6Address(self.src)

    @property
    def dst_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst) if self.family == 4 else ipaddress.IPv6Address(self.dst)

    @classmethod
    def from_frame(cls, frame: bytes) -> PacketFields:
        """Parse an Ethernet frame (optionally one VLAN tag), possibly truncated to the sample
        size. Raises ParseError for non-IP frames and truncated IP headers."""
        if len(frame) < 14:
            raise ParseError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
        offset, ethertype, vlan = 14, struct.unpack_from("!H", frame, 12)[0], None
        if ethertype in (_ETH_P_8021Q, _ETH_P_8021AD):
            if len(frame) < 18:
                raise ParseError("truncated VLAN tag")
            offset, vlan, ethertype = 18, struct.unpack_from("!H", frame, 14)[0] & 0x0FFF, \
                struct.unpack_from("!H", frame, 16)[0]
        if ethertype == _ETH_P_IP:
            return cls._from_ipv4(frame, offset, vlan)
        if ethertype == _ETH_P_IPV6:
            return cls._from_ipv6(frame, offset, vlan)
        raise ParseError(f"ethertype 0x{ethertype:04x} is not IPv4 or IPv6")

    @classmethod
    def _from_ipv4(cls, b: bytes, o: int, vlan: int | None) -> PacketFields:
        if len(b) < o + 20:
            raise ParseError("truncated IPv4 header")
        ver_ihl, length, ip_id, frag, ttl, protocol = _IPV4_HEADER.unpack_from(b, o)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < 20:
            raise ParseError(f"bad IPv4 version/IHL byte 0x{ver_ihl:02x}")
        src, dst = _IPV4_ADDRESSES.unpack_from(b, o + 12)
        # Transport header only in the first fragment.
        transport = _transport(b, o + ihl, protocol) if frag & 0x1FFF == 0 else _NO_TRANSPORT
        return cls(4, protocol, src, dst, ttl, length, ip_id, frag, *transport, vlan)

    @classmethod
    def _from_ipv6(cls, b: bytes, o: int, vlan: int | None) -> PacketFields:
        if len(b) < o + 40:
            raise ParseError("truncated IPv6 header")
        version, length, next_header, hop_limit = _IPV6_HEADER.unpack_from(b, o)
        if version >> 4 != 6:
            raise ParseError(f"bad IPv6 version byte 0x{version:02x}")
        src_hi, src_lo, dst_hi, dst_lo = _IPV6_ADDRESSES.unpack_from(b, o + 8)
        return cls(6, next_header, src_hi << 64 | src_lo, dst_hi << 64 | dst_lo, hop_limit, length, None, None,
                   *_transport(b, o + 40, next_header), vlan)


_IPV4_HEADER, _IPV4_ADDRESSES = struct.Struct("!BxHHHBB"), struct.Struct("!II")
_IPV6_HEADER, _IPV6_ADDRESSES = struct.Struct("!BxxxHBB"), struct.Struct("!QQQQ")
_UDP_PORTS, _TCP_HEADER = struct.Struct("!HH"), struct.Struct("!HH8xBB")
_NO_TRANSPORT = (None, None, None, b"")


def _transport(b: bytes, o: int, protocol: int) -> tuple[int | None, int | None, int | None, bytes]:
    """(src port, dst port, TCP flags, payload) of a TCP/UDP header at offset o, as far as the
    sample holds it (the order of PacketFields)."""
    if protocol == UDP and len(b) >= o + 8:
        sport, dport = _UDP_PORTS.unpack_from(b, o)
        return sport, dport, None, b[o + 8:]
    if protocol == TCP and len(b) >= o + 14:
        sport, dport, data_offset, flags = _TCP_HEADER.unpack_from(b, o)
        return sport, dport, flags, b[o + (data_offset >> 4) * 4:]
    return _NO_TRANSPORT


# --- fields ---------------------------------------------------------------------------------


class Field:
    """One header field a fingerprint may fix. `value` reads it from a sample (None when the
    packet has no such field); `render` writes `field = value` as a pcap-filter expression."""

    name: str

    def value(self, p: PacketFields) -> int | None:
        raise NotImplementedError

    def render(self, value: int, family: int, protocol: int) -> str:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Field) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Field({self.name})"


class SourcePrefix(Field):
    """The source address truncated to a prefix; the value is the prefix's top bits."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.lengths = {4: SOURCE_PREFIX_LEVELS[level][0], 6: SOURCE_PREFIX_LEVELS[level][1]}
        self.name = "src/" + "/".join(map(str, SOURCE_PREFIX_LEVELS[level]))

    def value(self, p: PacketFields) -> int:
        return p.src >> (_ADDRESS_BITS[p.family] - self.lengths[p.family])

    def network(self, value: int, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        length = self.lengths[family]
        return ipaddress.ip_network((value << (_ADDRESS_BITS[family] - length), length))

    def render(self, value: int, family: int, protocol: int) -> str:
        net = self.network(value, family)
        return f"src host {net.network_address}" if net.prefixlen == net.max_prefixlen else f"src net {net}"


class Port(Field):
    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.name = f"{direction} port"
        self._attr = "src_port" if direction == "src" else "dst_port"

    def value(self, p: PacketFields) -> int | None:
        return getattr(p, self._attr)

    def render(self, value: int, family: int, protocol: int) -> str:
        return f"{_PROTOCOL_NAMES[protocol]} {self.direction} port {value}"


class IpHeaderField(Field):
    """A fixed-offset IP header field: (v4 offset, v6 offset, size); None = absent in that family."""

    def __init__(self, name: str, attr: str, v4: tuple[int, int] | None, v6: tuple[int, int] | None,
                 hex_values: bool = False) -> None:
        self.name, self._attr, self._at, self._hex = name, attr, {4: v4, 6: v6}, hex_values

    def value(self, p: PacketFields) -> int | None:
        return getattr(p, self._attr) if self._at[p.family] else None

    def render(self, value: int, family: int, protocol: int) -> str:
        at = self._at[family]
        if at is None:
            raise ValueError(f"{self.name} has no IPv{family} field")
        offset, size = at
        index = f"{offset}" if size == 1 else f"{offset}:{size}"
        return f"{'ip' if family == 4 else 'ip6'}[{index}] = {f'0x{value:04x}' if self._hex else value}"


class TcpFlags(Field):
    name = "tcp flags"

    def value(self, p: PacketFields) -> int | None:
        return p.tcp_flags

    def render(self, value: int, family: int, protocol: int) -> str:
        if family == 6:
            return f"ip6[53] = 0x{value:02x}"
        names = "|".join(name for bit, name in _TCP_FLAG_NAMES if value & bit) or "0"
        return f"tcp[tcpflags] = {names}"


class PayloadWord(Field):
    """Four payload bytes at `offset` from the start of the TCP/UDP payload."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.name = f"payload[{offset}:4]"

    def value(self, p: PacketFields) -> int | None:
        if len(p.payload) < self.offset + 4:
            return None
        return int.from_bytes(p.payload[self.offset:self.offset + 4], "big")

    def render(self, value: int, family: int, protocol: int) -> str:
        o = self.offset
        if family == 4:
            index = f"{8 + o}" if protocol == UDP else f"((tcp[12] & 0xf0) >> 2) + {o}"
            return f"{_PROTOCOL_NAMES[protocol]}[{index}:4] = 0x{value:08x}"
        index = f"{48 + o}" if protocol == UDP else f"40 + ((ip6[52] & 0xf0) >> 2) + {o}"
        return f"ip6[{index}:4] = 0x{value:08x}"


SOURCE_PREFIXES = tuple(SourcePrefix(level) for level in range(len(SOURCE_PREFIX_LEVELS)))
SRC_PORT, DST_PORT = Port("src"), Port("dst")
TTL = IpHeaderField("ttl", "ttl", (8, 1), (7, 1))
IP_LENGTH = IpHeaderField("ip length", "ip_length", (2, 2), (4, 2))
TCP_FLAGS = TcpFlags()
IP_ID = IpHeaderField("ip id", "ip_id", (4, 2), None, hex_values=True)
FRAG = IpHeaderField("frag", "frag", (6, 2), None, hex_values=True)


def search_fields(payload_offsets: Iterable[int], with_dst_port: bool) -> tuple[Field, ...]:
    """The fields a signature may fix, from most to least specific."""
    ports = (SRC_PORT, DST_PORT) if with_dst_port else (SRC_PORT,)
    return (*SOURCE_PREFIXES, *ports, TTL, IP_LENGTH, TCP_FLAGS, IP_ID, FRAG,
            *(PayloadWord(o) for o in payload_offsets))


# --- fingerprints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """What the detector keeps a baseline for: (address, protocol, port); port None = any port."""

    family: int
    address: int
    protocol: int
    port: int | None = None

    @classmethod
    def of(cls, p: PacketFields, with_port: bool = True) -> Destination:
        port = p.dst_port if with_port and p.protocol in PORT_PROTOCOLS else None
        return cls(p.family, p.dst, p.protocol, port)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.address) if self.family == 4 else ipaddress.IPv6Address(self.address)

    def contains(self, p: PacketFields) -> bool:
        return (p.vlan is None and p.family == self.family and p.dst == self.address
                and p.protocol == self.protocol and (self.port is None or p.dst_port == self.port))

    def render(self) -> str:
        parts = [f"dst host {self.ip}"]
        if self.family == 4:
            parts.append(_PROTOCOL_NAMES.get(self.protocol, f"ip proto {self.protocol}"))
        else:
            parts.append(f"ip6[6] = {self.protocol}")
        if self.port is not None:
            parts.append(f"{_PROTOCOL_NAMES[self.protocol]} dst port {self.port}")
        return " and ".join(parts)

    def __str__(self) -> str:
        name = _PROTOCOL_NAMES.get(self.protocol, str(self.protocol)) if self.protocol != ICMPV6 else "icmp6"
        address = f"[{self.ip}]" if self.family == 6 else str(self.ip)
        return f"{address} {name}" + (f" port {self.port}" if self.port is not None else "")


@dataclass(frozen=True)
class Predicate:
    """`field` takes one of `values` (a small set: several reflectors' /24s, a few TTLs)."""

    field: Field
    values: frozenset[int]

    def matches(self, p: PacketFields) -> bool:
        return self.field.value(p) in self.values

    def render(self, family: int, protocol: int) -> str:
        terms = [self.field.render(v, family, protocol) for v in sorted(self.values)]
        return terms[0] if len(terms) == 1 else "(" + " or ".join(terms) + ")"

    def describe(self, family: int) -> str:
        if isinstance(self.field, SourcePrefix):
            shown = [str(self.field.network(v, family)) for v in sorted(self.values)]
        else:
            shown = [hex(v) if isinstance(self.field, PayloadWord) else str(v) for v in sorted(self.values)]
        return f"{self.field.name} in {{{', '.join(shown)}}}"


@dataclass(frozen=True)
class Fingerprint:
    """scope AND all predicates AND NOT any excluded source prefix."""

    scope: Destination
    predicates: tuple[Predicate, ...] = ()
    excluded: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def matches(self, p: PacketFields) -> bool:
        if not self.scope.contains(p):
            return False
        if not all(pred.matches(p) for pred in self.predicates):
            return False
        return not any(src_in(p, net) for net in self.excluded)

    def expression(self) -> str:
        parts = [self.scope.render()]
        parts += [pred.render(self.scope.family, self.scope.protocol) for pred in self.predicates]
        parts += [f"not src net {net}" for net in self.excluded]
        return " and ".join(parts)

    def excluding(self, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Fingerprint:
        """Add `not src net` for every network of the scope's family the predicates could match."""
        family_nets = [n for n in networks if n.version == self.scope.family and self._may_match(n)]
        return Fingerprint(self.scope, self.predicates, tuple(dict.fromkeys((*self.excluded, *family_nets))))

    def _may_match(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        for pred in self.predicates:
            if isinstance(pred.field, SourcePrefix):
                mine = [pred.field.network(v, self.scope.family) for v in pred.values]
                if not any(m.overlaps(net) for m in mine):
                    return False
        return True

    def describe(self) -> str:
        return " and ".join([str(self.scope), *(p.describe(self.scope.family) for p in self.predicates)])


def src_in(p: PacketFields, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether the packet's source address is in `net`."""
    if net.version != p.family:
        return False
    shift = _ADDRESS_BITS[p.family] - net.prefixlen
    return p.src >> shift == int(net.network_address) >> shift
