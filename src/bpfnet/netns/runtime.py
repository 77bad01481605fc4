"""Running code and commands in network namespaces: entering one (`inside`), commands in one
(`run`, `popen`, `ping`), its cookie, and the processes living in one (`namespace_pids`,
`stop_pids`). What builds namespaces and links is `bpfnet.netns.topology`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from bpfnet.errors import BpfnetError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class TopologyError(BpfnetError, RuntimeError):
    """A namespace, link, address or route could not be created, changed or removed."""


def netns_path(ns: str) -> Path:
    """A namespace's file: a name under /run/netns, or an absolute path as a container runtime
    passes it (`/proc/PID/ns/net`, `/var/run/netns/X`)."""
    return Path(ns) if ns.startswith("/") else NETNS_DIR / ns


def list_netns() -> list[str]:
    return sorted(pyroute2_netns.listnetns(str(NETNS_DIR)))


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(ns: str | None) -> Iterator[None]:
    """Run the body with the current thread in network namespace `ns` (None: stay where we are).

    Sockets opened inside stay in `ns` after the block ends; other threads are not affected.
    """
    if ns is None:
        yield
        return
    try:
        target = os.open(netns_path(ns), os.O_RDONLY)
    except FileNotFoundError:
        raise TopologyError(f"network namespace {ns!r} does not exist") from None
    try:
        with _inside_fd(target):
            yield
    finally:
        os.close(target)


SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>; not in Python's socket module


def netns_cookie(ns: str | None) -> int:
    """The kernel's cookie of network namespace `ns` (None: the caller's): what BPF programs
    read with bpf_get_netns_cookie."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@contextlib.contextmanager
def _inside_fd(target: int) -> Iterator[None]:
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)


def _ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    if not ns:
        return list(argv)
    if ns.startswith("/"):  # a path: `ip netns exec` takes names only
        return ["nsenter", f"--net={ns}", *argv]
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str | None, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30,
        **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside namespace `ns` and wait for it; output is captured as text."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    proc = subprocess.run(_ns_argv(ns, argv), timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()
        raise TopologyError(f"{' '.join(argv)} in {ns or 'root namespace'} failed with exit code "
                            f"{proc.returncode}" + (f": {detail[-1]}" if detail else ""))
    return proc


def popen(ns: str | None, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start a command inside namespace `ns` without waiting for it."""
    return subprocess.Popen(_ns_argv(ns, argv), **kwargs)


def ping(ns: str | None, address: str, *, timeout: float = 2.0) -> bool:
    """Send one ICMP echo request from namespace `ns`; True when the reply arrives in time.

    A raw socket rather than the ping binary, which minimal images lack.
    """
    family = _ip_family(address)
    proto, echo_request, echo_reply = ((socket.IPPROTO_ICMPV6, 128, 129) if family == socket.AF_INET6
                                       else (socket.IPPROTO_ICMP, 8, 0))
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", echo_request, 0, 0, ident, 1) + b"bpfnet-ping"
    if family == socket.AF_INET:  # the kernel fills ICMPv6 checksums, not ICMPv4 ones
        header = header[:2] + struct.pack("!H", _inet_checksum(header)) + header[4:]
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    with sock:
        sock.sendto(header, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                return False
            if family == socket.AF_INET:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets deliver the IP header too
            if len(data) >= 8 and data[0] == echo_reply and struct.unpack("!H", data[4:6])[0] == ident:
                return True
    return False


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (as `ip netns pids`)."""
    try:
        target = os.stat(netns_path(ns))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def stop_pids(pids: list[int], grace: float = 0.0) -> None:
    """Stop processes: with a `grace` period, SIGTERM first and up to `grace` seconds to exit (our
    own children reaped meanwhile); then SIGKILL, waiting up to 5 s until they are gone."""
    if grace:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.02)
