"""Nodes and pods as network namespaces.

A node is a network namespace standing for a host (or the root namespace). A pod is a namespace
joined to its node by a veth pair: `eth0` in the pod with the pod's address as a /32, a link-local
default gateway (169.254.1.1) whose ARP the data plane answers with the host side's MAC, and on the
node a /32 route to the pod through the host side `lxc<hash>`, which carries the tc programs. There
is no bridge: packets between pods of a node go from one veth straight into the other pod.

Everything here is idempotent: `ensure_*` creates what is missing and adopts what exists, so an
agent restart finds its pods where it left them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from bpfnet.ebpf import BpfError, Link, Program
from bpfnet.errors import BpfnetError
from bpfnet.netns import inside, namespace_pids
from bpfnet.netns.runtime import netns_path, stop_pids
from bpfnet.podnet.config import Node, Pod, Protocol, Underlay
from bpfnet.podnet.dataplane import EndpointLink, mac_bytes

GATEWAY = "169.254.1.1"

STOP_GRACE = 3.0  # seconds a pod's processes get to exit on SIGTERM before SIGKILL


class PodNetworkError(BpfnetError, RuntimeError):
    """A namespace, veth, address, route or attachment could not be set up or removed."""


def node_netns_base(node: Node) -> str:
    return node.netns or f"bpfnet-{node.name}"


def pod_netns(node: Node, pod: Pod) -> str:
    """The pod's namespace: the runtime's path for a sandbox, else a name bpfnet owns."""
    if pod.sandbox is not None:
        return pod.sandbox.netns
    return f"{node_netns_base(node)}.{pod.namespace}.{pod.name}"


def pod_ifname(pod: Pod) -> str:
    return pod.sandbox.ifname if pod.sandbox is not None else "eth0"


def netns_exists(ns: str) -> bool:
    return netns_path(ns).exists()


def host_ifname(pod_key: str) -> str:
    return "lxc" + hashlib.sha256(pod_key.encode()).hexdigest()[:11]


def pod_key_of_netns(node: Node, ns: str) -> str | None:
    """NS/NAME of a pod namespace of `node` (see pod_netns), None if `ns` is not one."""
    prefix = node_netns_base(node) + "."
    namespace, dot, name = ns.removeprefix(prefix).partition(".")
    return f"{namespace}/{name}" if ns.startswith(prefix) and dot else None


def serve_argv(pod: Pod) -> list[str] | None:
    specs = [f"{p.port}/{p.protocol.value.lower()}" for p in pod.ports
             if p.protocol in (Protocol.TCP, Protocol.UDP)]
    if not specs:
        return None
    return [sys.executable, "-m", "bpfnet.podnet.serve", "--name", pod.key, "--serve", ",".join(specs)]


@contextlib.contextmanager
def _ipr(ns: str | None):
    with inside(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _write_sysctl(ns: str | None, key: str, value: str) -> None:
    with inside(ns):
        Path("/proc/sys", *key.split(".")).write_text(value)


def _netlink(what: str, err: NetlinkError) -> PodNetworkError:
    return PodNetworkError(f"{what}: {os.strerror(err.code) if err.code else err}")


# --- nodes ---------------------------------------------------------------------------------------

NODE_OWNER_ALIAS = "bpfnet-podnet-node"  # on lo of a node namespace podnet made (and may remove)


def ensure_node(node: Node) -> None:
    """The node's namespace (unless it is the root one, or a host's namespace that exists already)
    with lo up, forwarding on and the router address."""
    ns = node.netns
    created = False
    if ns is not None and not netns_path(ns).exists():
        pyroute2_netns.create(ns)
        _write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        created = True
    if ns is not None:
        _write_sysctl(ns, "net.ipv4.ip_forward", "1")
    with _ipr(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up", **({"ifalias": NODE_OWNER_ALIAS} if created else {}))
        address = str(node.router_address)
        if not ipr.get_addr(index=lo, address=address):
            try:
                ipr.addr("add", index=lo, address=address, prefixlen=32)
            except NetlinkError as err:
                raise _netlink(f"node {node.name}: add router address {address}", err) from None


def remove_node(node: Node) -> None:
    """Remove the node's namespace if podnet made it (its pods must be gone), else its router
    address: a host's own namespace (one agent per host) or the root stays."""
    if node.netns is not None and _made_by_podnet(node.netns):
        with contextlib.suppress(FileNotFoundError):
            pyroute2_netns.remove(node.netns)
        return
    if node.netns is not None and not netns_path(node.netns).exists():
        return
    with _ipr(node.netns) as ipr, contextlib.suppress(NetlinkError):
        ipr.addr("del", index=ipr.link_lookup(ifname="lo")[0], address=str(node.router_address),
                 prefixlen=32)


