"""Packet fingerprints: the header fields a sample is described by, and conjunctions of
predicates over them that render as tcpdump (pcap-filter) expressions. A predicate is one of
three families: a field takes one of a few values (`ip[8] = 47`), a field's bits follow a
pattern (`tcp[tcpflags] & (tcp-syn|tcp-fin) = (tcp-syn|tcp-fin)`), or a field lies in a range
(`ip[2:2] >= 1200 and ip[2:2] <= 1400`, `udp src portrange 1024-2047`).

A fingerprint is evaluated twice with the same meaning: here in Python on parsed samples (to
estimate coverage and collateral), and by libpcap -> cBPF -> eBPF in the data plane. So every
field reads exactly the bytes its rendered expression reads:

- IPv4 transport fields come after the IHL-sized header and only in first fragments (as
  libpcap's `tcp[...]`, `udp ... port` do).
- IPv6 transport fields are read only when the fixed header's next header is the transport
  itself (no extension headers), at absolute offsets `ip6[40 + ...]`; the scope says
  `ip6[6] = proto`, so packets with extension headers are never matched — except the fragment
  header, whose fields are read when the scope's protocol is 44 (`ip6[6] = 44`).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from bpfnet.errors import BpfnetError

TCP, UDP, ICMP, ICMPV6, IPV6_FRAGMENT = 6, 17, 1, 58, 44
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
    tcp_window: int | None = None
    tcp_data_offset: int | None = None  # in 32-bit words (5 = no options)
    udp_length_mismatch: int | None = None  # 1 when the UDP length is not the IP payload length
    icmp_type: int | None = None  # ICMP / ICMPv6
    icmp_code: int | None = None
    fragment_offset: int | None = None  # in 8-byte units: IPv4 ip[6:2] & 0x1fff, IPv6 fragment header
    more_fragments: int | None = None  # IPv6 fragment header's M flag (IPv4: in `frag`)
    fragment_next_header: int | None = None  # IPv6 fragment header's next header

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
        transport = _transport(b, o + ihl, protocol, length - ihl, ICMP) if frag & 0x1FFF == 0 else _Transport()
        transport["fragment_offset"] = frag & 0x1FFF
        return cls(4, protocol, src, dst, ttl, length, ip_id, frag, vlan=vlan, **transport)

    @classmethod
    def _from_ipv6(cls, b: bytes, o: int, vlan: int | None) -> PacketFields:
        if len(b) < o + 40:
            raise ParseError("truncated IPv6 header")
        version, length, next_header, hop_limit = _IPV6_HEADER.unpack_from(b, o)
        if version >> 4 != 6:
            raise ParseError(f"bad IPv6 version byte 0x{version:02x}")
        src_hi, src_lo, dst_hi, dst_lo = _IPV6_ADDRESSES.unpack_from(b, o + 8)
        extra = _Transport()
        if next_header == IPV6_FRAGMENT:
            if len(b) >= o + 44:
                inner, offset_word = _IPV6_FRAGMENT_HEADER.unpack_from(b, o + 40)
                extra = {"fragment_next_header": inner, "fragment_offset": offset_word >> 3,
                         "more_fragments": offset_word & 1}
        else:
            extra = _transport(b, o + 40, next_header, length, ICMPV6)
        return cls(6, next_header, src_hi << 64 | src_lo, dst_hi << 64 | dst_lo, hop_limit, length, vlan=vlan,
                   **extra)


_IPV4_HEADER, _IPV4_ADDRESSES = struct.Struct("!BxHHHBB"), struct.Struct("!II")
_IPV6_HEADER, _IPV6_ADDRESSES = struct.Struct("!BxxxHBB"), struct.Struct("!QQQQ")
_UDP_HEADER, _TCP_HEADER = struct.Struct("!HHH"), struct.Struct("!HH8xBB")
_IPV6_FRAGMENT_HEADER = struct.Struct("!BxH")


class _Transport(TypedDict, total=False):
    """The PacketFields a transport (or IPv6 fragment) header gives."""

    src_port: int
    dst_port: int
    tcp_flags: int
    payload: bytes
    tcp_window: int | None
    tcp_data_offset: int
    udp_length_mismatch: int
    icmp_type: int
    icmp_code: int
    fragment_offset: int
    more_fragments: int
    fragment_next_header: int



def _transport(b: bytes, o: int, protocol: int, ip_payload: int, icmp: int) -> _Transport:
    """The PacketFields of a TCP/UDP/ICMP header at offset o, as far as the sample holds it.
    `ip_payload` is the IP payload length the header says (for the UDP length check); `icmp` is
    the family's ICMP protocol."""
    if protocol == UDP and len(b) >= o + 8:
        sport, dport, udp_length = _UDP_HEADER.unpack_from(b, o)
        return {"src_port": sport, "dst_port": dport, "payload": b[o + 8:],
                "udp_length_mismatch": int(udp_length != ip_payload)}
    if protocol == TCP and len(b) >= o + 14:
        sport, dport, data_offset, flags = _TCP_HEADER.unpack_from(b, o)
        window = int.from_bytes(b[o + 14:o + 16], "big") if len(b) >= o + 16 else None
        return {"src_port": sport, "dst_port": dport, "tcp_flags": flags, "payload": b[o + (data_offset >> 4) * 4:],
                "tcp_window": window, "tcp_data_offset": data_offset >> 4}
    if protocol == icmp and len(b) >= o + 2:
        return {"icmp_type": b[o], "icmp_code": b[o + 1]}
    return _Transport()


