"""The traffic generator: copies of a template frame (IPv4 or IPv6; TCP, UDP, ICMP or ICMPv6),
rewritten per flow (source address and port, checksums written absolutely), sent out of a veth
by one of two backends:

- ``live``: BPF_PROG_TEST_RUN with XDP live frames; an XDP program rewrites each frame in the
  kernel and sends it with XDP_TX (several Mpps). Kernels before 5.18 lack it, and some kernels
  answer EPERM to it even for root.
- ``packet``: an AF_PACKET socket with PACKET_QDISC_BYPASS and sendmmsg(). The frames of every flow
  are computed once (numpy) into an image; each call hands the kernel a batch of up to 1,024 of
  them by reference.

Both send the same bytes in the same order: frame ``i`` belongs to flow ``i % flows.count``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from bpfnet.ebpf import BpfError, ObjectSpec, Program

IPV4_SPACE = 1 << 32
LOW64 = (1 << 64) - 1  # an IPv6 source varies in its low 64 bits (the interface identifier)


@dataclass(frozen=True)
class Flows:
    """Which flows the generator cycles through: `addresses` sources from `first_address`, each
    with `ports` source ports from `first_port`. An IPv6 `first_address` varies in its low 64
    bits: the addresses stay in its /64."""

    first_address: str = "10.0.0.1"
    addresses: int = 1
    first_port: int = 1024
    ports: int = 1

    def __post_init__(self) -> None:
        if self.addresses < 1 or self.ports < 1:
            raise ValueError(f"invalid flows: {self}: addresses and ports must be at least 1")
        if not 0 < self.first_port or self.first_port + self.ports - 1 > 65535:
            raise ValueError(f"invalid flows: source ports {self.first_port}..{self.first_port + self.ports - 1} "
                             "leave 1..65535")
        try:
            first = ipaddress.ip_address(self.first_address)
        except ValueError:
            raise ValueError(f"invalid flows: first address {self.first_address!r} is not an IPv4 or IPv6 "
                             "address") from None
        if first.version == 4 and int(first) + self.addresses > IPV4_SPACE:
            raise ValueError(f"invalid flows: {self.addresses} addresses from {self.first_address} leave IPv4")
        if first.version == 6 and (int(first) & LOW64) + self.addresses > LOW64 + 1:
            raise ValueError(f"invalid flows: {self.addresses} addresses from {self.first_address} leave its /64 "
                             "(an IPv6 source varies in its low 64 bits)")

    @property
    def count(self) -> int:
        return self.addresses * self.ports

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the source addresses."""
        return ipaddress.ip_address(self.first_address).version

    @property
    def first_low(self) -> int:
        """The first source address as an integer: the whole IPv4 address, an IPv6 one's low 64 bits."""
        return int(ipaddress.ip_address(self.first_address)) & (LOW64 if self.family == 6 else IPV4_SPACE - 1)


class Backend(enum.StrEnum):
    """How frames leave the generator (`--generator`)."""

    LIVE = "live"
    PACKET = "packet"


@functools.cache
def live_frames_denied() -> str | None:
    """Why this kernel refuses XDP live frames (None if it allows them): one live run of a program
    that drops, on the loopback device of this network namespace."""
    with ObjectSpec.builtin("bench_sink").load() as sink:
        try:
            sink.programs["xdp_drop"].run_live_frames(bytes(64), repeat=1, ifindex=socket.if_nametoindex("lo"))
        except BpfError as err:
            code = err.errno or 0
            return f"{os.strerror(code)} (errno {code})"
    return None


def choose_backend(requested: str | Backend | None = None) -> Backend:
    """The backend asked for, or (None / "auto") live frames where the kernel allows them, else packet."""
    if requested in (None, "auto"):
        return Backend.PACKET if live_frames_denied() else Backend.LIVE
    try:
        backend = Backend(requested)
    except ValueError:
        raise ValueError(f"generator {requested!r}: choose one of auto, "
                         f"{', '.join(b.value for b in Backend)}") from None
    if backend is Backend.LIVE and (reason := live_frames_denied()):
        raise ValueError(f"generator 'live': this kernel refuses XDP live frames ({reason}); "
                         "use --generator packet")
    return backend


