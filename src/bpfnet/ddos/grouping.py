"""Grouping rules by (ethertype, IP protocol, destination port) so a packet walks only the rules
that can match it, and recognising source-network rules that a prefix lookup can stand for.

`match_keys` walks every path of a classic BPF program symbolically (cBPF is a DAG) and collects
the equality tests each accepting path makes. A rule all of whose accepting paths fix the three
key fields, read exactly where `packet_key` reads them, can only match packets with one of those
keys; any other rule is "any key". The data plane computes the key of each packet once and runs
only the group for that key: the rules with that key plus the any-key rules, in their original
order — so the first match is the same as with one long list.

`source_prefixes` recognises rules that test nothing but the ethertype and the IPv4 source (or ARP
sender) address against a network — `src net`, `src host`, `ip src net` — and gives the exact set
of (ethertype, network) pairs they accept, so consecutive ones can run as one LPM lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from bpfnet.ddos.compiler import (
    BPF_ABS,
    BPF_ALU,
    BPF_IND,
    BPF_JEQ,
    BPF_JMP,
    BPF_JSET,
    BPF_LD,
    BPF_LDX,
    BPF_MEM,
    BPF_MISC,
    BPF_MSH,
    BPF_RET,
    BPF_ST,
    BPF_STX,
    BPF_TAX,
    BPF_X,
    split_blocks,
)
from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.errors import BpfnetError

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_RARP = 0x0800, 0x86DD, 0x0806, 0x8035
BPF_AND = 0x50
Key = tuple[int, int, int]  # ethertype, IP protocol, destination port
Prefix = tuple[int, IPv4Network]  # ethertype, source network
MAX_STEPS = 100_000         # beyond this a program counts as "any key" (libpcap's are far smaller)

# Symbolic values: ("abs", offset, size), ("msh", offset), ("ind", x, offset, size), ("k", value).
ETHERTYPE = ("abs", 12, 2)
PROTOCOL = {ETH_P_IP: ("abs", 23, 1), ETH_P_IPV6: ("abs", 20, 1)}
DST_PORT = {ETH_P_IP: ("ind", ("msh", 14), 16, 2), ETH_P_IPV6: ("abs", 56, 2)}
# Where libpcap reads a frame's IPv4 source: the IP header's, or the sender's in ARP and RARP.
SOURCE_ADDRESS = {ETH_P_IP: 26, ETH_P_ARP: 28, ETH_P_RARP: 28}
_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}


def packet_key(frame: bytes) -> Key | None:
    """The key of a frame, read as the data plane reads it (None when a field is missing)."""
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_IP and len(frame) > 23:
        port_at = 4 * (frame[14] & 0xF) + 16
        if len(frame) >= port_at + 2:
            return ethertype, frame[23], int.from_bytes(frame[port_at:port_at + 2], "big")
    elif ethertype == ETH_P_IPV6 and len(frame) >= 58:
        return ethertype, frame[20], int.from_bytes(frame[56:58], "big")
    return None


class _Unknown(BpfnetError):
    """The walk cannot tell: too many steps, or (when exact) a test it does not record."""


def _accepting_paths(prog: list[CbpfInsn] | tuple[CbpfInsn, ...],
                     exact: Callable[[Any], bool] | None = None) -> Iterator[tuple[dict, frozenset, Any]]:
    """Every accepting path of `prog` (cBPF is a DAG): the equalities and inequalities of symbolic
    values with constants it establishes, and what it returns. Any other test lets the walk take
    both branches, unless `exact` is given: then a test of a value `exact` refuses raises _Unknown,
    so that the paths say everything the program checks."""
    prog = list(prog)
    split_blocks(prog)  # validates: jumps in range, known opcodes
    steps = 0
    # state: pc, A, X, scratch memory, equalities and inequalities known on this path
    # symbolic values are tuples such as ("k", 5), ("abs", 12, 2), ("and", value, mask)
    todo: list[tuple[int, Any, Any, dict, dict, frozenset]] = [(0, ("k", 0), ("k", 0), {}, {}, frozenset())]
    while todo:
        pc, a, x, mem, eq, ne = todo.pop()
        while True:
            steps += 1
            if steps > MAX_STEPS:
                raise _Unknown
            ins = prog[pc]
            cls, mode = ins.code & 0x07, ins.code & 0xE0
            if cls == BPF_RET:
                returned = {0x00: ("k", ins.k), 0x08: x, 0x10: a}[ins.code & 0x18]
                if returned != ("k", 0):
                    yield eq, ne, returned
                break
            if cls == BPF_JMP:
                op = ins.code & 0xF0
                if op == 0x00:  # ja
                    pc += 1 + ins.k
                    continue
                on_true, on_false = pc + 1 + ins.jt, pc + 1 + ins.jf
                constant_test = op == BPF_JEQ and not ins.code & BPF_X and a is not None
                if constant_test and a[0] == "k":
                    pc = on_true if a[1] == ins.k else on_false
                    continue
                if constant_test and (exact is None or exact(a)):
                    if a in eq or (a, ins.k) in ne:
                        pc = on_true if eq.get(a) == ins.k else on_false
                        continue
                    todo.append((on_false, a, x, mem, eq, ne | {(a, ins.k)}))
                    pc, eq = on_true, {**eq, a: ins.k}
                    continue
                masked = _masked(a, ins.k) if op == BPF_JSET and not ins.code & BPF_X else None
                if masked is not None and (exact is None or exact(masked)):
                    # jset k: (A & k) != 0 when true, (A & k) == 0 when false
                    if masked in eq or (masked, 0) in ne:
                        pc = on_true if eq.get(masked, 1) != 0 else on_false
                        continue
                    todo.append((on_false, a, x, mem, {**eq, masked: 0}, ne))
                    pc, ne = on_true, ne | {(masked, 0)}
                    continue
                if exact is not None:
                    raise _Unknown
                todo.append((on_false, a, x, mem, eq, ne))
                pc = on_true
                continue
            a, x, mem = _step(ins, cls, mode, a, x, mem)
            pc += 1


def _masked(a, mask: int):
    """The symbolic value `a & mask` of a packet field (abs or ind load, maybe masked already)."""
    if a is None:
        return None
    if a[0] == "and":
        return ("and", a[1], a[2] & mask)
    if a[0] in ("abs", "ind"):
        return ("and", a, mask)
    return None


def match_keys(prog: list[CbpfInsn] | tuple[CbpfInsn, ...]) -> frozenset[Key] | None:
    """The keys of every packet `prog` can accept, or None when that is not a finite set."""
    keys: set[Key] = set()
    try:
        for eq, _, _ in _accepting_paths(prog):
            key = _key_of(eq)
            if key is None:
                return None
            keys.add(key)
    except _Unknown:
        return None
    return frozenset(keys)


def _step(ins: CbpfInsn, cls: int, mode: int, a, x, mem: dict):
    """A and X (and M[]) after one non-jump instruction; None stands for "unknown value"."""
    if cls == BPF_LD:
        if mode == 0x00:
            return ("k", ins.k), x, mem
        if mode == BPF_ABS:
            return ("abs", ins.k, _SIZES[ins.code & 0x18]), x, mem
        if mode == BPF_IND:
            return (("ind", x, ins.k, _SIZES[ins.code & 0x18]) if x is not None else None), x, mem
        if mode == BPF_MEM:
            return mem.get(ins.k), x, mem
        return None, x, mem  # len
    if cls == BPF_LDX:
        if mode == 0x00:
            return a, ("k", ins.k), mem
        if mode == BPF_MSH:
            return a, ("msh", ins.k), mem
        if mode == BPF_MEM:
            return a, mem.get(ins.k), mem
        return a, None, mem
    if cls == BPF_ST:
        return a, x, {**mem, ins.k: a}
    if cls == BPF_STX:
        return a, x, {**mem, ins.k: x}
    if cls == BPF_ALU:
        if ins.code == BPF_ALU | BPF_AND:
            return _masked(a, ins.k), x, mem  # a masked field: `net` and flag tests compare it
        return None, x, mem
    if cls == BPF_MISC:
        return (a, a, mem) if ins.code & 0xF8 == BPF_TAX else (x, x, mem)
    return a, x, mem


def source_prefixes(prog: list[CbpfInsn] | tuple[CbpfInsn, ...]) -> frozenset[Prefix] | None:
    """The (ethertype, network) pairs whose union is exactly what `prog` accepts, when every path
    tests only the ethertype and one IPv4 source address against a network; else None.

    Exact, not an over-approximation like `match_keys`: any other test on an accepting path (a
    port, a negated network, a second network) makes it None, so a prefix lookup can replace the
    rule's code without changing a verdict."""
    found: set[Prefix] = set()
    try:
        for eq, ne, returned in _accepting_paths(prog, exact=_prefix_test):
            prefix = _accepted_prefix(eq, ne) if returned is not None and returned[0] == "k" else None
            if prefix is None:
                return None
            found.add(prefix)
    except _Unknown:
        return None
    return frozenset(found)