def _made_by_podnet(ns: str) -> bool:
    try:
        with _ipr(ns) as ipr:
            [lo] = ipr.get_links(ipr.link_lookup(ifname="lo")[0])
    except (OSError, NetlinkError, ValueError):
        return False
    return lo.get_attr("IFLA_IFALIAS") == NODE_OWNER_ALIAS


# --- the underlay and the overlay -----------------------------------------------------------------

FABRIC_BRIDGE = "fabric0"
UNDERLAY_IFNAME = "underlay0"   # the node's side of its veth to the fabric bridge
VXLAN_IFNAME = "bpfnet_vxlan"
VXLAN_PORT = 8472               # Cilium's (and Linux's historical) VXLAN port
UNDERLAY_MTU = 9000             # room for the 50 bytes of VXLAN around full-size pod packets


def fabric_ifname(node: Node) -> str:
    return "ul" + hashlib.sha256(node.name.encode()).hexdigest()[:11]


def ensure_fabric(underlay: Underlay) -> None:
    """The namespace with the bridge every node's underlay veth plugs into."""
    ns = underlay.fabric_netns
    if not netns_path(ns).exists():
        pyroute2_netns.create(ns)
        _write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
    with _ipr(ns) as ipr:
        if not ipr.link_lookup(ifname=FABRIC_BRIDGE):
            ipr.link("add", ifname=FABRIC_BRIDGE, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=FABRIC_BRIDGE)[0], state="up", mtu=UNDERLAY_MTU)


def remove_fabric(underlay: Underlay) -> None:
    """Remove the fabric namespace; the nodes' underlay veths go with it."""
    with contextlib.suppress(FileNotFoundError):
        pyroute2_netns.remove(underlay.fabric_netns)


def ensure_overlay(node: Node, underlay: Underlay) -> int:
    """The node's veth to the fabric bridge with its underlay address, and its VXLAN device in
    external (collect-metadata) mode; returns the VXLAN device's ifindex."""
    assert node.underlay_address is not None
    ns, fabric = node.netns, underlay.fabric_netns
    try:
        if _link_info(ns, UNDERLAY_IFNAME) is None:
            with _ipr(ns) as ipr:
                ipr.link("add", ifname=UNDERLAY_IFNAME, kind="veth",
                         peer={"ifname": fabric_ifname(node), "net_ns_fd": str(netns_path(fabric))})
        with _ipr(fabric) as ipr:
            port = ipr.link_lookup(ifname=fabric_ifname(node))[0]
            ipr.link("set", index=port, master=ipr.link_lookup(ifname=FABRIC_BRIDGE)[0],
                     mtu=UNDERLAY_MTU, state="up")
        with _ipr(ns) as ipr:
            index = ipr.link_lookup(ifname=UNDERLAY_IFNAME)[0]
            ipr.link("set", index=index, mtu=UNDERLAY_MTU, state="up")
            # IPv4 only: a host's own namespace may have IPv6 on, and with it a link-local address
            current = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)}
            for stale in current - {str(node.underlay_address)}:
                ipr.addr("del", index=index, address=stale, prefixlen=underlay.cidr.prefixlen)
            if str(node.underlay_address) not in current:
                ipr.addr("add", index=index, address=str(node.underlay_address),
                         prefixlen=underlay.cidr.prefixlen)
            if not ipr.link_lookup(ifname=VXLAN_IFNAME):
                ipr.link("add", ifname=VXLAN_IFNAME, kind="vxlan", vxlan_collect_metadata=1,
                         vxlan_port=VXLAN_PORT, vxlan_learning=0)
            vxlan = ipr.link_lookup(ifname=VXLAN_IFNAME)[0]
            ipr.link("set", index=vxlan, state="up")
    except NetlinkError as err:
        raise _netlink(f"node {node.name}: setting up the underlay and {VXLAN_IFNAME}", err) from None
    return vxlan


