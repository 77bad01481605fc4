"""libpcap through ctypes: tcpdump expressions -> classic BPF, the reference matcher, pcap files.

libpcap is the front end of the rule compiler (as in cbpfc/xdpcap): `compile_filter` turns a
pcap-filter expression into classic BPF for Ethernet frames, and `offline_filter` runs libpcap's
own interpreter (`pcap_offline_filter`), the oracle the eBPF translation is tested against.
The pcap file reader/writer is plain Python (the format is a 24-byte header plus 16-byte
record headers), so captures can be written without a live pcap handle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from bpfnet.errors import BpfnetError

DLT_EN10MB = 1
SNAPLEN = 65535
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


class PcapError(BpfnetError, ValueError):
    """libpcap refused an expression; the message is libpcap's own."""


class CbpfInsn(NamedTuple):
    """One classic BPF instruction (struct bpf_insn)."""

    code: int
    jt: int
    jf: int
    k: int


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


def _load_libpcap() -> ctypes.CDLL:
    for name in ("libpcap.so.0.8", "libpcap.so.1", ctypes.util.find_library("pcap")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        lib.pcap_offline_filter.restype = ctypes.c_int
        lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr),
                                            ctypes.c_char_p]
        return lib
    raise OSError("libpcap not found: install libpcap0.8 (scripts/setup.sh)")


_lib = _load_libpcap()
_compile_lock = threading.Lock()  # pcap_compile keeps parser state per process in older releases


def compile_filter(expr: str, optimize: bool = True) -> list[CbpfInsn]:
    """Compile a tcpdump expression for Ethernet (DLT_EN10MB, snaplen 65535) into classic BPF.

    Raises PcapError with libpcap's message when the expression is rejected.
    """
    with _compile_lock:
        handle = _lib.pcap_open_dead(DLT_EN10MB, SNAPLEN)
        if not handle:
            raise OSError("pcap_open_dead failed")
        try:
            prog = _BpfProgram()
            if _lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), int(optimize),
                                 PCAP_NETMASK_UNKNOWN) != 0:
                raise PcapError(_lib.pcap_geterr(handle).decode(errors="replace"))
            try:
                return [CbpfInsn(i.code, i.jt, i.jf, i.k)
                        for i in prog.bf_insns[:prog.bf_len]]
            finally:
                _lib.pcap_freecode(ctypes.byref(prog))
        finally:
            _lib.pcap_close(handle)


@functools.lru_cache(maxsize=8192)
def compile_cached(expr: str) -> tuple[CbpfInsn, ...]:
    """`compile_filter` remembered per expression (validation and deployment compile the same rules)."""
    return tuple(compile_filter(expr))


class CompiledFilter:
    """A classic BPF program held in C memory for repeated `pcap_offline_filter` calls."""

    def __init__(self, insns: list[CbpfInsn]):
        self.insns = list(insns)
        self._array = (_BpfInsn * len(insns))(*[_BpfInsn(*i) for i in insns])
        self._prog = _BpfProgram(len(insns), self._array)
        self._hdr = _PktHdr()

    @classmethod
    def from_expr(cls, expr: str) -> CompiledFilter:
        return cls(compile_filter(expr))

    def matches(self, packet: bytes, wire_len: int | None = None) -> bool:
        """libpcap's verdict: True when the filter accepts the packet (returns non-zero)."""
        self._hdr.caplen = len(packet)
        self._hdr.len = len(packet) if wire_len is None else wire_len
        return _lib.pcap_offline_filter(ctypes.byref(self._prog), ctypes.byref(self._hdr),
                                        packet) != 0


def offline_filter(expr: str, packet: bytes) -> bool:
    """Run libpcap's interpreter on one packet (the reference verdict)."""
    return CompiledFilter.from_expr(expr).matches(packet)


# --- pcap files -------------------------------------------------------------------------------

_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D


@dataclass(frozen=True)
class PcapRecord:
    """One captured packet: timestamp in ns, the captured bytes and the length on the wire."""

    ts_ns: int
    data: bytes
    wire_len: int


def read_pcap(path: str | Path) -> list[PcapRecord]:
    with open(path, "rb") as f:
        return list(iter_pcap(f))


def iter_pcap(f: BinaryIO) -> Iterator[PcapRecord]:
    header = f.read(24)
    if len(header) < 24:
        raise ValueError("not a pcap file: shorter than the 24-byte header")
    for endian in ("<", ">"):
        (magic,) = struct.unpack(endian + "I", header[:4])
        if magic in (_MAGIC_US, _MAGIC_NS):
            break
    else:
        raise ValueError(f"not a pcap file: magic {header[:4].hex()} (pcapng is not supported)")
    scale = 1000 if magic == _MAGIC_US else 1
    linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
    if linktype != DLT_EN10MB:
        raise ValueError(f"pcap link type {linktype} is not Ethernet ({DLT_EN10MB})")
    rec = struct.Struct(endian + "IIII")
    while True:
        head = f.read(16)
        if not head:
            return
        if len(head) < 16:
            raise ValueError("truncated pcap record header")
        sec, frac, caplen, wire_len = rec.unpack(head)
        data = f.read(caplen)
        if len(data) < caplen:
            raise ValueError("truncated pcap record")
        yield PcapRecord(sec * 1_000_000_000 + frac * scale, data, wire_len)


class PcapWriter:
    """Writes an Ethernet pcap file (nanosecond timestamps) that tcpdump and Wireshark read."""

    def __init__(self, f: BinaryIO, snaplen: int = SNAPLEN):
        self._f = f
        f.write(struct.pack("<IHHiIII", _MAGIC_NS, 2, 4, 0, 0, snaplen, DLT_EN10MB))

    def write(self, data: bytes, ts_ns: int = 0, wire_len: int | None = None) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self._f.write(struct.pack("<IIII", sec, nsec, len(data),
                                  len(data) if wire_len is None else wire_len))
        self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_pcap(path: str | Path, records: Iterable[PcapRecord | bytes]) -> None:
    with open(path, "wb") as f:
        writer = PcapWriter(f)
        for rec in records:
            if isinstance(rec, bytes):
                writer.write(rec)
            else:
                writer.write(rec.data, rec.ts_ns, rec.wire_len)
