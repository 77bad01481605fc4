"""Network namespaces, veth pairs, bridges, addresses and routes that remove themselves.

Every name a `Topology` creates is owned by its prefix: namespaces are called `<prefix>-<name>`
and carry the alias `bpfnet:<prefix>` on their loopback, links it creates in the root namespace
carry the same alias. `cleanup(prefix)` finds leftovers of a crashed run by those marks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from bpfnet.netns.runtime import (
    TopologyError,
    _inside_fd,
    _ip_family,
    inside,
    list_netns,
    namespace_pids,
    netns_path,
    popen,
    run,
    stop_pids,
)

log = logging.getLogger(__name__)

ALIAS_PREFIX = "bpfnet:"
IFNAMSIZ = 15  # the kernel's limit on interface names (16 bytes with the NUL)
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


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