def plug_outside(underlay: Underlay, ns: str, address: IPv4Address | str, port: str) -> None:
    """Plug namespace `ns` (made by the caller; a machine outside the cluster) into the fabric
    bridge: `eth0` in `ns` with `address` on the underlay segment, its peer `port` a port of the
    bridge. Removing `ns` removes both ends."""
    try:
        with _ipr(underlay.fabric_netns) as ipr:
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": str(netns_path(ns))})
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=ipr.link_lookup(ifname=FABRIC_BRIDGE)[0],
                     mtu=UNDERLAY_MTU, state="up")
        with _ipr(ns) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("set", index=eth0, state="up")
            ipr.addr("add", index=eth0, address=str(address), prefixlen=underlay.cidr.prefixlen)
    except NetlinkError as err:
        raise _netlink(f"plugging {ns} into the fabric", err) from None


def underlay_ifindex(node: Node) -> int:
    """The ifindex of the node's underlay device (ensure_overlay made it)."""
    found = _link_info(node.netns, UNDERLAY_IFNAME)
    if found is None:
        raise PodNetworkError(f"node {node.name}: {UNDERLAY_IFNAME} does not exist")
    return found[0]


def remove_overlay(node: Node) -> None:
    """Remove the node's VXLAN device and underlay veth (its namespace may already be gone)."""
    if node.netns is not None and not netns_path(node.netns).exists():
        return
    with _ipr(node.netns) as ipr:
        for name in (VXLAN_IFNAME, UNDERLAY_IFNAME):
            for index in ipr.link_lookup(ifname=name):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)


# --- pods ----------------------------------------------------------------------------------------

def _link_info(ns: str | None, ifname: str) -> tuple[int, bytes] | None:
    with _ipr(ns) as ipr:
        found = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
    if not found:
        return None
    return found[0]["index"], mac_bytes(found[0].get_attr("IFLA_ADDRESS"))


def ensure_pod(node: Node, pod: Pod) -> EndpointLink:
    """The pod's namespace (unless the runtime gave one), veth, address and routes; returns what
    the data plane needs."""
    assert pod.address is not None
    ns, host, ifname = pod_netns(node, pod), host_ifname(pod.key), pod_ifname(pod)
    try:
        if pod.sandbox is None and not netns_path(ns).exists():
            pyroute2_netns.create(ns)
            _write_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
            _write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        if pod.sandbox is not None and not netns_path(ns).exists():
            raise PodNetworkError(f"pod {pod.key}: network namespace {ns} does not exist")
        if _link_info(node.netns, host) is None:
            if pod.sandbox is not None and _link_info(ns, ifname) is not None:
                raise PodNetworkError(f"pod {pod.key}: {ns} already has an interface {ifname}")
            with _ipr(node.netns) as ipr:
                ipr.link("add", ifname=host, kind="veth",
                         peer={"ifname": ifname, "net_ns_fd": str(netns_path(ns))})
            _write_sysctl(node.netns, f"net.ipv6.conf.{host}.disable_ipv6", "1")
            if pod.sandbox is not None:  # only the interface bpfnet added; the rest is the runtime's
                _write_sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
        _configure_pod_side(ns, ifname, pod.address)
        _configure_node_side(node, host, pod.address)
    except NetlinkError as err:
        raise _netlink(f"pod {pod.key}: setting up {ns}", err) from None
    host_side, pod_side = _link_info(node.netns, host), _link_info(ns, ifname)
    if host_side is None or pod_side is None:
        raise PodNetworkError(f"pod {pod.key}: the veth {host} is gone")
    (ifindex, node_mac), (_, pod_mac) = host_side, pod_side
    return EndpointLink(ifindex=ifindex, mac=pod_mac, node_mac=node_mac)