# --- fields ---------------------------------------------------------------------------------


# Fields over the IPv4 flags + fragment offset word (or the IPv6 fragment header's).
_FRAGMENT_WORD_FIELDS = ("frag", "ip flags", "fragment", "fragment offset", "more fragments")


class Field:
    """One header field a fingerprint may constrain. `value` reads it from a sample (None when the
    packet has no such field) as an unsigned integer of `bits` bits; `render` writes `field =
    value` as a pcap-filter expression. A field with `bit_pattern` can also be tested on some of
    its bits (`render_bits`), a `ranged` one against a range of values (`render_range`)."""

    name: str
    bits: int = 32
    bit_pattern: bool = False
    ranged: bool = False

    def value(self, p: PacketFields) -> int | None:
        raise NotImplementedError

    def render(self, value: int, family: int, protocol: int) -> str:
        raise NotImplementedError

    def render_bits(self, mask: int, value: int, family: int, protocol: int) -> str:
        raise NotImplementedError(f"{self.name} has no bit patterns")

    def render_range(self, low: int, high: int, family: int, protocol: int) -> str:
        raise NotImplementedError(f"{self.name} has no ranges")

    @property
    def max_value(self) -> int:
        return (1 << self.bits) - 1

    @property
    def reads(self) -> str:
        """The header bytes the field reads: fields over the same bytes say the same here."""
        return "fragment word" if self.name in _FRAGMENT_WORD_FIELDS else self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Field) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Field({self.name})"


def _range_terms(expr: str, low: int, high: int, top: int, shift: int = 0, hex_values: bool = False) -> str:
    """`expr >= low and expr <= high` (values shifted left by `shift`), leaving out a bound that
    is the field's own (0 or `top`)."""
    def show(v: int) -> str:
        return f"0x{v << shift:x}" if hex_values else str(v << shift)
    if low == high:
        return f"{expr} = {show(low)}"
    terms = ([f"{expr} >= {show(low)}"] if low > 0 else []) + ([f"{expr} <= {show(high)}"] if high < top else [])
    if not terms:
        raise ValueError(f"the range {low}-{high} of {expr} is every value")
    return " and ".join(terms)


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
    bits, ranged = 16, True

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.name = f"{direction} port"
        self._attr = "src_port" if direction == "src" else "dst_port"

    def value(self, p: PacketFields) -> int | None:
        return getattr(p, self._attr)

    def render(self, value: int, family: int, protocol: int) -> str:
        return f"{_PROTOCOL_NAMES[protocol]} {self.direction} port {value}"

    def render_range(self, low: int, high: int, family: int, protocol: int) -> str:
        if low == high:
            return self.render(low, family, protocol)
        return f"{_PROTOCOL_NAMES[protocol]} {self.direction} portrange {low}-{high}"


class IpHeaderField(Field):
    """A fixed-offset IP header field: (v4 offset, v6 offset, size); None = absent in that family."""

    def __init__(self, name: str, attr: str, v4: tuple[int, int] | None, v6: tuple[int, int] | None,
                 hex_values: bool = False, ranged: bool = False) -> None:
        self.name, self._attr, self._at, self._hex = name, attr, {4: v4, 6: v6}, hex_values
        self.bits = 8 * (v4 or v6 or (0, 4))[1]
        self.ranged = ranged

    def value(self, p: PacketFields) -> int | None:
        return getattr(p, self._attr) if self._at[p.family] else None

    def _expr(self, family: int) -> str:
        at = self._at[family]
        if at is None:
            raise ValueError(f"IPv{family} has no {self.name}")
        offset, size = at
        index = f"{offset}" if size == 1 else f"{offset}:{size}"
        return f"{'ip' if family == 4 else 'ip6'}[{index}]"

    def render(self, value: int, family: int, protocol: int) -> str:
        return f"{self._expr(family)} = {f'0x{value:04x}' if self._hex else value}"

    def render_range(self, low: int, high: int, family: int, protocol: int) -> str:
        return _range_terms(self._expr(family), low, high, self.max_value, hex_values=self._hex)


