"""Flow records (Hubble-like): decoding the data plane's events, filters with `hubble observe`
semantics, the agent's bounded store of recent flow events, and output formats. Pure: no kernel
access here."""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


class Verdict(enum.IntEnum):
    FORWARDED = 1
    DROPPED = 2
    TRANSLATED = 3


class DropReason(enum.IntEnum):
    """Cilium's drop reason numbers, so users can compare with Hubble."""

    NONE = 0
    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET = 134
    CT_INVALID_HEADER = 135
    UNSUPPORTED_L3_PROTOCOL = 139
    ERROR_WRITING_TO_PACKET = 141
    CT_MAP_INSERTION_FAILED = 155
    FRAGMENT_NOT_SUPPORTED = 157
    SERVICE_BACKEND_NOT_FOUND = 158
    NO_TUNNEL_ENDPOINT = 160
    FIB_LOOKUP_FAILED = 169
    INVALID_IDENTITY = 171
    TTL_EXCEEDED = 196
    UNKNOWN_ENDPOINT = 203


TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
             "ECE": 0x40, "CWR": 0x80}
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMPv4", 58: "ICMPv6"}


class FlowEvent(ctypes.Structure):
    """Mirror of struct flow_event (bpf/include/pod/flow.h)."""

    _fields_ = [("time_ns", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("src_addr", ctypes.c_uint8 * 16),
                ("dst_addr", ctypes.c_uint8 * 16), ("src_port", ctypes.c_uint16),
                ("dst_port", ctypes.c_uint16), ("family", ctypes.c_uint8), ("protocol", ctypes.c_uint8),
                ("direction", ctypes.c_uint8), ("verdict", ctypes.c_uint8),
                ("drop_reason", ctypes.c_uint8), ("tcp_flags", ctypes.c_uint8),
                ("is_reply", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("src_identity", ctypes.c_uint32), ("dst_identity", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("packets", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32)]


FLOW_DTYPE = np.dtype(FlowEvent)  # the same record as a numpy structured dtype (batch ingest)


@dataclass(frozen=True)
class Endpoint:
    """One side of a flow as users know it."""

    address: str
    port: int = 0
    identity: int = 0
    namespace: str = ""
    pod: str = ""
    labels: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod}" if self.pod else self.address


@dataclass(frozen=True)
class Flow:
    time: float                      # seconds since the epoch
    node: str
    source: Endpoint
    destination: Endpoint
    protocol: str
    direction: str                   # "egress" (leaving a pod) or "ingress" (entering a pod)
    verdict: str
    drop_reason: str = ""
    tcp_flags: tuple[str, ...] = ()
    is_reply: bool = False
    packets: int = 1
    bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


Resolver = Callable[[str], tuple[str, str, tuple[str, ...]]]  # address -> (namespace, pod, labels)


def decode(raw: bytes, node: str, boot_offset: float, resolve: Resolver | None = None,
           identities: dict[int, tuple[str, ...]] | None = None) -> Flow:
    """A Flow from one ring-buffer record. `boot_offset` turns ktime (ns since boot) into epoch
    seconds; `resolve` names the pods behind addresses."""
    event = FlowEvent.from_buffer_copy(raw[:ctypes.sizeof(FlowEvent)])
    size = 4 if event.family == 4 else 16

    def endpoint(addr, port, identity) -> Endpoint:
        address = str(ipaddress.ip_address(bytes(addr)[:size]))
        namespace, pod, labels = resolve(address) if resolve else ("", "", ())
        if not labels and identities:
            labels = identities.get(identity, ())
        return Endpoint(address, int.from_bytes(port.to_bytes(2, "little"), "big"), identity,
                        namespace, pod, labels)

    return Flow(
        time=boot_offset + event.time_ns / 1e9, node=node,
        source=endpoint(event.src_addr, event.src_port, event.src_identity),
        destination=endpoint(event.dst_addr, event.dst_port, event.dst_identity),
        protocol=PROTOCOLS.get(event.protocol, str(event.protocol)),
        direction="ingress" if event.direction else "egress",
        verdict=verdict_name(event.verdict), drop_reason=drop_reason_name(event.verdict, event.drop_reason),
        tcp_flags=tuple(name for name, bit in TCP_FLAGS.items() if event.tcp_flags & bit),
        is_reply=bool(event.is_reply), packets=event.packets, bytes=event.bytes)


def verdict_name(verdict: int) -> str:
    return Verdict(verdict).name if verdict in Verdict._value2member_map_ else str(verdict)


def drop_reason_name(verdict: int, reason: int) -> str:
    """The name of a drop's reason; "" for a flow that was not dropped."""
    if verdict != Verdict.DROPPED:
        return ""
    try:
        return DropReason(reason).name
    except ValueError:
        return f"UNKNOWN_{reason}"


def ipv4_lookup(addresses: np.ndarray, table: Mapping[str, object], default: object) -> np.ndarray:
    """`table[address]` for each row of an address column (IPv4 in its first 4 bytes), each
    distinct address looked up once."""
    words = np.ascontiguousarray(addresses[:, :4]).view("<u4")[:, 0]
    distinct, inverse = np.unique(words, return_inverse=True)
    values = [table.get(str(ipaddress.IPv4Address(int(w).to_bytes(4, "little"))), default) for w in distinct]
    return np.array(values)[inverse]


def boot_offset() -> float:
    """Epoch seconds at ktime 0 (CLOCK_MONOTONIC, what bpf_ktime_get_ns counts)."""
    return time.time() - time.monotonic()


# --- filters (`bpfnet observe`) -------------------------------------------------------------------

Predicate = Callable[[Flow], bool]


def _pod_matches(endpoint: Endpoint, value: str) -> bool:
    # "ns/name", "ns/" (every pod of ns) or "name" (in any namespace), name may be a prefix
    if "/" in value:
        namespace, _, pod = value.partition("/")
        return endpoint.namespace == namespace and endpoint.pod.startswith(pod) and bool(endpoint.pod)
    return bool(endpoint.pod) and endpoint.pod.startswith(value)


def _label_matches(endpoint: Endpoint, value: str) -> bool:
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    return all(w in endpoint.labels if "=" in w else any(label.split("=")[0] == w for label in endpoint.labels)
               for w in wanted)


def _since(value: str, now: float) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if match:
        number, unit = float(match[1]), match[2]
        return now - number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    try:
        from datetime import datetime

        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"--since {value!r}: use a duration like 30s, 5m, 1h or an ISO time") from None


def _tcp_flags_match(flow: Flow, value: str) -> bool:
    wanted = [f.strip().upper() for f in value.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in TCP_FLAGS]
    if unknown:
        raise ValueError(f"--tcp-flags: unknown flag {unknown[0]} (use {', '.join(TCP_FLAGS)})")
    return all(f in flow.tcp_flags for f in wanted)


def _choice(value: str, allowed: Iterable[str], flag: str) -> str:
    upper = value.upper()
    allowed = list(allowed)
    if upper not in allowed:
        raise ValueError(f"{flag} {value!r}: use one of {', '.join(a.lower() for a in allowed)}")
    return upper


# flag -> builder(value, now) -> predicate
FILTERS: dict[str, Callable[[str, float], Predicate]] = {
    "--from-pod": lambda v, now: lambda f: _pod_matches(f.source, v),
    "--to-pod": lambda v, now: lambda f: _pod_matches(f.destination, v),
    "--pod": lambda v, now: lambda f: _pod_matches(f.source, v) or _pod_matches(f.destination, v),
    "--namespace": lambda v, now: lambda f: v in (f.source.namespace, f.destination.namespace),
    "--from-namespace": lambda v, now: lambda f: f.source.namespace == v,
    "--to-namespace": lambda v, now: lambda f: f.destination.namespace == v,
    "--label": lambda v, now: lambda f: _label_matches(f.source, v) or _label_matches(f.destination, v),
    "--from-label": lambda v, now: lambda f: _label_matches(f.source, v),
    "--to-label": lambda v, now: lambda f: _label_matches(f.destination, v),
    "--identity": lambda v, now: lambda f: int(v) in (f.source.identity, f.destination.identity),
    "--from-identity": lambda v, now: lambda f: f.source.identity == int(v),
    "--to-identity": lambda v, now: lambda f: f.destination.identity == int(v),
    "--ip": lambda v, now: lambda f: any(ipaddress.ip_address(a) in ipaddress.ip_network(v, strict=False)
                                         for a in (f.source.address, f.destination.address)),
    "--from-ip": lambda v, now: (
        lambda f: ipaddress.ip_address(f.source.address) in ipaddress.ip_network(v, strict=False)),
    "--to-ip": lambda v, now: (
        lambda f: ipaddress.ip_address(f.destination.address) in ipaddress.ip_network(v, strict=False)),
    "--verdict": lambda v, now: (
        (lambda want: lambda f: f.verdict == want)(_choice(v, Verdict.__members__, "--verdict"))),
    "--drop-reason": lambda v, now: (lambda want: lambda f: f.drop_reason == want)(
        _choice(v, DropReason.__members__, "--drop-reason")),
    "--port": lambda v, now: lambda f: int(v) in (f.source.port, f.destination.port),
    "--from-port": lambda v, now: lambda f: f.source.port == int(v),
    "--to-port": lambda v, now: lambda f: f.destination.port == int(v),
    "--protocol": lambda v, now: lambda f: f.protocol.lower() == v.lower(),
    "--tcp-flags": lambda v, now: lambda f: _tcp_flags_match(f, v),
    "--direction": lambda v, now: lambda f: f.direction == v.lower(),
    "--since": lambda v, now: (lambda t: lambda f: f.time >= t)(_since(v, now)),
    "--until": lambda v, now: (lambda t: lambda f: f.time <= t)(_since(v, now)),
}


@dataclass
class FlowFilter:
    """Values of one flag are ORed, different flags ANDed; a negated flag's group must not match."""

    groups: dict[tuple[str, bool], list[Predicate]] = field(default_factory=dict)

    def matches(self, flow: Flow) -> bool:
        for (_flag, negated), predicates in self.groups.items():
            if any(p(flow) for p in predicates) == negated:
                return False
        return True

    def __call__(self, flows: Iterable[Flow]) -> Iterator[Flow]:
        return (f for f in flows if self.matches(f))


def parse_filters(tokens: Sequence[str], now: float | None = None) -> FlowFilter:
    """Build a filter from `observe` arguments like ["--from-pod", "x/a", "--not", "--verdict",
    "dropped"]. Raises ValueError naming the flag on a bad value or an unknown flag."""
    now = time.time() if now is None else now
    result = FlowFilter()
    negate = False
    items = list(tokens)
    i = 0
    while i < len(items):
        token = items[i]
        if token == "--not":
            negate = True
            i += 1
            continue
        flag, eq, value = token.partition("=")
        if flag not in FILTERS:
            raise ValueError(f"unknown filter {flag!r} (filters: {', '.join(sorted(FILTERS))}, --not)")
        if not eq:
            if i + 1 >= len(items):
                raise ValueError(f"{flag} needs a value")
            value = items[i + 1]
            i += 1
        try:
            predicate = FILTERS[flag](value, now)
            if flag in ("--port", "--from-port", "--to-port", "--identity", "--from-identity", "--to-identity"):
                int(value)
            if flag.endswith("ip"):
                ipaddress.ip_network(value, strict=False)
        except ValueError as error:
            message = str(error)
            raise ValueError(message if message.startswith(flag) else f"{flag} {value!r}: {message}") from None
        result.groups.setdefault((flag, negate), []).append(predicate)
        negate = False
        i += 1
    if negate:
        raise ValueError("--not must be followed by a filter")
    return result


# --- the agent's store of recent flows ------------------------------------------------------------

FlowMaker = Callable[[bytes, str], Flow]  # (raw record, node) -> Flow, e.g. decode with a resolver
# Hubble's event types: what a tc program traced (forwarded, translated), what it dropped, and the
# socket LB's translations at connect().
EVENT_TYPES = ("trace", "drop", "sock")


class FlowStore:
    """The last `capacity` flow events as the kernel wrote them (a numpy ring of FLOW_DTYPE rows and
    the node of each), so `observe --last N` works without `--follow`. Batches go in whole with
    their counters updated vectorized; Flow objects (names, labels) are built only for the rows a
    query looks at. Events are numbered from 0 in arrival order; `seen` is the next number."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.events = np.zeros(capacity, FLOW_DTYPE)
        self.node_of = np.zeros(capacity, np.uint16)
        self.nodes: list[str] = []
        self.seen = 0
        self._by_verdict_and_reason = np.zeros((256, 256), np.int64)  # every event ever added
        self._by_type = dict.fromkeys(EVENT_TYPES, 0)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, batch: np.ndarray, node: str | Sequence[str], event_type: str = "trace") -> None:
        """Append a batch of FLOW_DTYPE records from `node`, or from the node of each row (the
        oldest rows make room); `event_type` is what the batch's events that are no drops are."""
        if not len(batch):
            return
        drops = int(np.count_nonzero(batch["verdict"] == Verdict.DROPPED))
        self._by_type["drop"] += drops
        self._by_type[event_type] += len(batch) - drops
        if isinstance(node, str):
            node_index = np.full(len(batch), self._node_index(node), np.uint16)
        else:
            names, inverse = np.unique(np.asarray(node, dtype=str), return_inverse=True)
            node_index = np.array([self._node_index(n) for n in names], np.uint16)[inverse]
        np.add.at(self._by_verdict_and_reason, (batch["verdict"], batch["drop_reason"]), 1)
        kept, kept_nodes = batch[-self.capacity:], node_index[-self.capacity:]
        start = (self.seen + len(batch) - len(kept)) % self.capacity
        head = min(len(kept), self.capacity - start)   # rows before the end of the ring, then from 0
        for rows, at in ((slice(0, head), start), (slice(head, len(kept)), 0)):
            count = rows.stop - rows.start
            self.events[at:at + count] = kept[rows]
            self.node_of[at:at + count] = kept_nodes[rows]
        self.seen += len(batch)

    def _node_index(self, node: str) -> int:
        if node not in self.nodes:
            self.nodes.append(node)
        return self.nodes.index(node)

    def counts(self) -> dict[tuple[str, str], int]:
        """Events added so far by (verdict, drop reason) names."""
        verdicts, reasons = np.nonzero(self._by_verdict_and_reason)
        return {(verdict_name(int(v)), drop_reason_name(int(v), int(r))): int(self._by_verdict_and_reason[v, r])
                for v, r in zip(verdicts, reasons, strict=False)}

    def counts_by_type(self) -> dict[str, int]:
        """Events added so far by event type (EVENT_TYPES)."""
        return dict(self._by_type)

    def rows(self, after: int = 0) -> FlowRows:
        """A copy of the events still held that arrived as number `after` or later (a query works
        on it without holding up ingest)."""
        order = np.arange(max(after, self.seen - len(self)), self.seen) % self.capacity
        return FlowRows(self.events[order], self.node_of[order], list(self.nodes))


@dataclass
class FlowRows:
    """Raw events copied out of a FlowStore, oldest first, with the node (index) of each."""

    events: np.ndarray
    node_of: np.ndarray
    nodes: list[str]

    def select(self, make_flow: FlowMaker, flow_filter: FlowFilter | None = None,
               last: int | None = None) -> list[Flow]:
        """The matching flows, oldest first; with `last` only the newest `last` of them. Rows are
        decoded newest first, until `last` have matched."""
        selected: list[Flow] = []
        for row in range(len(self.events) - 1, -1, -1):
            flow = make_flow(self.events[row].tobytes(), self.nodes[self.node_of[row]])
            if flow_filter is None or flow_filter.matches(flow):
                selected.append(flow)
                if last and len(selected) == last:
                    break
        return selected[::-1]


# --- output ----------------------------------------------------------------------------------------

def compact(flow: Flow) -> str:
    """One line in the spirit of `hubble observe`'s compact output."""
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(flow.time)) + f".{int(flow.time % 1 * 1000):03d}"
    src = f"{flow.source.name}:{flow.source.port}" if flow.source.port else flow.source.name
    dst = f"{flow.destination.name}:{flow.destination.port}" if flow.destination.port else flow.destination.name
    arrow = "<-" if flow.is_reply else "->"
    verdict = flow.verdict + (f" ({flow.drop_reason})" if flow.drop_reason else "")
    flags = f" {','.join(flow.tcp_flags)}" if flow.tcp_flags else ""
    return (f"{stamp} [{flow.node}]: {src} ({flow.source.identity}) {arrow} {dst} "
            f"({flow.destination.identity}) {flow.protocol}{flags} {flow.direction} {verdict}")