def require_veth(ifindex: int) -> None:
    """Refuse to send out of anything but a veth (a real NIC would carry the flood off the machine)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            link = ipr.get_links(ifindex)[0]
    except NetlinkError:
        raise ValueError(f"no interface with index {ifindex} in this network namespace") from None
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "veth":
        raise ValueError(f"interface {link.get_attr('IFLA_IFNAME')} is {kind or 'a physical device'}: "
                         "the traffic generator sends only out of a veth")


# --- the frames ----------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2].ljust(2, b"\0"), "big") for i in range(0, len(data), 2))
    return ~int(_fold(np.uint64(total))) & 0xFFFF


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int,
              payload: bytes = b"x" * 18) -> bytes:
    """An Ethernet + IPv4 + UDP frame with valid checksums (a template for the generator)."""
    saddr, daddr = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def _fold(total: Any) -> Any:  # ndarray or numpy scalar
    for _ in range(3):
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _words(data: bytes, start: int, end: int) -> list[int]:
    return [int.from_bytes(data[i:i + 2], "big") for i in range(start, end, 2)]


TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
L4_CHECKSUM_AT = {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}  # the checksum's offset in the L4 header
ETH_P_IP, ETH_P_IPV6 = b"\x08\x00", b"\x86\xdd"
# Where the frame's fields are, per family: (protocol byte, source address, L4 header). An IPv6
# source varies in its low 64 bits, the last 8 bytes of the address.
V4_PROTOCOL, V4_SRC, V4_L4 = 23, slice(26, 30), 34
V6_NEXT_HEADER, V6_SRC, V6_L4 = 20, slice(30, 38), 54


class FlowFrames:
    """The frames a template makes for each flow: the source address and port replaced, the L4
    checksum adjusted from the template's (RFC 1624) and, over IPv4, the header checksum
    recomputed, exactly as the live-frames program writes them. ICMP has no ports, and its
    checksum does not cover the addresses: only the source address and the IPv4 checksum change.
    IPv6 has no header checksum, and every L4 checksum (ICMPv6's too) covers the pseudo-header
    with the source address (RFC 8200 8.1); a UDP checksum is mandatory there. An IPv6 source
    is the flows' /64 (written into the template once) with its low 64 bits varied per flow."""

    def __init__(self, template: bytes, flows: Flows) -> None:
        if len(template) >= 54 and template[12:14] == ETH_P_IPV6 and template[14] >> 4 == 6:
            self.family, self.protocol, l4 = 6, template[V6_NEXT_HEADER], V6_L4
            if self.protocol not in (TCP, UDP, ICMPV6):
                raise ValueError(f"IPv6 template with next header {self.protocol}: the generator sends TCP, UDP "
                                 "or ICMPv6 right after the fixed header (no extension headers)")
        elif len(template) >= 34 and template[12:14] == ETH_P_IP and template[14] == 0x45:
            self.family, self.protocol, l4 = 4, template[V4_PROTOCOL], V4_L4
            if self.protocol not in (TCP, UDP, ICMP):
                raise ValueError(f"template protocol {self.protocol}: the generator sends TCP, UDP or ICMP")
        else:
            raise ValueError("template must be an Ethernet + IPv4 frame without IP options, or Ethernet + IPv6")
        if flows.family != self.family:
            raise ValueError(f"IPv{self.family} template with flows from {flows.first_address}: "
                             f"the flows' first address must be IPv{self.family} too")
        if self.protocol in (ICMP, ICMPV6) and flows.ports != 1:
            raise ValueError(f"ICMP has no ports: flows of {flows.ports} ports cannot vary an ICMP template")
        self.csum_offset = l4 + L4_CHECKSUM_AT[self.protocol]
        if len(template) < self.csum_offset + 2:
            raise ValueError(f"template of {len(template)} bytes is too short for its L4 header")
        if self.family == 6 and self.protocol == UDP and template[self.csum_offset:self.csum_offset + 2] == b"\0\0":
            raise ValueError("IPv6 UDP template without a checksum: IPv6 requires one (RFC 8200 8.1)")
        self.l4 = l4
        self.src = V6_SRC if self.family == 6 else V4_SRC
        self.template = _with_prefix(bytes(template), flows, self.csum_offset) if self.family == 6 else bytes(template)
        self.flows = flows

    def rows(self, first: int, count: int) -> np.ndarray:
        """Frames `first` .. `first + count - 1` as a (count, len(template)) uint8 array."""
        flows, template, l4 = self.flows, self.template, self.l4
        flow = (np.arange(first, first + count, dtype=np.uint64) % np.uint64(flows.count))
        address = np.uint64(flows.first_low) + flow % np.uint64(flows.addresses)  # never wraps (Flows)
        port = np.uint64(flows.first_port) + (flow // np.uint64(flows.addresses)) % np.uint64(flows.ports)
        frames = np.tile(np.frombuffer(template, dtype=np.uint8), (count, 1))
        width = self.src.stop - self.src.start
        frames[:, self.src] = address.astype(f">u{width}").view(np.uint8).reshape(count, width)
        address_sum = sum((address >> np.uint64(shift)) & np.uint64(0xFFFF) for shift in range(0, 8 * width, 16))

        if self.family == 4:
            ip_words = _words(template, 14, 34)
            ip_fixed = sum(w for i, w in enumerate(ip_words) if i not in (5, 6, 7))  # not check, saddr
            ip_check = ~_fold(np.uint64(ip_fixed) + address_sum) & np.uint64(0xFFFF)
            frames[:, 24:26] = ip_check.astype(">u2").view(np.uint8).reshape(count, 2)
            if self.protocol == ICMP:
                return frames

        old_check = int.from_bytes(template[self.csum_offset:self.csum_offset + 2], "big")
        old = _words(template, self.src.start, self.src.stop)
        new = address_sum
        if self.protocol != ICMPV6:
            frames[:, l4:l4 + 2] = port.astype(">u2").view(np.uint8).reshape(count, 2)
            old += _words(template, l4, l4 + 2)
            new = new + port
        fixed = (~old_check & 0xFFFF) + sum(~w & 0xFFFF for w in old)
        check = ~_fold(np.uint64(fixed) + new) & np.uint64(0xFFFF)
        if self.protocol == UDP:  # 0 means "no checksum", so a computed 0 is sent as 0xffff
            check = np.zeros_like(check) if old_check == 0 else np.where(check == 0, np.uint64(0xFFFF), check)
        frames[:, self.csum_offset:self.csum_offset + 2] = check.astype(">u2").view(np.uint8).reshape(count, 2)
        return frames

    def frame(self, index: int) -> bytes:
        return self.rows(index, 1).tobytes()


def _with_prefix(template: bytes, flows: Flows, csum_offset: int) -> bytes:
    """An IPv6 template with the top 64 bits of its source address set to the flows' (only the low
    64 bits vary per flow) and its L4 checksum adjusted for them (RFC 1624)."""
    prefix = ipaddress.IPv6Address(flows.first_address).packed[:8]
    if template[22:30] == prefix:
        return template
    frame = bytearray(template)
    frame[22:30] = prefix
    check = int.from_bytes(template[csum_offset:csum_offset + 2], "big")
    total = (~check & 0xFFFF) + sum(~w & 0xFFFF for w in _words(template, 22, 30)) + sum(_words(prefix, 0, 8))
    check = ~int(_fold(np.uint64(total))) & 0xFFFF
    frame[csum_offset:csum_offset + 2] = (check or (0xFFFF if frame[V6_NEXT_HEADER] == UDP else 0)).to_bytes(2, "big")
    return bytes(frame)


# --- backends ------------------------------------------------------------------------------------

HEADER_BYTES = 80  # the template bytes the live program restores on every run (Ethernet + IPv6 + TCP: 74)


class LiveFrames:
    """XDP live frames: the trafficgen program rewrites the template per flow in the kernel."""

    def __init__(self, frames: FlowFrames) -> None:
        template, flows = frames.template, frames.flows
        header_words = min(len(template), HEADER_BYTES) // 8
        spec = ObjectSpec.builtin("trafficgen")
        spec.constants.update(
            flows=flows.count,
            src_addr_base=flows.first_low,
            src_addrs=flows.addresses,
            src_port_base=flows.first_port,
            src_ports=flows.ports,
            template_l4_csum=struct.unpack_from("<H", template, frames.csum_offset)[0],
            # the template's source address (IPv6: its low 64 bits) and port as they lie in memory
            template_src_addr=int.from_bytes(template[frames.src], "little"),
            template_src_port=struct.unpack_from("<H", template, frames.l4)[0],
            headers=template[:header_words * 8].ljust(HEADER_BYTES, b"\0"),
            header_words=header_words,
        )
        self.template = template
        self.object = spec.load()
        self.program: Program = self.object.programs["xdp_generate"]

    def seek(self, index: int) -> None:
        self.object.maps["sequence"].update(b"\0" * 4, struct.pack("<Q", index))

    def send(self, ifindex: int, count: int) -> None:
        self.program.run_live_frames(self.template, repeat=count, ifindex=ifindex)

    def close(self) -> None:
        self.object.close()


SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20
BATCH = 1024                # frames a sendmmsg() call hands the kernel
MAX_IMAGE_FLOWS = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
MMSGHDR_WORDS, IOVEC_WORDS = 8, 2   # struct mmsghdr (64 bytes: msghdr, msg_len), struct iovec (16)
MSG_IOV, MSG_IOVLEN = 2, 3          # their words in struct mmsghdr


class PacketBatches:
    """AF_PACKET (qdisc bypassed) with sendmmsg(): the frames of every flow are computed once into
    an image, and each call hands the kernel a batch of them by reference. (A PACKET_TX_RING was
    slower here, 1.3 against 1.8 Mpps, and its per-frame completion runs on the receiver's CPU,
    adding ~170 ns to every packet the benchmarks charge to the receiver.)"""

    def __init__(self, frames: FlowFrames) -> None:
        count = frames.flows.count
        if count > MAX_IMAGE_FLOWS:
            raise ValueError(f"{count:,} flows: the packet generator holds at most {MAX_IMAGE_FLOWS:,}")
        size = len(frames.template)
        stride = -(-size // 64) * 64
        # rows i and i + count are the same flow, so any batch of up to BATCH frames is one slice
        rows = count + BATCH
        self.image = np.zeros((rows, stride), dtype=np.uint8)
        for first in range(0, rows, count):
            chunk = min(count, rows - first)
            self.image[first:first + chunk, :size] = frames.rows(0, chunk)
        index = np.arange(rows, dtype=np.uint64)
        self.iovecs = np.zeros((rows, IOVEC_WORDS), dtype=np.uint64)
        self.iovecs[:, 0] = np.uint64(self.image.ctypes.data) + index * np.uint64(stride)
        self.iovecs[:, 1] = size
        self.messages = np.zeros((rows, MMSGHDR_WORDS), dtype=np.uint64)
        self.messages[:, MSG_IOV] = np.uint64(self.iovecs.ctypes.data) + index * np.uint64(IOVEC_WORDS * 8)
        self.messages[:, MSG_IOVLEN] = 1
        self.count = count
        self.sequence = 0
        self.sockets: dict[tuple[int, int], socket.socket] = {}

    def seek(self, index: int) -> None:
        self.sequence = index

    def _socket(self, ifindex: int) -> socket.socket:
        key = (os.stat("/proc/thread-self/ns/net").st_ino, ifindex)  # sockets belong to a netns
        if key not in self.sockets:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
            try:
                sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                sock.bind((socket.if_indextoname(ifindex), 0))
            except OSError:
                sock.close()
                raise
            self.sockets[key] = sock
        return self.sockets[key]

    def send(self, ifindex: int, count: int) -> None:
        fd = self._socket(ifindex).fileno()
        base = self.messages.ctypes.data
        while count:
            batch = min(count, BATCH)
            first = self.sequence % self.count
            sent = _libc.sendmmsg(fd, base + first * MMSGHDR_WORDS * 8, batch, 0)
            if sent < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR):  # the veth's ring is full: again
                    continue
                raise OSError(err, f"sendmmsg on ifindex {ifindex}: {os.strerror(err)}")
            self.sequence += sent
            count -= sent

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


class TrafficGenerator:
    """Sends copies of an IPv4 or IPv6 TCP/UDP/ICMP `template` frame (Ethernet first), one flow after another,
    with the backend asked for (default: live frames where the kernel allows them, else packet)."""

    def __init__(self, template: bytes, flows: Flows = Flows(), backend: str | Backend | None = None) -> None:
        self.frames = FlowFrames(template, flows)
        self.backend = choose_backend(backend)
        self.template = self.frames.template
        self.flows = flows
        self._sender: LiveFrames | PacketBatches = (LiveFrames(self.frames) if self.backend is Backend.LIVE
                                                   else PacketBatches(self.frames))
        self._checked: set[tuple[int, int]] = set()

    def frame(self, index: int) -> bytes:
        """The frame the generator sends as its `index`-th."""
        return self.frames.frame(index)

    def send(self, ifindex: int, count: int, start: int | None = None) -> None:
        """Send `count` frames out of `ifindex` (in the calling thread's network namespace), from the
        `start`-th frame if given, else from where the last call stopped. Only a veth is accepted:
        generated traffic stays between namespaces made for it."""
        key = (os.stat("/proc/thread-self/ns/net").st_ino, ifindex)
        if key not in self._checked:
            require_veth(ifindex)
            self._checked.add(key)
        if start is not None:
            self._sender.seek(start)
        self._sender.send(ifindex, count)

    def close(self) -> None:
        self._sender.close()

    def __enter__(self) -> TrafficGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
