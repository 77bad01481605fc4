"""The host side of syncookie rules: netfilter's SYNPROXY completes the handshakes XDP started.

XDP answers a SYN with a cookie SYN-ACK and passes the client's ACK when its cookie is valid
(bpf/include/ddos/syncookie.h). The server's listening socket would refuse that ACK (it issued no
cookie), so the ACK goes to netfilter's SYNPROXY, which checks the cookie again, decodes the
client's MSS, window scale, SACK and ECN from it and its timestamp, opens the connection to the
server with a SYN of its own, and from then on translates sequence numbers and timestamps.

While any syncookie rule is in force, the ddos app keeps one nftables table, `inet bpfnet_synproxy`,
in the stage's namespace (the agent's), and sets `net.netfilter.nf_conntrack_tcp_loose` to 0 there
(conntrack must call an ACK of no known flow invalid, not pick it up mid-stream); the table's
comment remembers the value it found, restored when the table goes. After the last syncookie rule
the table drains (`Synproxy`) before it goes. No other table is touched. Connections already open
to the protected ports when the table comes are entered into conntrack (`adopt`): without loose
tracking it would never learn them, and drop their packets as invalid.

The table matches TCP to the protected ports arriving on the stage's interfaces. The ports are
those of the syncookie rules when libpcap proves a rule (or one of its top-level conjuncts)
matches no other destination port (`protected_ports`); a rule it cannot prove that for (a port
range, no port at all) protects every TCP port of those interfaces.

What the SYN-ACK advertises is measured per interface (`Advertised`): the MSS its MTU allows, and
the window scale the server's stack will pick. SYNPROXY does not translate windows, so the client
must be told the scale the server really uses; XDP (the ddos_synack map) and SYNPROXY (its rule
for that interface) say the same.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import DiagSocket, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

from bpfnet.ddos.compiler import BPF_JEQ, BPF_JMP, BPF_K
from bpfnet.ddos.pcap import PcapError, compile_cached
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)
TABLE = "bpfnet_synproxy"
LOOSE = "net/netfilter/nf_conntrack_tcp_loose"
# what the cookie SYN-ACK advertises on an interface XDP has no entry for (mirror of
# DDOS_SYNCOOKIE_* in ddos/structs.h): a 1500-byte MTU, Linux's scale with its default buffers
MSS4, MSS6, WSCALE = 1460, 1440, 7
TCP_RMEM = "net/ipv4/tcp_rmem"  # the namespace's TCP buffer sizes: min, default, max
RMEM_MAX = "net/core/rmem_max"  # the most SO_RCVBUF may ask for
DRAIN_SECONDS = 600.0  # how long SYNPROXY stays for its connections after the last syncookie rule
# connections conntrack must know when the table comes (the socket states of an open TCP
# connection: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, and NEW_SYN_RECV: a handshake the
# server answered whose ACK comes after the table), and how it is told of them
OPEN_STATES = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 12
LISTEN_STATE = 1 << 10
TCP_CONNTRACK_ESTABLISHED = 3
BE_LIBERAL = 0x08  # IP_CT_TCP_FLAG_BE_LIBERAL: no window checks (it saw no handshake to learn them)
ESTABLISHED_TIMEOUT = 432_000  # s: conntrack's own for an established TCP flow


class SynproxyError(BpfnetError):
    """nftables refused the table or is missing, or what the table says cannot be measured."""


@dataclass(frozen=True, order=True)
class Advertised:
    """What a cookie SYN-ACK answered on one interface advertises, and SYNPROXY's rule for it."""

    mss4: int = MSS4
    mss6: int = MSS6
    wscale: int = WSCALE


