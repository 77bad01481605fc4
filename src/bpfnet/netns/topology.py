"""Network namespaces, veth pairs, bridges, addresses and routes that remove themselves.

Every name a `Topology` creates is owned by its prefix: namespaces are called `<prefix>-<name>`
and carry the alias `bpfnet:<prefix>` on their loopback, links it creates in the root namespace
carry the same alias. `cleanup(prefix)` finds leftovers of a crashed run by those marks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ALIAS_PREFIX = "bpfnet:"
IFNAMSIZ = 15  # the kernel's limit on interface names (16 bytes with the NUL)
_CLONE_NEWNET = 0x40000000
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")
_libc = ctypes.CDLL(None, use_errno=True)


class TopologyError(BpfnetError, RuntimeError):
    """A namespace, link, address or route could not be created, changed or removed."""


def owner_alias(prefix: str) -> str:
    return ALIAS_PREFIX + prefix


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad topology prefix {prefix!r}: use 1-12 lowercase letters/digits, starting with a letter")
    return prefix


def check_ifname(ifname: str) -> str:
    if not 0 < len(ifname) <= IFNAMSIZ or not _NAME_RE.match(ifname):
        raise ValueError(f"bad interface name {ifname!r}: use 1-{IFNAMSIZ} characters from [A-Za-z0-9_.]")
    return ifname


def netns_path(ns: str) -> Path:
    return NETNS_DIR / ns


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
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


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


def _netlink_error(what: str, err: NetlinkError) -> TopologyError:
    return TopologyError(f"{what}: {os.strerror(err.code) if err.code else err}")


def _read_alias(ipr: IPRoute, ifname: str) -> str:
    links = ipr.get_links(ifname=ifname)
    return (links[0].get_attr("IFLA_IFALIAS") or "") if links else ""


def _stop_process(proc: subprocess.Popen, grace: float = 2.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Topology:
    """Namespaces, links, addresses and routes, all removed on `close()` (or leaving the `with`).

    `ns=None` in every method means the root namespace (where the Topology was created).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = check_prefix(prefix)
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self._root_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._sockets: dict[str | None, IPRoute] = {}
        self._processes: list[subprocess.Popen] = []
        self._root_sysctls: dict[str, str] = {}  # key -> value before we changed it
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except TopologyError:
            if exc_type is None:
                raise
            log.exception("topology %s: cleanup after an error failed", self.prefix)

    def close(self) -> None:
        """Remove everything this topology created; keep going past failures, then report them."""
        if self._closed:
            return
        self._closed = True
        failures: list[str] = []
        for proc in self._processes:
            _stop_process(proc)
        for key, value in self._root_sysctls.items():  # before the links their keys may name
            try:
                with self._inside(None):
                    _write_sysctl(key, value)
            except FileNotFoundError:
                pass  # the link it belonged to is gone already
            except OSError as err:
                failures.append(f"restore sysctl {key}: {err}")
        root = self._sockets.get(None)
        for ifname in reversed(self.root_links):
            try:
                if root is not None and root.link_lookup(ifname=ifname):
                    root.link("del", ifname=ifname)
            except NetlinkError as err:
                if err.code != errno.ENODEV:
                    failures.append(f"delete link {ifname}: {os.strerror(err.code)}")
        for ipr in self._sockets.values():
            ipr.close()
        self._sockets.clear()
        for ns in reversed(self.namespaces):
            try:
                pyroute2_netns.remove(ns)
            except FileNotFoundError:
                pass
            except OSError as err:
                failures.append(f"remove namespace {ns}: {err}")
        os.close(self._root_fd)
        if failures:
            raise TopologyError(f"topology {self.prefix}: cleanup incomplete: " + "; ".join(failures))

    # -- namespaces ----------------------------------------------------------------------------

    def netns(self, name: str) -> str:
        """Create namespace `<prefix>-<name>` with loopback up; return its full name."""
        if not _NAME_RE.match(name):
            raise ValueError(f"bad namespace name {name!r}: use letters, digits, '_' and '.'")
        ns = f"{self.prefix}-{name}"
        if netns_path(ns).exists():
            raise TopologyError(f"network namespace {ns} already exists (a leftover? run "
                                f"`bpfnet netns cleanup --prefix {self.prefix}`)")
        pyroute2_netns.create(ns)
        self.namespaces.append(ns)
        ipr = self._ipr(ns)
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up", ifalias=owner_alias(self.prefix))
        return ns

    def _inside(self, ns: str | None) -> contextlib.AbstractContextManager:
        """Like `inside`, but None is the namespace the topology was made in, even when the
        caller's thread is inside another one right now."""
        return _inside_fd(self._root_fd) if ns is None else inside(ns)

    def _ipr(self, ns: str | None) -> IPRoute:
        if ns is not None and ns not in self.namespaces:
            raise TopologyError(f"namespace {ns!r} is not part of topology {self.prefix}")
        if ns not in self._sockets:
            with self._inside(ns):
                self._sockets[ns] = IPRoute()
        return self._sockets[ns]

    # -- links ---------------------------------------------------------------------------------

    def _index(self, ifname: str, ns: str | None) -> int:
        found = self._ipr(ns).link_lookup(ifname=ifname)
        if not found:
            raise TopologyError(f"no interface {ifname} in {ns or 'root namespace'}")
        return found[0]

    def _set(self, ifname: str, ns: str | None, what: str, **attrs) -> None:
        try:
            self._ipr(ns).link("set", index=self._index(ifname, ns), **attrs)
        except NetlinkError as err:
            raise _netlink_error(f"{what} {ifname} in {ns or 'root namespace'}", err) from None

    def _adopt_root_link(self, ifname: str) -> None:
        self.root_links.append(ifname)
        self._set(ifname, None, "mark", ifalias=owner_alias(self.prefix))

    def veth(self, name: str, peer: str, *, ns: str | None = None, peer_ns: str | None = None,
             mtu: int | None = None, up: bool = True) -> None:
        """A veth pair: `name` in `ns`, `peer` in `peer_ns`; each end is created where it lives."""
        check_ifname(name)
        check_ifname(peer)
        ipr = self._ipr(ns)
        self._ipr(peer_ns)
        peer_spec: dict = {"ifname": peer}
        if peer_ns != ns:
            peer_spec["net_ns_fd"] = self._root_fd if peer_ns is None else str(netns_path(peer_ns))
        try:
            ipr.link("add", ifname=name, kind="veth", peer=peer_spec)
        except NetlinkError as err:
            raise _netlink_error(f"create veth {name} <-> {peer}", err) from None
        for ifname, where in ((name, ns), (peer, peer_ns)):
            if where is None:
                self._adopt_root_link(ifname)
            if mtu:
                self._set(ifname, where, "set mtu of", mtu=mtu)
            if up:
                self.up(ifname, ns=where)

    def bridge(self, name: str, *, ns: str | None = None, up: bool = True) -> None:
        check_ifname(name)
        try:
            self._ipr(ns).link("add", ifname=name, kind="bridge")
        except NetlinkError as err:
            raise _netlink_error(f"create bridge {name}", err) from None
        if ns is None:
            self._adopt_root_link(name)
        if up:
            self.up(name, ns=ns)

    def set_master(self, ifname: str, bridge: str, *, ns: str | None = None) -> None:
        self._set(ifname, ns, "enslave", master=self._index(bridge, ns))

    def up(self, ifname: str, *, ns: str | None = None) -> None:
        self._set(ifname, ns, "bring up", state="up")

    def down(self, ifname: str, *, ns: str | None = None) -> None:
        self._set(ifname, ns, "bring down", state="down")

    def ifindex(self, ifname: str, *, ns: str | None = None) -> int:
        return self._index(ifname, ns)

    def mac(self, ifname: str, *, ns: str | None = None) -> str:
        return self._ipr(ns).get_links(self._index(ifname, ns))[0].get_attr("IFLA_ADDRESS")

    def set_mac(self, ifname: str, mac: str, *, ns: str | None = None) -> None:
        self._set(ifname, ns, "set address of", address=mac)

    # -- addresses, routes, neighbours -----------------------------------------------------------

    def addr(self, ifname: str, cidr: str, *, ns: str | None = None) -> None:
        """Add an address like "10.0.0.1/24" or "fd00::1/64" (IPv6 without duplicate detection)."""
        address, _, length = cidr.partition("/")
        if not length:
            raise ValueError(f"address {cidr!r} needs a prefix length, e.g. {cidr}/24")
        family = _ip_family(address)
        extra = {"flags": 0x02} if family == socket.AF_INET6 else {}  # IFA_F_NODAD: usable at once
        try:
            self._ipr(ns).addr("add", index=self._index(ifname, ns), address=address,
                               prefixlen=int(length), family=family, **extra)
        except NetlinkError as err:
            raise _netlink_error(f"add address {cidr} to {ifname}", err) from None

    def route(self, dst: str, *, ns: str | None = None, via: str | None = None,
              dev: str | None = None, table: int | None = None) -> None:
        """Add a route; `dst` is a prefix like "10.1.0.0/16" or "default"."""
        if via is None and dev is None:
            raise ValueError(f"route to {dst} needs via= or dev=")
        family = _ip_family(via or dst)
        if dst == "default":
            dst = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
        spec: dict = {"dst": dst, "family": family}
        if via:
            spec["gateway"] = via
        if dev:
            spec["oif"] = self._index(dev, ns)
        if table is not None:
            spec["table"] = table
        try:
            self._ipr(ns).route("add", **spec)
        except NetlinkError as err:
            raise _netlink_error(f"add route {dst} in {ns or 'root namespace'}", err) from None

    def neigh(self, ifname: str, ip: str, mac: str, *, ns: str | None = None) -> None:
        """A permanent neighbour entry (no ARP/ND needed for `ip`)."""
        try:
            self._ipr(ns).neigh("replace", ifindex=self._index(ifname, ns), dst=ip, lladdr=mac,
                                family=_ip_family(ip), state=0x80)  # NUD_PERMANENT
        except NetlinkError as err:
            raise _netlink_error(f"add neighbour {ip} on {ifname}", err) from None

    # -- sysctls and link features ---------------------------------------------------------------

    def sysctl(self, key: str, value: int | str, *, ns: str | None = None) -> None:
        """Set e.g. "net.ipv4.ip_forward" to 1; root-namespace values are restored on close."""
        if ns is not None:
            self._ipr(ns)
        elif key not in self._root_sysctls:
            self._root_sysctls[key] = self.get_sysctl(key)
        with self._inside(ns):
            _write_sysctl(key, str(value))

    def get_sysctl(self, key: str, *, ns: str | None = None) -> str:
        with self._inside(ns):
            return read_sysctl(key)

    def forwarding(self, on: bool = True, *, ns: str | None = None) -> None:
        self.sysctl("net.ipv4.ip_forward", int(on), ns=ns)
        self.sysctl("net.ipv6.conf.all.forwarding", int(on), ns=ns)

    def rp_filter(self, mode: int, *, ns: str | None = None, ifname: str = "all") -> None:
        """0 off, 1 strict, 2 loose; the kernel uses max(all, <ifname>)."""
        self.sysctl(f"net.ipv4.conf.{ifname}.rp_filter", mode, ns=ns)

    def features(self, ifname: str, *, ns: str | None = None, tx_checksum: bool | None = None,
                 gro: bool | None = None) -> None:
        """Switch offloads with ethtool; veth checksum offload off makes the stack fill checksums."""
        argv = ["ethtool", "-K", ifname]
        for feature, on in (("tx", tx_checksum), ("gro", gro)):
            if on is not None:
                argv += [feature, "on" if on else "off"]
        if len(argv) > 3:
            self.run(ns, argv)

    def get_features(self, ifname: str, *, ns: str | None = None) -> dict[str, bool]:
        """ethtool -k as {feature: on}."""
        out = self.run(ns, ["ethtool", "-k", ifname]).stdout
        features = {}
        for line in out.splitlines()[1:]:
            name, _, rest = line.strip().partition(":")
            if rest:
                features[name] = rest.split()[0] == "on"
        return features

    # -- processes -------------------------------------------------------------------------------

    def run(self, ns: str | None, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return run(ns, argv, **kwargs)

    def popen(self, ns: str | None, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Like `popen`, but the process is stopped when the topology closes."""
        proc = popen(ns, argv, **kwargs)
        self._processes.append(proc)
        return proc


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctl(key: str) -> str:
    return _sysctl_path(key).read_text().strip()


def _write_sysctl(key: str, value: str) -> None:
    _sysctl_path(key).write_text(value)


# -- finding and removing leftovers -------------------------------------------------------------


def namespace_owner(ns: str) -> str | None:
    """The prefix that created namespace `ns` (from its loopback alias), or None."""
    try:
        with inside(ns), IPRoute() as ipr:
            alias = _read_alias(ipr, "lo")
    except (TopologyError, OSError):
        return None
    return alias[len(ALIAS_PREFIX):] if alias.startswith(ALIAS_PREFIX) else None


def owned_root_links() -> dict[str, str]:
    """Root-namespace links created by any Topology: {ifname: prefix}."""
    with IPRoute() as ipr:
        owned = {}
        for link in ipr.get_links():
            alias = link.get_attr("IFLA_IFALIAS") or ""
            if alias.startswith(ALIAS_PREFIX):
                owned[link.get_attr("IFLA_IFNAME")] = alias[len(ALIAS_PREFIX):]
        return owned


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


def cleanup(prefix: str | None) -> list[str]:
    """Remove what topologies with `prefix` left behind (None: every bpfnet topology).

    Deletes the marked root-namespace links (first: a namespace vanishes asynchronously), kills
    processes still running in those namespaces and deletes the namespaces.
    Returns what was removed, e.g. ["link agv0", "netns ag-a"].
    """
    if prefix is not None:
        check_prefix(prefix)
    removed = []
    with IPRoute() as ipr:
        for ifname, owner in owned_root_links().items():
            if prefix is not None and owner != prefix:
                continue
            with contextlib.suppress(NetlinkError):  # gone meanwhile
                ipr.link("del", ifname=ifname)
            removed.append(f"link {ifname}")
    for ns in list_netns():
        ns_owner = namespace_owner(ns)
        if prefix is None and ns_owner is None:
            continue
        if prefix is not None and ns_owner != prefix and not ns.startswith(f"{prefix}-"):
            continue
        stop_pids(namespace_pids(ns))
        with contextlib.suppress(FileNotFoundError):
            pyroute2_netns.remove(ns)
        removed.append(f"netns {ns}")
    return removed