def _prefix_test(a) -> bool:
    """A value a source-network rule may compare: the ethertype or a (masked) source address."""
    return a == ETHERTYPE or _source_field(a) is not None


def _source_field(a) -> tuple[int, int] | None:
    """(offset, mask) of a 4-byte source address read, possibly masked."""
    if a is not None and a[0] == "and":
        a, mask = a[1], a[2]
    else:
        mask = 0xFFFFFFFF
    if a is not None and a[0] == "abs" and a[1] in SOURCE_ADDRESS.values() and a[2] == 4:
        return a[1], mask
    return None


def _accepted_prefix(eq: dict, ne: frozenset) -> Prefix | None:
    """The (ethertype, network) an accepting path stands for, None unless that is all it tests."""
    ethertype = eq.get(ETHERTYPE)
    tests = [(field, value) for field, value in eq.items() if field != ETHERTYPE]
    if ethertype not in SOURCE_ADDRESS or len(tests) != 1 or any(field != ETHERTYPE for field, _ in ne):
        return None
    field = _source_field(tests[0][0])
    if field is None:
        return None
    (offset, mask), value = field, tests[0][1]
    length = 32 - (~mask & 0xFFFFFFFF).bit_length()
    if offset != SOURCE_ADDRESS[ethertype] or mask != (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF or value & ~mask:
        return None
    return ethertype, IPv4Network((value, length))


def _key_of(eq: dict) -> Key | None:
    ethertype = eq.get(ETHERTYPE)
    if ethertype not in PROTOCOL:
        return None
    protocol, port = eq.get(PROTOCOL[ethertype]), eq.get(DST_PORT[ethertype])
    if protocol is None or port is None:
        return None
    return ethertype, protocol, port


@dataclass(frozen=True)
class Groups:
    """Rules per key (each list in rule order, any-key rules included) and the any-key rules."""

    by_key: dict[Key, list]
    default: list


def group_rules(rules: list, keys_of) -> Groups:
    """Split ordered rules into per-key groups; `keys_of(rule)` gives match_keys of a rule."""
    rule_keys = [keys_of(rule) for rule in rules]
    all_keys = sorted({k for keys in rule_keys if keys is not None for k in keys})
    by_key = {key: [r for r, keys in zip(rules, rule_keys, strict=False) if keys is None or key in keys]
              for key in all_keys}
    return Groups(by_key, [r for r, keys in zip(rules, rule_keys, strict=False) if keys is None])


# --- conjunctions: rules as lookups over the fields they fix (tuple space) ---------------------

MAX_FIELD_END = 0x3FFF  # fields the data plane reads end below this offset (a packet pointer's reach)
MAX_TUPLE_FIELDS = 6  # exact fields of a tuple besides its address (struct ddos_tuple_key)
# Where an address sits in a frame of each ethertype (source first) and how many 32-bit words it has.
ADDRESSES = {ETH_P_IP: ((26, 30), 1), ETH_P_ARP: ((28, 38), 1), ETH_P_RARP: ((28, 38), 1),
             ETH_P_IPV6: ((22, 38), 4)}


@dataclass(frozen=True)
class TupleShape:
    """What a conjunction tests: exact fields (symbolic loads as the walk names them, maybe masked)
    and the first `words` 32-bit words of an address at `address` (None: no address) matched by
    prefix (the words the prefix covers: libpcap reads only those)."""

    fields: tuple
    address: int | None
    words: int


@dataclass(frozen=True)
class Conjunction:
    """One accepting path of a rule: the fields of `shape` equal `values` and the address starts
    with the first `length` bits of `prefix` (a 128-bit number, the address left-aligned)."""

    shape: TupleShape
    values: tuple[int, ...]
    prefix: int
    length: int


def rule_conjunctions(prog: list[CbpfInsn] | tuple[CbpfInsn, ...]) -> frozenset[Conjunction] | None:
    """The conjunctions whose union is exactly what `prog` accepts, when every accepting path only
    tests packet fields (fixed offsets, or after the IPv4 header length) for equality, masked or
    not, and returns a constant; else None. Exact like `source_prefixes`: a range, a negation that
    the path's equalities do not imply, arithmetic or the frame length leave the rule as code."""
    found: set[Conjunction] = set()
    try:
        for eq, ne, returned in _accepting_paths(prog, exact=_tuple_field):
            if returned is None or returned[0] != "k":
                return None
            if any(field not in eq for field, _ in ne):  # (a test the equalities decide is implied)
                return None
            if not _satisfiable(eq):
                continue  # (no frame takes this path: a value wider than its field, or outside its mask)
            conjunction = _conjunction(eq)
            if conjunction is None:
                return None
            found.add(conjunction)
    except _Unknown:
        return None
    return frozenset(found)


def _tuple_field(a) -> bool:
    """A value the data plane can compute as libpcap does: a 1, 2 or 4-byte load at a fixed
    offset or after the IPv4 header (X from `ldxb 4*([k]&0xf)`), maybe masked."""
    base = a[1] if a is not None and a[0] == "and" else a
    if base is None or base[0] not in ("abs", "ind") or base[-1] not in (1, 2, 4):
        return False
    if base[0] == "abs":
        return base[1] + base[2] <= MAX_FIELD_END
    return base[1] is not None and base[1][0] == "msh" and base[1][1] < 64 and base[2] + base[3] <= MAX_FIELD_END


def _satisfiable(eq: dict) -> bool:
    for field, value in eq.items():
        if field[0] == "and":
            if value & ~field[2] or value >> 8 * field[1][-1]:
                return False
        elif field[0] in ("abs", "ind") and value >> 8 * field[-1]:
            return False
    return True


def _prefix_mask(mask: int) -> int | None:
    """The length of a 32-bit prefix mask (1...10...0), else None."""
    length = 32 - (~mask & 0xFFFFFFFF).bit_length()
    return length if mask == (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF else None


def _conjunction(eq: dict) -> Conjunction | None:
    ethertype = eq.get(ETHERTYPE)
    starts, words = ADDRESSES[ethertype] if ethertype in ADDRESSES else ((), 0)
    used: set = set()
    prefix = length = 0
    address = None
    for start in starts:
        for word in range(words):
            whole = ("abs", start + 4 * word, 4)
            bits: int | None = 32
            if whole in eq:
                value = eq[whole]
                used.add(whole)
            else:
                masked = next((f for f in eq if f[0] == "and" and f[1] == whole and _prefix_mask(f[2]) is not None
                               and not eq[f] & ~f[2]), None)
                if masked is None:
                    break
                value, bits = eq[masked], _prefix_mask(masked[2])
                used.add(masked)
            assert bits is not None
            prefix |= value << (96 - 32 * word)
            length += bits
            if bits < 32:
                break
        if used:
            address = start
            break
    fields = tuple(sorted((f for f in eq if f not in used), key=repr))
    if len(fields) > MAX_TUPLE_FIELDS:
        return None
    # (the words libpcap reads: a frame that ends inside a longer address still matches a /64)
    shape = TupleShape(fields, address, len(used))
    return Conjunction(shape, tuple(eq[f] for f in fields), prefix, length)