def _configure_pod_side(ns: str, ifname: str, address: IPv4Address) -> None:
    with _ipr(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        eth0 = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=lo, state="up")
        ipr.link("set", index=eth0, state="up")
        current = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=eth0, family=socket.AF_INET)}
        for stale in current - {str(address)}:
            ipr.addr("del", index=eth0, address=stale, prefixlen=32)
        if str(address) not in current:
            ipr.addr("add", index=eth0, address=str(address), prefixlen=32)
        ipr.route("replace", dst=f"{GATEWAY}/32", oif=eth0, scope=253)  # scope link
        ipr.route("replace", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)


def _configure_node_side(node: Node, host: str, address: IPv4Address) -> None:
    with _ipr(node.netns) as ipr:
        index = ipr.link_lookup(ifname=host)[0]
        ipr.link("set", index=index, state="up")
        ipr.route("replace", dst=f"{address}/32", oif=index, scope=253,
                  prefsrc=str(node.router_address))


def remove_pod(node: Node, ns: str) -> None:
    """Stop the processes of pod namespace `ns`, remove its veth (with its route) and `ns`."""
    key = pod_key_of_netns(node, ns)
    stop_processes(ns)
    with _ipr(node.netns) as ipr:
        found = ipr.link_lookup(ifname=host_ifname(key)) if key else []
        if found:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=found[0])
    with contextlib.suppress(FileNotFoundError):
        pyroute2_netns.remove(ns)


def unplug(node: Node, host: str) -> None:
    """Remove a sandbox pod's veth by its host side's name (its peer in the runtime's namespace
    goes with it, and the node's route to the pod); the namespace stays. Nothing there is fine."""
    if node.netns is not None and not netns_path(node.netns).exists():
        return
    with _ipr(node.netns) as ipr:
        for index in ipr.link_lookup(ifname=host):
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)


def check_pod(node: Node, pod: Pod, link: EndpointLink | None) -> list[str]:
    """What differs between a pod's veth, address and routes and what bpfnet set up (empty when
    all is in place): the CNI CHECK."""
    ns, host, ifname = pod_netns(node, pod), host_ifname(pod.key), pod_ifname(pod)
    if not netns_path(ns).exists():
        return [f"network namespace {ns} does not exist"]
    host_side, pod_side = _link_info(node.netns, host), _link_info(ns, ifname)
    if host_side is None:
        return [f"host interface {host} does not exist"]
    if pod_side is None:
        return [f"interface {ifname} does not exist in {ns}"]
    problems = []
    if link is not None and (host_side[0], host_side[1], pod_side[1]) != (link.ifindex, link.node_mac, link.mac):
        problems.append(f"interface {ifname} or {host} was replaced (index or MAC changed)")
    with _ipr(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        info = ipr.get_links(index)[0]
        if not info["flags"] & 1:  # IFF_UP
            problems.append(f"interface {ifname} is down")
        addresses = sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                           for a in ipr.get_addr(index=index, family=socket.AF_INET))
        if addresses != [f"{pod.address}/32"]:
            problems.append(f"interface {ifname} has addresses {addresses or 'none'}, expected {pod.address}/32")
        default = [r for r in ipr.get_routes(family=socket.AF_INET, dst_len=0, table=254)
                   if r.get_attr("RTA_GATEWAY") == GATEWAY and r.get_attr("RTA_OIF") == index]
        if not default:
            problems.append(f"no default route via {GATEWAY} dev {ifname}")
    return problems


def pod_namespaces_on(node: Node, names: list[str]) -> list[str]:
    """Pod namespaces of `node` among the namespace `names` (for finding pods to remove)."""
    return [n for n in names if pod_key_of_netns(node, n)]


# --- the pod's server ----------------------------------------------------------------------------