class MaskedField(Field):
    """A header field read as `(expr & mask) >> shift`, with one (expr, mask, shift) per family
    (None: the family has no such field). `read` takes it from PacketFields."""

    def __init__(self, name: str, read: Callable[[PacketFields], int | None], bits: int,
                 v4: tuple[str, int | None, int] | None, v6: tuple[str, int | None, int] | None,
                 bit_pattern: bool = False, ranged: bool = False, hex_values: bool = False) -> None:
        self.name, self._read, self.bits, self._at = name, read, bits, {4: v4, 6: v6}
        self.bit_pattern, self.ranged, self._hex = bit_pattern, ranged, hex_values

    def value(self, p: PacketFields) -> int | None:
        return self._read(p) if self._at[p.family] else None

    def _show(self, value: int) -> str:
        return f"0x{value:02x}" if self._hex else str(value)

    def _spec(self, family: int) -> tuple[str, int | None, int]:
        spec = self._at[family]
        if spec is None:
            raise ValueError(f"IPv{family} has no {self.name}")
        return spec

    def _masked(self, family: int) -> tuple[str, int]:
        expr, mask, shift = self._spec(family)
        return (expr if mask is None else f"{expr} & 0x{mask:x}"), shift

    def render(self, value: int, family: int, protocol: int) -> str:
        expr, shift = self._masked(family)
        return f"{expr} = {self._show(value << shift)}"

    def render_bits(self, mask: int, value: int, family: int, protocol: int) -> str:
        expr, _, shift = self._spec(family)
        return f"{expr} & 0x{mask << shift:x} = 0x{value << shift:x}"

    def render_range(self, low: int, high: int, family: int, protocol: int) -> str:
        expr, shift = self._masked(family)
        return _range_terms(expr, low, high, self.max_value, shift, self._hex)


class Condition(Field):
    """A yes/no property written as a comparison of two expressions (one pair per family):
    value 1 renders `left != right`, value 0 `left = right`."""

    bits = 1

    def __init__(self, name: str, read: Callable[[PacketFields], int | None],
                 v4: tuple[str, str] | None, v6: tuple[str, str] | None) -> None:
        self.name, self._read, self._at = name, read, {4: v4, 6: v6}

    def value(self, p: PacketFields) -> int | None:
        return self._read(p) if self._at[p.family] else None

    def render(self, value: int, family: int, protocol: int) -> str:
        sides = self._at[family]
        if sides is None:
            raise ValueError(f"IPv{family} has no {self.name}")
        left, right = sides
        return f"{left} {'!=' if value else '='} {right}"


class TcpFlags(Field):
    name = "tcp flags"
    bits, bit_pattern = 8, True

    def value(self, p: PacketFields) -> int | None:
        return p.tcp_flags

    def render(self, value: int, family: int, protocol: int) -> str:
        if family == 6:
            return f"ip6[53] = 0x{value:02x}"
        return f"tcp[tcpflags] = {self._names(value)}"

    def render_bits(self, mask: int, value: int, family: int, protocol: int) -> str:
        if family == 6:
            return f"ip6[53] & 0x{mask:02x} = 0x{value:02x}"
        return f"tcp[tcpflags] & ({self._names(mask)}) = {f'({self._names(value)})' if value else '0'}"

    @staticmethod
    def _names(value: int) -> str:
        return "|".join(name for bit, name in _TCP_FLAG_NAMES if value & bit) or "0"


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
TTL = IpHeaderField("ttl", "ttl", (8, 1), (7, 1), ranged=True)
IP_LENGTH = IpHeaderField("ip length", "ip_length", (2, 2), (4, 2), ranged=True)
TCP_FLAGS = TcpFlags()
IP_ID = IpHeaderField("ip id", "ip_id", (4, 2), None, hex_values=True, ranged=True)
FRAG = IpHeaderField("frag", "frag", (6, 2), None, hex_values=True)
# IPv4 flags as 3 bits: reserved, DF, MF.
IP_FLAGS = MaskedField("ip flags", lambda p: None if p.frag is None else p.frag >> 13, 3,
                       ("ip[6]", 0xE0, 5), None, bit_pattern=True, hex_values=True)
