"""From desired VIPs to map operations, without touching the kernel.

``allocate`` turns VIPs with weighted reals into the tables the data plane holds (VIP numbers, real
ids, Maglev rings of real ids), keeping the numbers already in use. ``plan`` diffs two table states
into ordered map operations such that no packet ever sees half a change: new reals and ring slots are
written before the VIP entry that leads to them, and entries are deleted only once nothing leads to
them. Numbers freed in one step are never reused in the same step.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from bpfnet.errors import BpfnetError
from bpfnet.lb.config import LbState
from bpfnet.lb.hashing import IPAddress
from bpfnet.lb.maglev import MaglevVersion, build_ring

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VipKeyT = tuple[IPAddress, int, int]  # (address, port, IP protocol number); port 0 = port-less
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}


class PlanError(BpfnetError, ValueError):
    """The desired state does not fit the data plane (too many VIPs or reals)."""


@dataclass(frozen=True)
class VipEntry:
    vip_num: int
    flags: int


@dataclass
class TableState:
    vips: dict[VipKeyT, VipEntry] = field(default_factory=dict)
    reals: dict[int, IPAddress] = field(default_factory=dict)   # real id -> address
    rings: dict[int, list[int]] = field(default_factory=dict)   # vip_num -> real id per slot (0 = none)
    last_real_id: int = 0  # the id handed out last: new ids continue after it, so freed ones wait
    members: dict[VipKeyT, frozenset[int]] = field(default_factory=dict)  # real ids listed per VIP
    server_ids: dict[int, int] = field(default_factory=dict)  # server id -> real id
    down: frozenset[tuple[int, int]] = frozenset()  # (vip_num, real id) of reals that are down
    source_routes: dict[IPNetwork, int] = field(default_factory=dict)  # client prefix -> real id
    decap: frozenset[IPAddress] = frozenset()  # the LB's addresses that decapsulate inline
    portless: bool = False  # portless_vips[0]: some VIP is port-less (the data plane looks for one)


@dataclass(frozen=True)
class VipWant:
    """One VIP as the control plane wants it: reals with their effective weights (0 = out of ring)."""

    key: VipKeyT
    flags: int
    reals: Sequence[tuple[IPAddress, int]]
    version: MaglevVersion = "v2"


@dataclass(frozen=True)
class Routes:
    """Routing by more than the hash: server ids mapped to real addresses, and the reals of each
    VIP that are down (their UDP flows migrate on VIPs that ask for it)."""

    server_ids: Mapping[int, IPAddress] = field(default_factory=dict)
    down: frozenset[tuple[VipKeyT, IPAddress]] = frozenset()
    source_routes: Mapping[IPNetwork, IPAddress] = field(default_factory=dict)
    decap: frozenset[IPAddress] = frozenset()


@dataclass(frozen=True)
class MapOp:
    """Update ``keys`` to ``values`` in ``map`` (``values`` None = delete the keys)."""

    map: str
    keys: tuple
    values: tuple | None


def down_reals(state: LbState, failing: Collection[tuple[str, IPAddress]] = ()) -> set[tuple[str, IPAddress]]:
    """(VIP name, address) of the reals that are down: failing health checks, or marked down."""
    return set(failing) | {(down.vip, down.address) for down in state.down_reals}


def vip_wants(state: LbState, down: Collection[tuple[str, IPAddress]] = ()) -> list[VipWant]:
    """The VIPs of a config; reals in ``down`` ((VIP name, address) failing health checks) and reals
    marked down get weight 0."""
    down = down_reals(state, down)
    return [VipWant(vip_key(vip), vip.flag_bits,
                    [(r.address, 0 if (vip.name, r.address) in down else r.weight) for r in vip.reals],
                    vip.maglev)
            for vip in state.vips]


def routes(state: LbState, down: Collection[tuple[str, IPAddress]] = ()) -> Routes:
    """Server ids and down reals of a config (``down`` as for vip_wants)."""
    down = down_reals(state, down)
    return Routes(server_ids={s.id: s.address for s in state.server_ids},
                  source_routes={r.prefix: r.address for r in state.source_routes},
                  decap=frozenset(state.settings.decap_addresses),
                  down=frozenset((vip_key(vip), r.address) for vip in state.vips for r in vip.reals
                                 if (vip.name, r.address) in down))


def vip_key(vip) -> VipKeyT:
    return vip.address, vip.port, PROTOCOL_NUMBERS[vip.protocol]


def allocate(current: TableState, wanted: Sequence[VipWant], ring_size: int, max_vips: int,
             max_reals: int, routing: Routes = Routes()) -> TableState:
    vip_nums = _numbers([w.key for w in wanted], {k: e.vip_num for k, e in current.vips.items()},
                        range(max_vips), "VIPs", max_vips)
    addresses = list(dict.fromkeys([address for w in wanted for address, _ in w.reals]
                                   + list(routing.server_ids.values()) + list(routing.source_routes.values())))
    by_address = {address: real_id for real_id, address in current.reals.items()}
    real_ids = _numbers(addresses, by_address, range(1, max_reals), "reals", max_reals - 1,
                        after=max(current.last_real_id, max(current.reals, default=0)))
    desired = TableState()
    rings: dict[tuple, list[int]] = {}  # VIPs with the same reals share one ring build
    for want in wanted:
        num = vip_nums[want.key]
        desired.vips[want.key] = VipEntry(num, want.flags)
        shape = (tuple(want.reals), want.version)
        if shape not in rings:
            rings[shape] = build_ring(want.reals, ring_size, want.version)
        ring = rings[shape]
        ids = [real_ids[address] for address, _ in want.reals]
        desired.members[want.key] = frozenset(ids)
        desired.rings[num] = [ids[i] if i >= 0 else 0 for i in ring]
    desired.reals = {real_id: address for address, real_id in real_ids.items()}
    desired.server_ids = {server_id: real_ids[address] for server_id, address in routing.server_ids.items()}
    desired.decap = routing.decap
    desired.portless = any(port == 0 for _, port, _ in desired.vips)
    desired.source_routes = {prefix: real_ids[address] for prefix, address in routing.source_routes.items()}
    desired.down = frozenset((vip_nums[key], real_ids[address]) for key, address in routing.down
                             if key in vip_nums and address in real_ids)
    fresh = [real_id for address, real_id in real_ids.items() if address not in by_address]
    desired.last_real_id = fresh[-1] if fresh else current.last_real_id
    return desired


def _numbers(items: list, kept: dict, pool: range, what: str, limit: int, after: int | None = None) -> dict:
    """Numbers for items: the current one when they have one, else a number nobody uses now.

    With ``after``, free numbers above it come first (then the lower ones): an id freed recently,
    that connection-table entries may still name, is reused as late as possible."""
    result = {item: kept[item] for item in items if item in kept}
    if len(items) > limit:
        raise PlanError(f"{len(items)} {what} wanted, the data plane holds at most {limit}")
    busy = set(kept.values())
    free = [n for n in pool if n not in busy]
    if after is not None:
        free = [n for n in free if n > after] + [n for n in free if n <= after]
    fresh = iter(free)
    for item in items:
        if item not in result:
            try:
                result[item] = next(fresh)
            except StopIteration:
                raise PlanError(f"no free number for {what} (in use: {len(busy)}, limit {limit}); "
                                "apply the removals first") from None
    return result


def plan(current: TableState, desired: TableState, ring_size: int) -> list[MapOp]:
    ops: list[MapOp] = []

    def put(map_name: str, items: dict) -> None:
        if items:
            ops.append(MapOp(map_name, tuple(items), tuple(items.values())))

    def delete(map_name: str, keys) -> None:
        keys = tuple(keys)
        if keys:
            ops.append(MapOp(map_name, keys, None))

    # 1. reals and ring slots first: nothing leads to them until the VIP entry does. Counters of
    #    numbers given to a new VIP or real start from zero.
    put("vip_stats", {e.vip_num: 0 for k, e in desired.vips.items() if k not in current.vips})
    put("real_stats", {i: 0 for i in desired.reals if i not in current.reals})
    put("reals", {i: a for i, a in desired.reals.items() if current.reals.get(i) != a})
    for num, ring in desired.rings.items():
        put("ch_rings", _ring_changes(num, current.rings.get(num), ring, ring_size))
    put("server_ids", {i: r for i, r in desired.server_ids.items() if current.server_ids.get(i) != r})
    put("down_reals", {pair: 1 for pair in desired.down - current.down})
    put("decap_addrs", {address: 1 for address in desired.decap - current.decap})
    for version in (4, 6):
        put(f"src_routes_v{version}", {p: r for p, r in desired.source_routes.items()
                                       if p.version == version and current.source_routes.get(p) != r})
    if desired.portless and not current.portless:
        put("portless_vips", {0: 1})  # before a port-less VIP entry can be looked for
    # 2. the flip: VIP entries (new ones, changed flags) and the addresses they live on.
    put("vip_map", {k: e for k, e in desired.vips.items() if current.vips.get(k) != e})
    old_addrs, new_addrs = _address_counts(current), _address_counts(desired)
    put("vip_addrs", {a: n for a, n in new_addrs.items() if old_addrs.get(a) != n})
    # 3. deletions, once nothing reaches them.
    delete("vip_map", [k for k in current.vips if k not in desired.vips])
    delete("vip_addrs", [a for a in old_addrs if a not in new_addrs])
    delete("server_ids", [i for i in current.server_ids if i not in desired.server_ids])
    delete("down_reals", current.down - desired.down)
    delete("decap_addrs", current.decap - desired.decap)
    for version in (4, 6):
        delete(f"src_routes_v{version}", [p for p in current.source_routes
                                          if p.version == version and p not in desired.source_routes])
    used = set(desired.rings)
    for entry in current.vips.values():
        if entry.vip_num not in used:
            put("ch_rings", _ring_changes(entry.vip_num, current.rings.get(entry.vip_num),
                                          [0] * ring_size, ring_size))
    put("reals", {i: None for i in current.reals if i not in desired.reals})
    if current.portless and not desired.portless:
        put("portless_vips", {0: 0})  # the last port-less VIP entry is gone
    return ops


def _ring_changes(num: int, old: list[int] | None, new: list[int], ring_size: int) -> dict[int, int]:
    base = num * ring_size
    if old is None:  # content unknown (adopted data plane): write every slot
        return {base + pos: real_id for pos, real_id in enumerate(new)}
    return {base + pos: b for pos, (a, b) in enumerate(zip(old, new, strict=False)) if a != b}


def _address_counts(state: TableState) -> dict[IPAddress, int]:
    return dict(Counter(address for address, _, _ in state.vips))


def applied(current: TableState, desired: TableState, ring_size: int) -> TableState:
    """The table state after ``plan(current, desired)`` ran: the desired one, with the rings of
    removed VIPs known to be empty."""
    rings = dict(desired.rings)
    for entry in current.vips.values():
        if entry.vip_num not in rings:
            rings[entry.vip_num] = [0] * ring_size
    return TableState(dict(desired.vips), dict(desired.reals), rings, desired.last_real_id,
                      dict(desired.members), dict(desired.server_ids), desired.down,
                      dict(desired.source_routes), desired.decap, desired.portless)


def removed_members(current: TableState, desired: TableState) -> dict[VipKeyT, frozenset[int]]:
    """Reals taken off a VIP's list (all of them for a removed VIP). Connection-table entries of the
    VIP's flows that name them must go, or the flows would stay on a real the VIP no longer has
    (and a recycled id would inherit them). A drained real (weight 0) stays listed: its flows stay."""
    gone = {}
    for key, ids in current.members.items():
        lost = ids - desired.members.get(key, frozenset())
        if lost:
            gone[key] = lost
    return gone