def ensure_server(node: Node, pod: Pod) -> bool:
    """Run the pod's agnhost-like server if it serves ports, restarted when they changed; True
    when a server was started. Never in a sandbox: its processes are the runtime's."""
    if pod.sandbox is not None:
        return False
    ns, argv = pod_netns(node, pod), serve_argv(pod)
    running = [pid for pid in namespace_pids(ns) if _cmdline(pid)[1:3] == ["-m", "bpfnet.podnet.serve"]]
    if running and argv and _cmdline(running[0])[1:] == argv[1:]:
        return False
    stop_pids(running, grace=STOP_GRACE)
    if not argv:
        return False
    subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return True


def wait_for_servers(node: Node, pods: list[Pod], timeout: float = 10.0) -> None:
    """Wait until each serving pod listens on its TCP/UDP ports."""
    deadline = time.monotonic() + timeout
    for pod in pods:
        want = {(p.port, p.protocol) for p in pod.ports if p.protocol in (Protocol.TCP, Protocol.UDP)}
        while want and not want <= _listening(pod_netns(node, pod)):
            if time.monotonic() > deadline:
                raise PodNetworkError(f"pod {pod.key}: server not listening after {timeout} s")
            time.sleep(0.05)


def _listening(ns: str) -> set[tuple[int, Protocol]]:
    found = set()
    with inside(ns):
        # thread-self: the namespace this thread is in now, not the process's.
        for proto, path in ((Protocol.TCP, "/proc/thread-self/net/tcp"),
                            (Protocol.UDP, "/proc/thread-self/net/udp")):
            with open(path) as table:
                for line in table.read().splitlines()[1:]:
                    fields = line.split()
                    if proto is Protocol.UDP or fields[3] == "0A":  # TCP_LISTEN
                        found.add((int(fields[1].split(":")[1], 16), proto))
    return found


def stale_link_pins(pin_dir: Path, wanted: set[str]) -> dict[str, Attachment]:
    """Pinned pod links under `pin_dir` whose host veth name is not in `wanted`."""
    links = pin_dir / "links"
    names = {p.name.rsplit("_", 1)[0] for p in links.glob("lxc*_from")} | {
        p.name.rsplit("_", 1)[0] for p in links.glob("lxc*_to")}
    return {name: Attachment(links / f"{name}_from", links / f"{name}_to") for name in names - wanted}


def stop_processes(ns: str) -> None:
    stop_pids(namespace_pids(ns), grace=STOP_GRACE)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


# --- attaching the programs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """Where the two tcx links of a pod's host veth are pinned."""

    ingress: Path   # pod_from_container
    egress: Path    # pod_to_container


def attachment(pin_dir: Path, pod_key: str) -> Attachment:
    base = pin_dir / "links" / host_ifname(pod_key)
    return Attachment(base.with_name(base.name + "_from"), base.with_name(base.name + "_to"))


def ensure_attached(node: Node, ifindex: int, pins: Attachment, from_container: Program,
                    to_container: Program) -> None:
    """tcx links on the host veth, pinned; existing ones are pointed at the current programs."""
    ensure_link(node, ifindex, pins.ingress, from_container, "ingress")
    ensure_link(node, ifindex, pins.egress, to_container, "egress")


def overlay_attachment(pin_dir: Path) -> Path:
    """Where the tcx link of pod_from_overlay on the node's VXLAN device is pinned."""
    return pin_dir / "links" / VXLAN_IFNAME


def netdev_attachment(pin_dir: Path) -> Path:
    """Where the tcx link of pod_from_netdev on the node's underlay device is pinned."""
    return pin_dir / "links" / UNDERLAY_IFNAME


def ensure_link(node: Node, ifindex: int, path: Path, program: Program, direction: str) -> None:
    """A tcx link of `program` on `ifindex` pinned at `path`; an existing one is updated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            with Link.from_pin(path) as link:
                link.update(program)
            return
        except BpfError:
            path.unlink()  # the device went away under the link: attach afresh
    with inside(node.netns):  # tcx resolves the ifindex in the caller's namespace
        link = program.attach_tcx(ifindex, direction)
    with link:
        link.pin(path)


def detach(pins: Attachment) -> None:
    for path in (pins.ingress, pins.egress):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