def advertised(mtu: int, receive_space: int) -> Advertised:
    """For an interface of `mtu` bytes, a server whose stack can grow a receive buffer to
    `receive_space` bytes: the MSS is the MTU less the IP and TCP headers, within the kernel's
    bounds (ip_rt_min_advmss and IPv4's largest packet; IPv6's minimum MTU); the window scale is
    the one Linux gives a listener without SO_RCVBUF (tcp_select_initial_window: enough to
    express that space in 16 bits, at most 14)."""
    return Advertised(mss4=min(max(mtu - 40, 256), 0xFFFF - 40), mss6=min(max(mtu - 60, 1220), 0xFFFF),
                      wscale=min(max(receive_space.bit_length() - 1 - 15, 0), 14))


def interface_mtu(name: str) -> int:
    """The MTU of interface `name` in this process's namespace."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=name)
    if not links:
        raise SynproxyError(f"no interface {name!r}")
    return int(links[0].get_attr("IFLA_MTU"))


@dataclass(frozen=True)
class Connection:
    """An open TCP connection of a server in this namespace, as conntrack's original direction."""

    family: int  # socket.AF_INET or AF_INET6
    client: str
    client_port: int
    server: str
    server_port: int


def open_connections(ports: frozenset[int] | None) -> list[Connection]:
    """The open TCP connections (sock_diag) of this namespace whose local port is one of `ports`
    (None: any). An IPv4 peer of a dual-stack socket comes as IPv4, as its packets do."""
    found = []
    for family, sock in _tcp_sockets(OPEN_STATES):
        if ports is not None and sock["idiag_sport"] not in ports:
            continue
        client, server, seen_as = sock["idiag_dst"], sock["idiag_src"], family
        if family == socket.AF_INET6 and client.startswith("::ffff:") and "." in client:
            seen_as, client, server = socket.AF_INET, client[7:], server[7:]
        found.append(Connection(seen_as, client, sock["idiag_dport"], server, sock["idiag_sport"]))
    return found


def listening_ports() -> set[int]:
    """The TCP ports servers of this namespace listen on (IPv4 and IPv6)."""
    return {sock["idiag_sport"] for _, sock in _tcp_sockets(LISTEN_STATE)}


def _tcp_sockets(states: int) -> list[tuple[int, Any]]:
    """(family, sock_diag message) of this namespace's IPv4 and IPv6 TCP sockets in `states`."""
    with DiagSocket() as diag:
        diag.bind()
        return [(family, sock) for family in (socket.AF_INET, socket.AF_INET6)
                for sock in diag.get_sock_stats(family=family, states=states)]


def adopt(connections: Iterable[Connection]) -> int:
    """Enter `connections` into conntrack as established flows (window checks off: it never saw
    their handshakes), so that with loose tracking off their next packets are neither invalid nor
    sent to SYNPROXY. Returns how many were new to it."""
    added = 0
    established = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [
        ["CTA_PROTOINFO_TCP_STATE", TCP_CONNTRACK_ESTABLISHED],
        ["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", {"value": (BE_LIBERAL, BE_LIBERAL)}],
        ["CTA_PROTOINFO_TCP_FLAGS_REPLY", {"value": (BE_LIBERAL, BE_LIBERAL)}]]}]]}
    with NFCTSocket() as ct_v4, NFCTSocket(nfgen_family=socket.AF_INET6) as ct_v6:
        for conn in connections:
            orig = NFCTAttrTuple(family=conn.family, saddr=conn.client, daddr=conn.server, proto=socket.IPPROTO_TCP,
                                 sport=conn.client_port, dport=conn.server_port)
            try:
                (ct_v4 if conn.family == socket.AF_INET else ct_v6).entry(
                    "add", tuple_orig=orig, tuple_reply=orig.reverse(), timeout=ESTABLISHED_TIMEOUT,
                    protoinfo=established)
            except NetlinkError as err:
                if err.code != errno.EEXIST:  # (one it tracks already)
                    raise
                continue
            added += 1
    return added