# A non-first fragment (IPv4, or IPv6 with a fragment header first: the scope says ip6[6] = 44).
FRAGMENT = Condition("fragment", lambda p: None if p.fragment_offset is None else int(p.fragment_offset != 0),
                     ("ip[6:2] & 0x1fff", "0"), ("ip6[42:2] & 0xfff8", "0"))
FRAGMENT_OFFSET = MaskedField("fragment offset", lambda p: p.fragment_offset, 13,
                              ("ip[6:2]", 0x1FFF, 0), ("ip6[42:2]", 0xFFF8, 3), ranged=True)
MORE_FRAGMENTS = MaskedField("more fragments", lambda p: p.more_fragments, 1, None, ("ip6[43]", 0x01, 0))
FRAGMENT_NEXT_HEADER = MaskedField("fragment next header", lambda p: p.fragment_next_header, 8,
                                   None, ("ip6[40]", None, 0))
TCP_WINDOW = MaskedField("tcp window", lambda p: p.tcp_window, 16, ("tcp[14:2]", None, 0), ("ip6[54:2]", None, 0),
                         ranged=True)
TCP_DATA_OFFSET = MaskedField("tcp data offset", lambda p: p.tcp_data_offset, 4, ("tcp[12]", 0xF0, 4),
                              ("ip6[52]", 0xF0, 4), hex_values=True)
UDP_LENGTH_MISMATCH = Condition("udp length mismatch", lambda p: p.udp_length_mismatch,
                                ("udp[4:2]", "ip[2:2] - ((ip[0] & 0xf) << 2)"), ("ip6[44:2]", "ip6[4:2]"))
ICMP_TYPE = MaskedField("icmp type", lambda p: p.icmp_type, 8, ("icmp[icmptype]", None, 0), ("ip6[40]", None, 0))
ICMP_CODE = MaskedField("icmp code", lambda p: p.icmp_code, 8, ("icmp[icmpcode]", None, 0), ("ip6[41]", None, 0))


def search_fields(payload_offsets: Iterable[int], with_dst_port: bool) -> tuple[Field, ...]:
    """The fields a signature may constrain, from most to least specific."""
    ports = (SRC_PORT, DST_PORT) if with_dst_port else (SRC_PORT,)
    return (*SOURCE_PREFIXES, *ports, TTL, IP_LENGTH, TCP_FLAGS, IP_ID, FRAG, FRAGMENT, FRAGMENT_OFFSET, IP_FLAGS,
            MORE_FRAGMENTS, FRAGMENT_NEXT_HEADER, TCP_WINDOW, TCP_DATA_OFFSET, UDP_LENGTH_MISMATCH, ICMP_TYPE,
            ICMP_CODE, *(PayloadWord(o) for o in payload_offsets))


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
class BitsPredicate:
    """The bits of `field` in `mask` equal `value` (`tcp[tcpflags] & (tcp-syn|tcp-fin) = (tcp-syn|tcp-fin)`)."""

    field: Field
    mask: int
    value: int

    def matches(self, p: PacketFields) -> bool:
        v = self.field.value(p)
        return v is not None and v & self.mask == self.value

    def render(self, family: int, protocol: int) -> str:
        return self.field.render_bits(self.mask, self.value, family, protocol)

    def describe(self, family: int) -> str:
        return f"{self.field.name} & {self.mask:#x} = {self.value:#x}"


@dataclass(frozen=True)
class RangePredicate:
    """`field` lies in [low, high] (`ip[2:2] >= 1200 and ip[2:2] <= 1400`, `udp src portrange 1024-2047`)."""

    field: Field
    low: int
    high: int

    def matches(self, p: PacketFields) -> bool:
        v = self.field.value(p)
        return v is not None and self.low <= v <= self.high

    def render(self, family: int, protocol: int) -> str:
        return self.field.render_range(self.low, self.high, family, protocol)

    def describe(self, family: int) -> str:
        return f"{self.field.name} in [{self.low}, {self.high}]"


AnyPredicate = Predicate | BitsPredicate | RangePredicate


@dataclass(frozen=True)
class Fingerprint:
    """scope AND all predicates AND NOT any excluded source prefix."""

    scope: Destination
    predicates: tuple[AnyPredicate, ...] = ()
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
            if isinstance(pred, Predicate) and isinstance(pred.field, SourcePrefix):
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