def _proves_ports(expr: str, ports: Iterable[int]) -> bool:
    """Whether libpcap's optimizer proves `expr` matches no TCP destination port outside `ports`."""
    alternatives = " or ".join(f"tcp dst port {port}" for port in sorted(ports))
    try:
        compile_cached(f"({expr}) and not ({alternatives})" if alternatives else f"({expr}) and tcp")
    except PcapError as err:
        return "rejects all packets" in str(err)
    return False


def _proved_ports(expr: str) -> frozenset[int] | None:
    """The ports libpcap proves `expr` limited to: candidates are the 16-bit constants its
    classic BPF compares with; each one the proof holds without is left out."""
    try:
        candidates = {ins.k for ins in compile_cached(expr)
                      if ins.code == BPF_JMP | BPF_JEQ | BPF_K and 0 < ins.k <= 0xFFFF}
    except PcapError:
        return None
    if not candidates or not _proves_ports(expr, candidates):
        return None
    for port in sorted(candidates):
        if len(candidates) > 1 and _proves_ports(expr, candidates - {port}):
            candidates.discard(port)
    return frozenset(candidates)


def conjuncts(expr: str) -> list[str]:
    """The top-level terms of `expr` when it is a conjunction (`A and (B or C) and D`); [expr]
    when a top-level `or` makes it something else (pcap-filter gives `and` and `or` one precedence,
    left to right). Parentheses nest; `&` and `|` are arithmetic, not logic."""
    depth, cuts, start, i = 0, [], 0, 0
    while i < len(expr):
        c = expr[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0:
            for word, logical in (("&&", "and"), ("||", "or"), ("and", "and"), ("or", "or")):
                if not expr.startswith(word, i):
                    continue
                if word.isalpha() and not _bounded(expr, i, len(word)):
                    continue
                if logical == "or":
                    return [expr]
                cuts.append(expr[start:i])
                start = i + len(word)
                i = start - 1
                break
        i += 1
    return [term.strip() for term in [*cuts, expr[start:]] if term.strip()]


def _bounded(expr: str, at: int, length: int) -> bool:
    before = expr[at - 1] if at else " "
    after = expr[at + length] if at + length < len(expr) else " "
    return not (before.isalnum() or before in "_-") and not (after.isalnum() or after in "_-")


def rule_ports(expr: str) -> frozenset[int] | None:
    """The destination ports a TCP-only rule can match, when libpcap proves it; None: any port.
    Proved for the whole expression, else for each top-level conjunct (the rule matches no more
    than any of them): the narrowest set proved."""
    proved = _proved_ports(expr)
    if proved is not None:
        return proved
    found = [ports for term in conjuncts(expr) if term != expr and (ports := _proved_ports(term)) is not None]
    return min(found, key=len) if found else None


def protected_ports(exprs: Iterable[str]) -> frozenset[int] | None:
    """The union of `rule_ports` over syncookie rules; None when one of them can match any port."""
    ports: set[int] = set()
    for expr in exprs:
        found = rule_ports(expr)
        if found is None:
            return None
        ports |= found
    return frozenset(ports)


def ruleset(interfaces: dict[str, Advertised], ports: frozenset[int] | None, loose: str,
            draining: bool = False) -> str:
    """nft -f input that (re)creates the table atomically; SYNPROXY answers on each interface as
    XDP does there (one rule per distinct `Advertised`). Draining: SYNs are tracked again (no
    notrack), SYNPROXY stays for the connections it opened."""

    def match(names: Iterable[str]) -> str:
        text = "iifname { " + ", ".join(json.dumps(name) for name in names) + " } "
        if ports is not None:
            return text + "tcp dport { " + ", ".join(str(port) for port in sorted(ports)) + " } "
        return text + "meta l4proto tcp "

    groups: dict[Advertised, list[str]] = {}
    for name, said in interfaces.items():
        groups.setdefault(said, []).append(name)
    synproxy = []
    for said, names in sorted(groups.items()):
        for family, mss in ((4, said.mss4), (6, said.mss6)):
            synproxy.append(f"        meta nfproto ipv{family} {match(names)}ct state invalid,untracked "
                            f"synproxy mss {mss} wscale {said.wscale} timestamp sack-perm")
    return "\n".join([
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f'    comment "bpfnet ddos syncookie rules{" (draining)" if draining else ""}; '
        f'nf_conntrack_tcp_loose was {loose}"',
        *([] if draining else [
            "    chain prerouting {",
            "        type filter hook prerouting priority raw; policy accept;",
            f"        {match(interfaces)}tcp flags & (fin | syn | rst | ack) == syn notrack",
            "    }"]),
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        *synproxy,
        f"        {match(interfaces)}ct state invalid drop",
        "    }",
        "}",
        "",
    ])


class Synproxy:
    """The table and sysctl of the namespace this process is in (the agent's, the stage's).

    Connections SYNPROXY opened need it (and conntrack) for their whole life: it translates their
    sequence numbers and timestamps. So when the last syncookie rule goes, the table drains for
    `drain_s` seconds — SYNs are tracked and reach the server again, SYNPROXY stays for the
    connections it opened — before it is removed (`expire`, from the controller's tick)."""

    def __init__(self, proc: str = "/proc/sys", drain_s: float = DRAIN_SECONDS) -> None:
        self._proc = proc
        self.drain_s = drain_s
        # what the table in force says: per interface what it advertises, and the protected ports
        self.installed: tuple[dict[str, Advertised], frozenset[int] | None] | None = None
        self.drain_until: float | None = None  # monotonic time the draining table goes
        self.adopted = 0  # open connections entered into conntrack since the table came
        self._absent = False  # known to have no table (nft is asked once, then after each install)

    def sync(self, interfaces: list[str], syncookie_exprs: list[str], now: float | None = None) -> None:
        """Install or update the table for these rules on these interfaces; with no rules (or no
        interfaces) drain the table this agent installed, remove one a previous agent left."""
        if not syncookie_exprs or not interfaces:
            if self.installed is None:
                if self.drain_until is None:
                    self.remove()
                return
            comment = self._table_comment()
            loose = self._loose_from(comment) if comment is not None else self._read(LOOSE)
            self._nft(["-f", "-"], ruleset(self.installed[0], self.installed[1], loose, draining=True))
            self.installed = None
            self.drain_until = (time.monotonic() if now is None else now) + self.drain_s
            return
        wanted = (self.measure(interfaces), protected_ports(syncookie_exprs))
        comment = self._table_comment()
        if wanted == self.installed and comment is not None:
            return
        loose = self._loose_from(comment) if comment is not None else self._read(LOOSE)
        # conntrack is told of the connections open to the protected ports before the table comes,
        # and again after, for those that opened meanwhile (their packets in between are dropped
        # and sent again): without loose tracking it would call them invalid, and drop them
        adopted = self._adopt(wanted[1])
        # loose tracking off before the table: with it on for a moment after, a cookie ACK would
        # be picked up as a new flow, miss SYNPROXY and meet the listener, which resets it
        self._write(LOOSE, "0")
        try:
            self._nft(["-f", "-"], ruleset(*wanted, loose))
        except SynproxyError:
            if comment is None:  # no table of ours: nothing else needs it off
                self._write(LOOSE, loose)
            raise
        self._absent = False
        if self.installed is None:
            self.adopted = 0
        self.installed, self.drain_until = wanted, None
        adopted += self._adopt(wanted[1])
        self.adopted += adopted
        if adopted:
            log.info("syncookie rules: conntrack now tracks %d connections that were open to the protected ports",
                     adopted)

    @staticmethod
    def _adopt(ports: frozenset[int] | None) -> int:
        try:
            return adopt(open_connections(ports))
        except (NetlinkError, OSError) as err:  # the rules go in all the same: protection first
            log.warning("syncookie rules: cannot enter the open connections into conntrack (%s); those "
                        "to the protected ports will reset", err)
            return 0

    def measure(self, interfaces: list[str]) -> dict[str, Advertised]:
        """What a SYN-ACK on each interface should advertise now: their MTUs, and the receive
        space this namespace lets a server's socket grow to (the larger of tcp_rmem's maximum and
        net.core.rmem_max)."""
        try:
            space = max(int(self._read(TCP_RMEM).split()[2]), int(self._read(RMEM_MAX)))
        except (IndexError, ValueError):
            raise SynproxyError(f"cannot read {TCP_RMEM} or {RMEM_MAX} as numbers") from None
        return {name: advertised(interface_mtu(name), space) for name in interfaces}

    def status(self, now: float | None = None) -> dict:
        """What `ddos stats` shows: off, draining (seconds left) or on, and then the protected
        ports ("all": every TCP port), what each interface advertises, the connections entered
        into conntrack, and the protected ports no server of this namespace listens on (SYNPROXY
        hands connections to local servers only: those handshakes would end in a reset)."""
        if self.installed is None:
            if self.drain_until is None:
                return {"state": "off"}
            left = self.drain_until - (time.monotonic() if now is None else now)
            return {"state": "draining", "seconds_left": max(round(left), 0)}
        advertised, ports = self.installed
        try:
            unserved = sorted(ports - listening_ports()) if ports is not None else []
        except (NetlinkError, OSError):
            unserved = []
        return {"state": "on", "ports": sorted(ports) if ports is not None else "all",
                "interfaces": [{"interface": name, "mss4": said.mss4, "mss6": said.mss6, "wscale": said.wscale}
                               for name, said in advertised.items()],  # (a list: no metric per name)
                "adopted": self.adopted, "ports_without_server": unserved}

    @property
    def advertising(self) -> dict[str, Advertised]:
        """Per interface, what the table in force advertises (empty when none is in force)."""
        return dict(self.installed[0]) if self.installed is not None else {}

    def expire(self, now: float) -> None:
        """Remove a draining table whose time is up (`now`: time.monotonic())."""
        if self.drain_until is not None and now >= self.drain_until:
            self.remove()

    def remove(self) -> None:
        """Remove the table (ours, or one a previous agent left) and restore the sysctl."""
        if self._absent and self.drain_until is None:
            return
        comment = self._table_comment()
        if comment is not None:
            self._nft(["delete", "table", "inet", TABLE])
            self._write(LOOSE, self._loose_from(comment))
        self.installed, self.drain_until = None, None
        self._absent = True

    def _table_comment(self) -> str | None:
        """The comment of our table; None when there is no table."""
        if shutil.which("nft") is None:
            return None
        result = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True)
        if result.returncode != 0:
            return None
        for item in json.loads(result.stdout).get("nftables", []):
            if "table" in item:
                return str(item["table"].get("comment", ""))
        return None

    @staticmethod
    def _loose_from(comment: str) -> str:
        value = comment.rpartition(" was ")[2].strip()
        return value if value.isdigit() else "1"

    def _nft(self, args: list[str], stdin: str | None = None) -> None:
        if shutil.which("nft") is None:
            raise SynproxyError("syncookie rules need nftables (the nft command) in the stage's namespace")
        result = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True)
        if result.returncode != 0:
            raise SynproxyError(f"nft {' '.join(args)}: {result.stderr.strip()}")

    def _read(self, key: str) -> str:
        try:
            with open(f"{self._proc}/{key}") as f:
                return f.read().strip()
        except OSError as err:
            if key == LOOSE:
                raise SynproxyError(f"syncookie rules need conntrack in the stage's namespace: {err}") from None
            raise SynproxyError(f"reading {key.replace('/', '.')}: {err}") from None

    def _write(self, key: str, value: str) -> None:
        try:
            with open(f"{self._proc}/{key}", "w") as f:
                f.write(value)
        except OSError as err:
            raise SynproxyError(f"setting {key.replace('/', '.')} to {value}: {err}") from None
