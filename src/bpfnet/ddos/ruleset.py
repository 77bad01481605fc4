"""The generated rule-set programs: ordered rules -> one straight program, or groups -> chunks of
eBPF; first match decides.

Packets enter a rule set by its *head*. A small set (or one that runs fold into one program) is
the head alone: its rules in order, then the verdict. A bigger one is grouped by packet key
(`grouping.py`): a packet runs only its key's group, which holds the rules of that key and the
rules that can match any key, in rule order. The head computes the key and finds the group's
first chunk by a binary search compiled into it; a group is a chain of XDP programs ("chunks")
of at most `RULES_PER_CHUNK` rules, held in one bank of the `ddos_progs` prog array (layout in
bpf/include/ddos/structs.h). When none of a chunk's rules matches it tail-calls the next chunk of
its group. Slots are immediates in the generated code, so a packet that entered one rule set
finishes in it even if the set in force changes meanwhile.

Every generated program ends in the same verdict code (`_emit_finish`): per-rule and outcome
counters in per-CPU arrays, a per-CPU sampling countdown, XDP_DROP or the next stage of the XDP
chain. Limit and syncookie rules (any action but drop and pass), the packet a sample is due for
and captures go on to the C verdict program with the match word (id, action, per-source flag) in
the per-CPU `ddos_match` map.

Consecutive source-network rules (`src net`, `src host`; `grouping.source_prefixes`) run as one
"prefix run": a single LPM lookup in `ddos_prefixes` instead of each rule's code, so a thousand
blocked networks cost one lookup, not a thousand tests. In a straight program, consecutive rules
of one shape (`final_compare`: `udp dst port N`, `ip[8] = N`) run as one "value run": the shape's
code once and a lookup of the compared value in `ddos_values`. Consecutive rules of mixed fields
(`src net X and udp dst port 53`, IPv4 and IPv6 networks; `grouping.rule_conjunctions`) run as a
"tuple run": one lookup per tuple shape, in the LPM trie `ddos_tuples` or, for a shape of one
prefix length, a hash map `ddos_tuple_h*`; the lowest position found decides.
Run ids and table offsets (bank and number) are immediates too.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from bpfnet.ddos.compiler import (
    BPF_ABS,
    BPF_B,
    BPF_H,
    BPF_IND,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_RET,
    emit_filter,
    split_blocks,
)
from bpfnet.ddos.grouping import (
    ETH_P_IP,
    ETH_P_IPV6,
    MAX_TUPLE_FIELDS,
    SOURCE_ADDRESS,
    Conjunction,
    Key,
    Prefix,
    TupleShape,
    group_rules,
    match_keys,
    rule_conjunctions,
    source_prefixes,
)
from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.ebpf import asm
from bpfnet.ebpf.asm import R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, Assembler, Helper, Label

# mirror of ddos/structs.h
MAX_RULES = 65536          # rule ids 1..65535: the match word's 16 bits, the per-rule maps' size
BANK_SLOTS = 2048
MAX_GROUPS = 16384  # keys of one rule set, twice over (the head's search tree holds half)
SLOT_VERDICT, SLOT_HEAD, SLOT_BANKS = 0, 1, 2
PROG_SLOTS = SLOT_BANKS + 2 * BANK_SLOTS
VALUE_RUNS = 4              # value runs per bank (ddos_values)
VALUE_RUN_SIZE = 65536      # a 16-bit value each
POKE_SITES = 1000           # constant-slot tail calls a head makes (the JIT patches at most 1024 a program)
MIN_VALUE_RUN = 2           # consecutive rules of one shape that become one lookup
CHAIN_SLOTS = 8             # XDP_CHAIN_SLOTS (common/xdp_chain.h): chain_slot of a stage attached alone
WORD_PER_SOURCE = 1 << 24
RULES_PER_CHUNK = 256       # rules or prefix runs
MAX_PREFIXES = 262144       # entries of ddos_prefixes, both banks
MAX_TUPLE_ENTRIES = 1 << 20  # entries of ddos_tuples, both banks
MAX_TUPLE_HASHED = 1 << 17  # entries of each ddos_tuple_h* map, both banks
MIN_PREFIX_RUN = 2          # consecutive source-network rules that become one lookup
MAX_GROUPED_RULES = 16384  # rules summed over groups (any-key rules repeat in each group)
XDP_DROP, XDP_PASS = 1, 2


class Action(IntEnum):
    NONE = 0
    DROP = 1
    PASS = 2
    LIMIT = 3
    SYNCOOKIE = 4  # SYNs answered with a cookie SYN-ACK by the verdict program (ddos/syncookie.h)


@dataclass(frozen=True)
class CompiledRule:
    """A rule ready for the data plane: its id (1..MAX_RULES-1), action and classic BPF."""

    id: int
    action: Action
    cbpf: tuple[CbpfInsn, ...]
    per_source: bool = False

    @property
    def match_word(self) -> int:
        return self.id | int(self.action) << 16 | (WORD_PER_SOURCE if self.per_source else 0)


@dataclass(frozen=True)
class PrefixRun:
    """Consecutive source-network rules of a group, run as one LPM lookup. `number` is unique
    within a rule set; groups holding the same run share it."""

    number: int
    rules: tuple[CompiledRule, ...]

    def run_id(self, bank: int) -> int:
        return bank << 16 | self.number

    @functools.cached_property
    def entries(self) -> dict[Prefix, int]:
        """(ethertype, network) -> match word of the run's first rule matching the addresses whose
        longest network in the run is that one. The lookup returns only the longest match; every
        other network of the run containing the address contains that one too, so the first rule
        among them is found by looking at the network's own supernets."""
        first: dict[tuple[int, int, int], int] = {}  # (ethertype, address, length) -> position
        networks: dict[tuple[int, int, int], Prefix] = {}
        for position, rule in enumerate(self.rules):
            for ethertype, network in rule_prefixes(rule.cbpf) or ():
                key = (ethertype, int(network.network_address), network.prefixlen)
                first.setdefault(key, position)
                networks.setdefault(key, (ethertype, network))
        none = len(self.rules)
        return {networks[key]: self.rules[min(
                    first.get((key[0], key[1] & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF, length), none)
                    for length in range(key[2] + 1))].match_word
                for key in first}


Shape = tuple[tuple[int, int, int, int | None], ...]


@functools.lru_cache(maxsize=16384)
def final_compare(cbpf: tuple[CbpfInsn, ...]) -> tuple[Shape, int] | None:
    """(shape, value) of a rule whose only dependence on a constant `value` (at most 16 bits) is
    the final comparison A == value, straight before its accepting and rejecting returns
    (`udp dst port 53`, `ip[8] = 64`); None for other rules.

    Every accepting return must be reached only from such a comparison, and no execution passes
    two of them (each ends the program). So the rule accepts a packet exactly when A at the one
    comparison its execution reaches equals `value`, and that A and which comparison is reached do
    not depend on `value`: consecutive rules of one shape are the first of them whose value is that
    A — one table lookup (a value run)."""
    prog = list(cbpf)
    split_blocks(prog)  # validates

    def returns(pc: int) -> int | None:
        ins = prog[pc]
        return ins.k if ins.code == BPF_RET | BPF_K else None

    sites = [pc for pc, ins in enumerate(prog) if ins.code == BPF_JMP | BPF_JEQ | BPF_K
             and returns(pc + 1 + ins.jt) not in (None, 0) and returns(pc + 1 + ins.jf) == 0]
    if not sites or len({prog[pc].k for pc in sites}) != 1 or prog[sites[0]].k > 0xFFFF:
        return None
    accepting = {pc for pc in range(len(prog)) if returns(pc) not in (None, 0)}
    if 0 in accepting:
        return None
    for pc, ins in enumerate(prog):  # an accepting return is only reached from a site's true branch
        if pc in sites or ins.code & 0x07 == BPF_RET:
            continue
        if ins.code & 0x07 == BPF_JMP:
            targets = {pc + 1 + ins.k} if ins.code & 0xF0 == 0 else {pc + 1 + ins.jt, pc + 1 + ins.jf}
        else:
            targets = {pc + 1}
        if targets & accepting:
            return None
    site_set = set(sites)
    shape = tuple((ins.code, ins.jt, ins.jf, None if pc in site_set else ins.k) for pc, ins in enumerate(prog))
    return shape, prog[sites[0]].k


@dataclass(frozen=True)
class ValueRun:
    """Consecutive rules of one shape (see `final_compare`), run as one lookup in `ddos_values`:
    the shape's code once, its final comparison replaced by table[value]. `number` is its table
    within the bank (0..VALUE_RUNS-1)."""

    number: int
    rules: tuple[CompiledRule, ...]

    def base(self, bank: int) -> int:
        return (bank * VALUE_RUNS + self.number) * VALUE_RUN_SIZE

    @property
    def sites(self) -> list[int]:
        shape, _ = final_compare(self.rules[0].cbpf) or ((), 0)
        return [pc for pc, ins in enumerate(shape) if ins[3] is None]

    @functools.cached_property
    def entries(self) -> dict[int, int]:
        """value -> match word of the run's first rule comparing with it."""
        out: dict[int, int] = {}
        for rule in self.rules:
            found = final_compare(rule.cbpf)
            assert found is not None
            out.setdefault(found[1], rule.match_word)
        return out


@dataclass(frozen=True)
class TupleRun:
    """Consecutive rules that are each a union of conjunctions (`grouping.rule_conjunctions`: fields
    equal to constants, an address by prefix), run as one lookup per tuple shape in `ddos_tuples`
    (tuple space search): the key is the run, the shape, the packet's values of the shape's fields
    and its address; the LPM entry for the longest prefix holds the position and match word of the
    first rule of the run among those with these values whose prefix contains it (all prefixes of
    an address are nested, so that is the first rule of the shape matching the packet). The run's
    first match is the lowest position over its shapes. `number` is unique within a rule set."""

    number: int
    rules: tuple[CompiledRule, ...]

    @functools.cached_property
    def shapes(self) -> list[tuple[TupleShape, int]]:
        """The run's shapes with the first position any of them can match, in that order."""
        first: dict[TupleShape, int] = {}
        for position, rule in enumerate(self.rules):
            for conjunction in rule_tuples(rule.cbpf) or ():
                first.setdefault(conjunction.shape, position)
        return sorted(first.items(), key=lambda item: (item[1], repr(item[0])))

    def run_id(self, bank: int, shape: int) -> int:
        return bank << 31 | self.number << 8 | shape

    @functools.cached_property
    def filters(self) -> dict[int, tuple[int, int, int, set[int]]]:
        """shape index -> (filter slot, address word, window end, window values) of the shapes
        that get an address filter: a bitmap over 16 address bits every entry of the shape fixes
        (those before the shortest prefix, within one word), looked up before the trie; a packet
        whose bits no entry has skips the shape's lookup (most packets, for most shapes)."""
        shortest: dict[int, int] = {}
        for shape, _, _, length in self.entries:
            shortest[shape] = min(shortest.get(shape, 128), length)
        out: dict[int, tuple[int, int, int, set[int]]] = {}
        for shape, end in shortest.items():
            if end == 0 or self.number >= FILTER_RUNS or shape >= FILTER_SHAPES:
                continue
            word = (end - 1) // 32
            bits = end - max(end - 16, 32 * word)
            values = {prefix >> (128 - end) & ((1 << bits) - 1)
                      for number, _, prefix, _ in self.entries if number == shape}
            out[shape] = (self.number * FILTER_SHAPES + shape, word, end, values)
        return out

    @functools.cached_property
    def hashed(self) -> dict[int, tuple[int, dict[tuple[tuple[int, ...], int], int]]]:
        """shape index -> (length, entries) of the shapes looked up in a hash map instead of the
        trie: those whose prefixes all have one length once the shorter ones are expanded to it,
        at most doubling the shape's entries (plus HASH_SLACK). entries: (values, the address
        masked to `length`) -> the value of the longest original prefix containing it, which is
        already the first rule among all its supernets (`entries`): so one exact lookup of the
        packet's masked address finds what the trie's longest match would."""
        by_shape: dict[int, list[tuple[tuple[int, ...], int, int, int]]] = {}
        for (shape, values, prefix, length), value in self.entries.items():
            by_shape.setdefault(shape, []).append((values, prefix, length, value))
        out: dict[int, tuple[int, dict[tuple[tuple[int, ...], int], int]]] = {}
        room = {size: MAX_TUPLE_HASHED // 2 for size in HASH_KEY_SIZES}  # (a bank's half of each map)
        for shape, found in sorted(by_shape.items()):
            if not HASH_TUPLES or shape >= HASH_SHAPES:
                continue
            longest = max(length for _, _, length, _ in found)
            count = sum(1 << (longest - length) for _, _, length, _ in found)
            if count > 2 * len(found) + HASH_SLACK or count > room[self.hash_key_size(shape)]:
                continue
            room[self.hash_key_size(shape)] -= count
            expanded: dict[tuple[tuple[int, ...], int], int] = {}
            for values, prefix, length, value in sorted(found, key=lambda entry: entry[2]):  # longer ones last
                for block in range(1 << (longest - length)):
                    expanded[values, prefix | block << (128 - longest)] = value
            out[shape] = (longest, expanded)
        return out

    def hash_fields(self, shape: int) -> list[int]:
        """The fields of a hashed shape's key, in key order: those its entries hold more than one
        value of (a field of one value is compared before the lookup: no need to hash it)."""
        return [index for index in _key_order(self.shapes[shape][0])
                if len(self.field_values.get((shape, index), ())) > 1]

    def hash_fields_bytes(self, shape: int) -> int:
        """Bytes of the hashed shape's key fields, padded to 4 (the address after them stays aligned)."""
        fields = self.shapes[shape][0].fields
        return -(-sum(_field_size(fields[index]) for index in self.hash_fields(shape)) // 4) * 4

    def hash_key_size(self, shape: int) -> int:
        """The size of the hashed shape's key (the ddos_tuple_h* map it is in): run id, fields, address."""
        used = 4 + self.hash_fields_bytes(shape) + 4 * self.shapes[shape][0].words
        return next(size for size in HASH_KEY_SIZES if size >= used)

    def hash_key(self, bank: int, shape: int, values: tuple[int, ...], address: int) -> bytes:
        """A key of the hashed shape's ddos_tuple_h* map (a ddos_tuple_key from `run` on, without
        the fields of one value): run id, the fields packed in their own sizes (network order,
        widest first, zeros to a multiple of 4 bytes), the address masked (`address`,
        left-aligned), zeros to the map's key size."""
        fields = self.shapes[shape][0].fields
        data = b"".join(values[i].to_bytes(_field_size(fields[i]), "big") for i in self.hash_fields(shape))
        key = struct.pack("<I", self.run_id(bank, shape)) + data.ljust(self.hash_fields_bytes(shape), b"\0")
        key += address.to_bytes(16, "big")[:4 * self.shapes[shape][0].words]
        return key.ljust(self.hash_key_size(shape), b"\0")

    @functools.cached_property
    def trie_entries(self) -> dict[tuple[int, tuple[int, ...], int, int], int]:
        """The entries of the shapes the trie holds (not `hashed`)."""
        return {key: value for key, value in self.entries.items() if key[0] not in self.hashed}

    @property
    def table_entries(self) -> int:
        """Entries the run writes (trie and hash maps)."""
        return len(self.trie_entries) + sum(len(entries) for _, entries in self.hashed.values())

    @functools.cached_property
    def field_values(self) -> dict[tuple[int, int], set[int]]:
        """(shape index, field index) -> the values the shape's entries hold for that field."""
        out: dict[tuple[int, int], set[int]] = {}
        for shape, values, _, _ in self.entries:
            for index, value in enumerate(values):
                out.setdefault((shape, index), set()).add(value)
        return out

    @functools.cached_property
    def entries(self) -> dict[tuple[int, tuple[int, ...], int, int], int]:
        """(shape index, values, prefix, length) -> position << 32 | match word of the first rule
        whose conjunctions of that shape and values hold for every address with that prefix."""
        index = {shape: number for number, (shape, _) in enumerate(self.shapes)}
        first: dict[tuple[int, tuple[int, ...], int, int], int] = {}
        for position, rule in enumerate(self.rules):
            for c in rule_tuples(rule.cbpf) or ():
                first.setdefault((index[c.shape], c.values, c.prefix, c.length), position)
        out: dict[tuple[int, tuple[int, ...], int, int], int] = {}
        for (shape, values, prefix, length), position in first.items():
            best = min(first.get((shape, values, prefix & _mask128(shorter), shorter), position)
                       for shorter in range(length + 1))
            out[shape, values, prefix, length] = best << 32 | self.rules[best].match_word
        return out


def hashed_overflow(rules: int, runs: list[TupleRun]) -> str | None:
    """Why the runs' hashed shapes do not fit a bank's half of their ddos_tuple_h* maps, or None."""
    for size in HASH_KEY_SIZES:
        total = sum(len(entries) for run in runs for shape, (_, entries) in run.hashed.items()
                    if run.hash_key_size(shape) == size)
        if total > MAX_TUPLE_HASHED // 2:
            return (f"{rules} rules need {total} entries of ddos_tuple_h{size}; a bank holds "
                    f"{MAX_TUPLE_HASHED // 2}")
    return None


def _mask128(length: int) -> int:
    return ((1 << length) - 1) << (128 - length)


@functools.lru_cache(maxsize=65536)
def rule_tuples(cbpf: tuple) -> frozenset[Conjunction] | None:
    return rule_conjunctions(cbpf)


Item = CompiledRule | PrefixRun | ValueRun | TupleRun

# rough cost of each item (ns-ish): what decides between tuple runs and the other folds
LOOKUP_COST, VALUE_LOOKUP_COST, INSNS_PER_COST = 10, 3, 6
TUPLE_LOOKUP_COST = LOOKUP_COST  # one LPM lookup per shape of a tuple run
ALWAYS_TUPLE_RUNS = False  # every stretch of two or more rules as a tuple run, whatever it costs (tests)
MAX_TUPLE_SHAPES = 64
HASH_TUPLES = True  # shapes of one prefix length as hash lookups (False: every shape in the trie; tests)
HASH_SHAPES = 255  # shapes of a run that may be hashed (the run id's shape byte)
HASH_SLACK = 64  # entries a shape's expansion to one prefix length may add beyond doubling
HASH_KEY_SIZES = (12, 16, 32, 48)  # key sizes of the ddos_tuple_h* maps


def _cost(items: list[Item]) -> float:
    def one(item: Item) -> float:
        if isinstance(item, PrefixRun):
            return LOOKUP_COST
        if isinstance(item, ValueRun):
            return VALUE_LOOKUP_COST
        if isinstance(item, TupleRun):
            return TUPLE_LOOKUP_COST * len(item.shapes)
        return len(item.cbpf) / INSNS_PER_COST
    return sum(one(item) for item in items)


def _with_tuple_runs(rules: list[CompiledRule], runs: dict[tuple[int, ...], TupleRun] | None = None,
                     keyed: bool = False) -> list[CompiledRule | TupleRun]:
    """The rules with each stretch of consecutive rules that are unions of conjunctions replaced by
    a tuple run where that costs less than their prefix and value runs and code (few shapes for
    many rules of mixed fields: networks with protocols and ports, IPv4 and IPv6). A stretch
    without networks is left to value runs and grouping, and so is one of rules that all have keys
    (a search in the head costs less than a lookup per shape) unless `keyed` (grouping cannot hold
    the set). `runs` holds the set's runs so far (the same stretch in another group is the same
    run)."""
    out: list[CompiledRule | TupleRun] = []
    stretch: list[CompiledRule] = []
    runs = {} if runs is None else runs

    def close() -> None:
        ids = tuple(rule.id for rule in stretch)
        run = runs.get(ids) or TupleRun(len(runs), tuple(stretch))
        worth = ALWAYS_TUPLE_RUNS or (
            any(shape.address is not None for shape, _ in run.shapes)
            and (keyed or not all(rule_keys(r.cbpf) for r in stretch))
            and _cost([run]) < _cost(_fold(list(stretch))))
        if len(stretch) >= 2 and len(run.shapes) <= MAX_TUPLE_SHAPES and worth:
            out.append(runs.setdefault(ids, run))
        else:
            out.extend(stretch)
        stretch.clear()

    for rule in rules:
        if rule_tuples(rule.cbpf) is not None:
            stretch.append(rule)
            continue
        close()
        out.append(rule)
    close()
    return out


def straight_items(rules: list[CompiledRule], keyed: bool = False) -> list[Item]:
    """The rules in order for a set run as one program: stretches of rules of mixed fields as tuple
    runs where they cost less (stretches of rules with keys too if `keyed`), then consecutive
    source-network rules as prefix runs and consecutive rules of one shape as value runs (up to
    VALUE_RUNS)."""
    return _fold(_with_tuple_runs(rules, keyed=keyed))


def _fold(rules: list[CompiledRule | TupleRun]) -> list[Item]:
    items = _with_prefix_runs(rules, {})
    out: list[Item] = []
    stretch: list[CompiledRule] = []
    shape: Shape | None = None

    def close() -> None:
        runs = sum(isinstance(item, ValueRun) for item in out)
        if len(stretch) >= MIN_VALUE_RUN and runs < VALUE_RUNS:
            out.append(ValueRun(runs, tuple(stretch)))
        else:
            out.extend(stretch)
        stretch.clear()

    for item in items:
        found = final_compare(item.cbpf) if isinstance(item, CompiledRule) else None
        if found is None or found[0] != shape:
            close()
            shape = found[0] if found is not None else None
        if found is None:
            out.append(item)
        else:
            stretch.append(item)  # type: ignore[arg-type]
    close()
    return out


def prefix_key(run_id: int, ethertype: int, network) -> bytes:
    """A ddos_prefixes key (struct ddos_prefix_key)."""
    return struct.pack("<II", 64 + network.prefixlen, run_id) + struct.pack(">H", ethertype) + b"\0\0" \
        + network.network_address.packed


def bank_slot(bank: int, index: int) -> int:
    """The prog array slot of program `index` of `bank` (0 or 1)."""
    if bank not in (0, 1) or not 0 <= index < BANK_SLOTS:
        raise ValueError(f"no slot for bank {bank} program {index}")
    return SLOT_BANKS + bank * BANK_SLOTS + index


@dataclass(frozen=True)
class Chunk:
    index: int                  # program number within the bank
    items: list[Item]
    next_index: int | None      # the group's next chunk, None for its last

    @property
    def rules(self) -> list[CompiledRule]:
        return [rule for item in self.items
                for rule in (item.rules if isinstance(item, PrefixRun | ValueRun | TupleRun) else (item,))]


@dataclass(frozen=True)
class Layout:
    """The programs of one rule set, where each group starts (key None: the any-key group), and
    the prefix runs whose lookup entries the set needs."""

    chunks: list[Chunk]
    entries: dict[Key | None, int]
    runs: list[PrefixRun]
    tuple_runs: list[TupleRun] = dataclasses.field(default_factory=list)

    @property
    def groups(self) -> int:
        return sum(1 for key in self.entries if key is not None)


@functools.lru_cache(maxsize=16384)
def rule_keys(cbpf: tuple) -> frozenset[Key] | None:
    return match_keys(cbpf)


@functools.lru_cache(maxsize=16384)
def rule_prefixes(cbpf: tuple) -> frozenset[Prefix] | None:
    return source_prefixes(cbpf)


def plan_layout(rules: list[CompiledRule], per_chunk: int = RULES_PER_CHUNK) -> Layout:
    """Group the rules by key and cut each group into chunks. When grouping would need more
    programs than a bank holds (or repeat any-key rules too often), all rules form one group.
    Keys whose groups hold the same rules (a port rule's IPv4 and IPv6 keys) share programs."""
    groups = group_rules(rules, lambda rule: rule_keys(rule.cbpf))
    planned: dict[Key | None, list[CompiledRule]] = dict(groups.by_key.items())
    planned[None] = groups.default
    distinct = {tuple(r.id for r in group): group for group in planned.values() if group}
    if (sum(len(g) for g in distinct.values()) > MAX_GROUPED_RULES or len(planned) > MAX_GROUPS // 2
            or sum(_chunk_count(len(g), per_chunk) for g in distinct.values()) > BANK_SLOTS):
        planned = {None: rules}
    chunks: list[Chunk] = []
    entries: dict[Key | None, int] = {}
    first_chunk: dict[tuple[int, ...], int] = {}
    runs: dict[tuple[int, ...], PrefixRun] = {}
    tuple_runs: dict[tuple[int, ...], TupleRun] = {}
    for key, group in planned.items():
        if not group:
            continue
        ids = tuple(r.id for r in group)
        if ids not in first_chunk:
            first_chunk[ids] = len(chunks)
            items = _with_prefix_runs(_with_tuple_runs(group, tuple_runs, keyed=key is None and len(planned) == 1),
                                      runs)
            pieces = [items[i:i + per_chunk] for i in range(0, len(items), per_chunk)]
            for number, piece in enumerate(pieces):
                index = len(chunks)
                chunks.append(Chunk(index, piece, index + 1 if number + 1 < len(pieces) else None))
        entries[key] = first_chunk[ids]
    if len(chunks) > BANK_SLOTS:
        raise ValueError(f"{len(rules)} rules need {len(chunks)} programs of {per_chunk} rules; "
                         f"a bank holds {BANK_SLOTS}")
    prefixes = sum(len(run.entries) for run in runs.values())
    if prefixes > MAX_PREFIXES // 2:
        raise ValueError(f"{len(rules)} rules need {prefixes} source-network entries; a bank holds "
                         f"{MAX_PREFIXES // 2}")
    tuple_entries = sum(run.table_entries for run in tuple_runs.values())
    if tuple_entries > MAX_TUPLE_ENTRIES // 2:
        raise ValueError(f"{len(rules)} rules need {tuple_entries} entries of ddos_tuples; a bank holds "
                         f"{MAX_TUPLE_ENTRIES // 2}")
    overflow = hashed_overflow(len(rules), list(tuple_runs.values()))
    if overflow:
        raise ValueError(overflow)
    return Layout(chunks, entries, list(runs.values()), list(tuple_runs.values()))


def _with_prefix_runs(group: list[CompiledRule] | list[CompiledRule | TupleRun],
                      runs: dict[tuple[int, ...], PrefixRun]) -> list[Item]:
    """The group's rules with each stretch of at least MIN_PREFIX_RUN consecutive source-network
    rules replaced by its prefix run (the same stretch in another group is the same run)."""
    items: list[Item] = []
    stretch: list[CompiledRule] = []
    for rule in [*group, None]:
        if isinstance(rule, CompiledRule) and rule_prefixes(rule.cbpf) is not None:
            stretch.append(rule)
            continue
        if len(stretch) >= MIN_PREFIX_RUN:
            ids = tuple(r.id for r in stretch)
            items.append(runs.setdefault(ids, PrefixRun(len(runs), tuple(stretch))))
        else:
            items.extend(stretch)
        stretch = []
        if rule is not None:
            items.append(rule)
    return items


def _chunk_count(rules: int, per_chunk: int) -> int:
    return -(-rules // per_chunk)


@dataclass(frozen=True)
class StageMaps:
    """File descriptors of the maps generated programs name directly, and where passing packets
    go next: slots after `chain_slot` of the XDP chain's prog array (none when attached alone)."""

    match: int = -1
    progs: int = -1
    prefixes: int = -1
    values: int = -1
    sampler: int = -1
    tuples: int = -1
    rule_stats: int = -1
    totals: int = -1
    chain: int | None = None
    chain_slot: int = CHAIN_SLOTS
    tuple_filter: int = -1
    tuple_hashes: tuple[int, ...] = ()  # the ddos_tuple_h* maps, in HASH_KEY_SIZES order


def chunk_program(items: list[Item], next_slot: int | None, match_map_fd: int, progs_fd: int, bank: int = 0,
                  prefixes_fd: int | None = None, maps: StageMaps | None = None) -> bytes:
    """Instructions of one chunk of a grouped rule set; `next_slot` is the prog array slot of the
    group's next chunk. Map fds are those of `ddos_match`, `ddos_progs`, `ddos_prefixes` and (in
    `maps`) the others the chunk names."""
    if prefixes_fd is None and any(isinstance(item, PrefixRun) for item in items):
        raise ValueError("a chunk with a prefix run needs the ddos_prefixes map")
    maps = dataclasses.replace(maps or StageMaps(), match=match_map_fd, progs=progs_fd,
                               prefixes=-1 if prefixes_fd is None else prefixes_fd)
    return _rules_program(items, next_slot, maps, bank)


def straight_program(items: list[Item], maps: StageMaps, bank: int = 0) -> bytes:
    """The whole rule set as one program: the head the entry program tail-calls, nothing after it."""
    return _rules_program(items, None, maps, bank)


def _rules_program(items: list[Item], next_slot: int | None, maps: StageMaps, bank: int) -> bytes:
    out = Assembler()
    finish = _Finish()
    out.emit(asm.mov64(R6, R1))
    for item in items:
        if isinstance(item, PrefixRun):
            _emit_prefix_lookup(out, item.run_id(bank), maps.prefixes, finish.found(item.rules))
        elif isinstance(item, ValueRun):
            _emit_value_run(out, item, bank, maps.values, finish.found(item.rules))
        elif isinstance(item, TupleRun):
            _emit_tuple_run(out, item, bank, maps.tuples, finish.found(item.rules), maps.tuple_filter,
                            maps.tuple_hashes)
        else:
            matched, following = Label(f"rule{item.id}"), Label(f"after{item.id}")
            emit_filter(list(item.cbpf), out, matched, following)
            out.place(matched)
            finish.matched(out, item)
            out.place(following)
    if next_slot is not None:
        _tail_call(out, maps.progs, next_slot)
    finish.no_match(out)  # (or the next chunk is missing)
    _emit_finish(out, maps, finish)
    return out.assemble()


def head_program(layout: Layout, bank: int, maps: StageMaps) -> bytes:
    """The head of a grouped rule set: computes the packet's key (where libpcap reads it, as
    `grouping.packet_key`) and finds its group by binary search over the keys, compiled in; tail-
    calls that group's first chunk, else the any-key group's. Tail calls to a constant slot are
    direct jumps once JIT-compiled; past POKE_SITES slots the leaves share one call by register."""
    out = Assembler()
    lookup, any_key, v4, v6 = Label("lookup"), Label("any_key"), Label("v4"), Label("v6")
    out.emit(asm.mov64(R6, R1), asm.ldx(4, R2, R6, 0), asm.ldx(4, R3, R6, 4),
             asm.mov64(R4, R2), asm.alu64(asm.ADD, R4, 14), asm.jmp(asm.JGT, R4, R3, any_key),
             asm.ldx(2, R4, R2, 12),
             asm.jmp(asm.JEQ, R4, _net16(ETH_P_IP), v4), asm.jmp(asm.JEQ, R4, _net16(ETH_P_IPV6), v6),
             asm.ja(any_key))
    # packed key in r1: family (0 IPv4, 1 IPv6) << 24 | protocol << 16 | destination port
    out.place(v4)
    out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, 24), asm.jmp(asm.JGT, R5, R3, any_key),
             asm.ldx(1, R5, R2, 23), asm.ldx(1, R1, R2, 14), asm.alu64(asm.AND, R1, 0xF),
             asm.alu64(asm.LSH, R1, 2), asm.alu64(asm.ADD, R1, R2), asm.mov64(R0, R1),
             asm.alu64(asm.ADD, R0, 18), asm.jmp(asm.JGT, R0, R3, any_key), asm.ldx(2, R1, R1, 16),
             asm.ja(lookup))
    out.place(v6)
    out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, 58), asm.jmp(asm.JGT, R5, R3, any_key),
             asm.ldx(1, R5, R2, 20), asm.ldx(2, R1, R2, 56), asm.alu32(asm.OR, R5, 1 << 8))
    out.place(lookup)
    out.emit(asm.to_be(R1, 16), asm.alu32(asm.LSH, R5, 16), asm.alu32(asm.OR, R1, R5))
    slots = {_packed(key): bank_slot(bank, index) for key, index in layout.entries.items()
             if key is not None and key[0] in (ETH_P_IP, ETH_P_IPV6)}
    direct = len(set(slots.values())) <= POKE_SITES
    leaves = {slot: Label(f"slot{slot}") for slot in set(slots.values())}
    _emit_search(out, sorted(slots.items()), leaves, any_key)
    shared = Label("shared")
    for slot, label in sorted(leaves.items()):
        out.place(label)
        if direct:
            _tail_call(out, maps.progs, slot)
            out.emit(asm.ja(any_key))
        else:
            out.emit(asm.mov32(R3, slot), asm.ja(shared))
    if not direct:
        out.place(shared)
        out.emit(asm.mov64(R1, R6), asm.ld_map_fd(R2, maps.progs), asm.call(Helper.tail_call))
    out.place(any_key)
    if None in layout.entries:
        _tail_call(out, maps.progs, bank_slot(bank, layout.entries[None]))
    finish = _Finish()
    finish.no_match(out)
    _emit_finish(out, maps, finish)
    return out.assemble()


def _packed(key: Key) -> int:
    ethertype, protocol, port = key
    return (ethertype == ETH_P_IPV6) << 24 | protocol << 16 | port


def _emit_search(out: Assembler, keys: list[tuple[int, int]], leaves: dict[int, Label], missed: Label) -> None:
    """Binary search of r1 among the sorted (packed key, slot) pairs: jump to the slot's leaf."""
    if len(keys) <= 4:
        for packed, slot in keys:
            out.emit(asm.jmp(asm.JEQ, R1, packed, leaves[slot], width=32))
        out.emit(asm.ja(missed))
        return
    middle = len(keys) // 2
    upper = Label("upper")
    out.emit(asm.jmp(asm.JGE, R1, keys[middle][0], upper, width=32))
    _emit_search(out, keys[:middle], leaves, missed)
    out.place(upper)
    _emit_search(out, keys[middle:], leaves, missed)


def _net16(value: int) -> int:
    """A 16-bit constant as a little-endian load of its network-order bytes gives it."""
    return int.from_bytes(value.to_bytes(2, "big"), "little")


# outcome totals (enum ddos_total_id) the generated programs count themselves
TOTAL_NO_MATCH, TOTAL_PASS_RULE, TOTAL_DROP_RULE = 0, 1, 2


@dataclass(frozen=True)
class _Finish:
    """Entry points of a program's verdict code: `word` with a match word in r9 (a lookup's),
    `known` with the word in r9 and its outcome total in r8 (a rule's own stub, no match), `slow`
    for the verdict program."""

    word: Label = dataclasses.field(default_factory=lambda: Label("finish_word"))
    known: Label = dataclasses.field(default_factory=lambda: Label("finish_known"))
    slow: Label = dataclasses.field(default_factory=lambda: Label("finish_slow"))

    def matched(self, out: Assembler, rule: CompiledRule) -> None:
        """A rule's stub: its word and outcome are constants. Any action but drop and pass (limit,
        and whatever else the C verdict program implements) goes to the verdict program."""
        if rule.action not in (Action.DROP, Action.PASS):
            out.emit(asm.mov32(R9, rule.match_word), asm.ja(self.slow))
            return
        total = TOTAL_DROP_RULE if rule.action == Action.DROP else TOTAL_PASS_RULE
        out.emit(asm.mov32(R9, rule.match_word), asm.mov32(R8, total), asm.ja(self.known))

    def found(self, rules: tuple[CompiledRule, ...]) -> Callable[[Assembler], None]:
        """What a lookup emits once its match word is in r9: when all the rules it may find share
        a drop or pass action, the outcome is known (no need to decode the word)."""
        actions = {rule.action for rule in rules}
        if len(actions) == 1 and actions <= {Action.DROP, Action.PASS}:
            total = TOTAL_DROP_RULE if actions == {Action.DROP} else TOTAL_PASS_RULE
            return lambda out: out.emit(asm.mov32(R8, total), asm.ja(self.known))
        return lambda out: out.emit(asm.ja(self.word))

    def no_match(self, out: Assembler) -> None:
        out.emit(asm.mov32(R9, 0), asm.mov32(R8, TOTAL_NO_MATCH), asm.ja(self.known))


def _emit_finish(out: Assembler, maps: StageMaps, finish: _Finish) -> None:
    """Act on the match word in r9 (0: no match): count the rule (packets, bytes, jiffies of the
    match: the cheapest clock, a load) and the outcome in per-CPU arrays and return the verdict;
    a passing packet goes on to the next stage of the chain. Limit and syncookie rules (any action
    but drop and pass), a sample due (per-CPU countdown) or a capture in progress (a flag in the
    countdown) go on to the verdict program instead, which does all of it in C."""
    slow, known, rule_done, counted = finish.slow, finish.known, Label("rule_done"), Label("counted")
    emit = out.emit
    # a word from a lookup: its action gives the outcome (r8)
    out.place(finish.word)
    # (drop and pass are decided here; any other action in the verdict program)
    emit(asm.mov32(R1, R9), asm.alu32(asm.RSH, R1, 16), asm.alu32(asm.AND, R1, 0xFF),
         asm.mov32(R8, TOTAL_DROP_RULE), asm.jmp(asm.JEQ, R1, int(Action.DROP), known),
         asm.mov32(R8, TOTAL_PASS_RULE), asm.jmp(asm.JNE, R1, int(Action.PASS), slow))
    out.place(known)
    count = Label("count")
    # the sampling countdown; negative (DDOS_SAMPLER_CAPTURE) while a capture runs
    emit(asm.st(4, R10, -4, 0), asm.ld_map_fd(R1, maps.sampler), asm.mov64(R2, R10), asm.alu64(asm.ADD, R2, -4),
         asm.call(Helper.map_lookup_elem), asm.jmp(asm.JEQ, R0, 0, count), asm.ldx(4, R1, R0, 0),
         asm.jmp(asm.JSLE, R1, 1, slow, width=32), asm.alu32(asm.SUB, R1, 1), asm.stx(4, R0, 0, R1))
    out.place(count)
    emit(asm.ldx(4, R2, R6, 0), asm.ldx(4, R7, R6, 4), asm.alu64(asm.SUB, R7, R2),  # bytes: data_end - data
         asm.jmp(asm.JEQ, R8, TOTAL_NO_MATCH, rule_done),
         asm.mov32(R1, R9), asm.alu32(asm.AND, R1, 0xFFFF), asm.stx(4, R10, -4, R1),
         asm.ld_map_fd(R1, maps.rule_stats), asm.mov64(R2, R10),
         asm.alu64(asm.ADD, R2, -4), asm.call(Helper.map_lookup_elem), asm.jmp(asm.JEQ, R0, 0, rule_done),
         asm.ldx(8, R1, R0, 0), asm.alu64(asm.ADD, R1, 1), asm.stx(8, R0, 0, R1),
         asm.ldx(8, R1, R0, 8), asm.alu64(asm.ADD, R1, R7), asm.stx(8, R0, 8, R1),
         asm.mov64(R9, R0), asm.call(Helper.jiffies64), asm.stx(8, R9, 16, R0))
    out.place(rule_done)
    emit(asm.stx(4, R10, -4, R8), asm.ld_map_fd(R1, maps.totals), asm.mov64(R2, R10), asm.alu64(asm.ADD, R2, -4),
         asm.call(Helper.map_lookup_elem), asm.jmp(asm.JEQ, R0, 0, counted), asm.ldx(8, R1, R0, 0),
         asm.alu64(asm.ADD, R1, 1), asm.stx(8, R0, 0, R1), asm.ldx(8, R1, R0, 8), asm.alu64(asm.ADD, R1, R7),
         asm.stx(8, R0, 8, R1))
    out.place(counted)
    passed = Label("passed")
    emit(asm.jmp(asm.JNE, R8, TOTAL_DROP_RULE, passed), asm.mov64(R0, XDP_DROP), asm.exit_insn())
    out.place(passed)
    if maps.chain is not None:
        for slot in range(maps.chain_slot + 1, CHAIN_SLOTS):
            _tail_call(out, maps.chain, slot)
    emit(asm.mov64(R0, XDP_PASS), asm.exit_insn())
    out.place(slow)
    stored = Label("stored")
    emit(asm.st(4, R10, -4, 0), asm.ld_map_fd(R1, maps.match), asm.mov64(R2, R10),
         asm.alu64(asm.ADD, R2, -4), asm.call(Helper.map_lookup_elem),
         asm.jmp(asm.JEQ, R0, 0, stored), asm.stx(4, R0, 0, R9))
    out.place(stored)
    _tail_call(out, maps.progs, SLOT_VERDICT)
    emit(asm.mov64(R0, XDP_PASS), asm.exit_insn())  # the verdict program is missing


def _emit_prefix_lookup(out: Assembler, run_id: int, prefixes_fd: int, finish: Callable[[Assembler], None]) -> None:
    """Look the frame's source address up in the run's networks: on a hit the entry's match word
    goes to `finish` (in r9). A frame of another ethertype, or too short to hold the address, matches
    none of the run's rules (libpcap rejects a load past the end)."""
    missed, lookup = Label(f"run{run_id}_missed"), Label(f"run{run_id}_lookup")
    by_offset: dict[int, list[int]] = {}
    for ethertype, offset in SOURCE_ADDRESS.items():
        by_offset.setdefault(offset, []).append(ethertype)
    reads = {offset: Label(f"run{run_id}_at{offset}") for offset in by_offset}
    out.emit(asm.ldx(4, R2, R6, 0), asm.ldx(4, R3, R6, 4),  # xdp_md data, data_end
             asm.mov64(R4, R2), asm.alu64(asm.ADD, R4, 14), asm.jmp(asm.JGT, R4, R3, missed),
             asm.ldx(2, R4, R2, 12))  # the ethertype as the frame holds it (network order)
    for offset, ethertypes in by_offset.items():
        for ethertype in ethertypes:
            out.emit(asm.jmp(asm.JEQ, R4, int.from_bytes(ethertype.to_bytes(2, "big"), "little"), reads[offset]))
    out.emit(asm.ja(missed))
    for offset, label in reads.items():
        out.place(label)
        out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, offset + 4), asm.jmp(asm.JGT, R5, R3, missed),
                 asm.ldx(4, R5, R2, offset), asm.ja(lookup))
    out.place(lookup)
    # struct ddos_prefix_key at fp-16: prefixlen (all of run and ethertype, then the address), run,
    # ethertype + 2 zero bytes, address
    out.emit(asm.st(4, R10, -16, 64 + 32), asm.st(4, R10, -12, run_id), asm.stx(4, R10, -8, R4),
             asm.stx(4, R10, -4, R5), asm.ld_map_fd(R1, prefixes_fd), asm.mov64(R2, R10),
             asm.alu64(asm.ADD, R2, -16), asm.call(Helper.map_lookup_elem),
             asm.jmp(asm.JEQ, R0, 0, missed), asm.ldx(4, R9, R0, 0))
    finish(out)
    out.place(missed)


def _emit_value_run(out: Assembler, run: ValueRun, bank: int, values_fd: int,
                    finish: Callable[[Assembler], None]) -> None:
    """The run's shape once; at its final comparison, table[base + A]: a match word goes to
    `finish` (in r9), 0 (or A wider than 16 bits, which no rule of the run compares with) is no
    match. A site right after a 8- or 16-bit load in its block needs no width check."""
    base = run.base(bank)
    prog = list(run.rules[0].cbpf)
    starts = split_blocks(list(prog))

    def lookup(narrow: bool) -> Callable[[Assembler, Label], None]:
        def emit(code: Assembler, nomatch: Label) -> None:
            if not narrow:
                code.emit(asm.jmp(asm.JGT, R4, VALUE_RUN_SIZE - 1, nomatch, width=32))
            if base:
                code.emit(asm.alu32(asm.ADD, R4, base))
            code.emit(asm.stx(4, R10, -4, R4), asm.ld_map_fd(R1, values_fd), asm.mov64(R2, R10),
                      asm.alu64(asm.ADD, R2, -4), asm.call(Helper.map_lookup_elem),
                      asm.jmp(asm.JEQ, R0, 0, nomatch), asm.ldx(4, R9, R0, 0), asm.jmp(asm.JEQ, R9, 0, nomatch))
            finish(code)
        return emit

    def narrow(pc: int) -> bool:
        before = prog[pc - 1] if pc > 0 and pc not in starts else None
        return (before is not None and before.code & 0x07 == BPF_LD and before.code & 0x18 in (BPF_H, BPF_B)
                and before.code & 0xE0 in (BPF_ABS, BPF_IND))

    following, matched = Label(f"after_values{run.number}"), Label(f"matched_values{run.number}")
    emit_filter(prog, out, matched, following, compares={pc: lookup(narrow(pc)) for pc in run.sites})
    out.place(matched)  # (never reached: every accepting return is behind a site)
    out.emit(asm.ja(following))
    out.place(following)


TUPLE_KEY = -128     # struct ddos_tuple_key on the stack (past the translator's scratch memory)
TUPLE_DATA = 4 * MAX_TUPLE_FIELDS + 16  # ddos_tuple_key.data: the fields packed, then the address
TUPLE_KEY_SIZE = 8 + TUPLE_DATA
PRECHECKED_VALUES = 3  # a field with at most this many values in a shape's entries is compared first
FILTER_RUNS, FILTER_SHAPES = 8, 8  # tuple runs of a set and shapes of a run with an address filter
FILTER_WORDS = 2048  # 32-bit words of one filter: a bit per value of 16 address bits


def _field_size(field: tuple) -> int:
    return (field[1] if field[0] == "and" else field)[-1]


def _key_order(shape: TupleShape) -> list[int]:
    """The order of the shape's fields in a key: widest first, so every store is aligned."""
    return sorted(range(len(shape.fields)), key=lambda i: -_field_size(shape.fields[i]))


def _fields_bytes(shape: TupleShape) -> int:
    """Bytes of the shape's packed fields, padded to 4 (the address after them stays aligned)."""
    return -(-sum(_field_size(field) for field in shape.fields) // 4) * 4


def tuple_key(run_id: int, shape: TupleShape, values: tuple[int, ...], prefix: int, length: int) -> bytes:
    """A ddos_tuples key (struct ddos_tuple_key): the shape's fields packed in their own sizes
    (network order, widest first, zeros to a multiple of 4 bytes), the address after them; the
    prefix covers the fields whole, then `length` bits of the address. Short keys: the trie
    compares only a node's prefix."""
    data = b"".join(values[i].to_bytes(_field_size(shape.fields[i]), "big") for i in _key_order(shape))
    data = data.ljust(_fields_bytes(shape), b"\0")
    prefix_bits = 32 + 8 * len(data) + length
    data += prefix.to_bytes(16, "big")[:4 * shape.words]
    return struct.pack("<II", prefix_bits, run_id) + data.ljust(TUPLE_DATA, b"\0")


def filter_index(bank: int, slot: int, value: int) -> int:
    """The ddos_tuple_filter word holding bit `value` of filter `slot` of `bank`."""
    return (bank * FILTER_RUNS * FILTER_SHAPES + slot) * FILTER_WORDS + (value >> 5)


def _emit_tuple_run(out: Assembler, run: TupleRun, bank: int, tuples_fd: int,
                    finish: Callable[[Assembler], None], filter_fd: int = -1,
                    hash_fds: tuple[int, ...] = ()) -> None:
    """One lookup per shape of the run, in the order of the first position each can match: the
    packet's values of the shape's fields (as libpcap loads them; a frame too short for one
    matches nothing of that shape, as libpcap's load fails) and its address, in the trie, or for a
    hashed shape its address masked to the shape's length in the hash map of its key size
    (`hash_fds`: the ddos_tuple_h* maps in HASH_KEY_SIZES order). r9 keeps the lowest position
    << 32 | word found; a shape that cannot beat it ends the search."""
    done, none = Label(f"tuples{run.number}_done"), Label(f"tuples{run.number}_none")
    hashed = run.hashed if len(hash_fds) == len(HASH_KEY_SIZES) else {}
    out.emit(asm.mov64(R9, -1))
    for offset in range(TUPLE_KEY, TUPLE_KEY + 4 + HASH_KEY_SIZES[-1], 8):
        out.emit(asm.st(8, R10, offset, 0))
    dirty = TUPLE_KEY  # where the key bytes earlier shapes may have written end
    out.emit(asm.st(4, R10, TUPLE_KEY, 32 + 8 * TUPLE_DATA))  # (a node compares its own prefix only)
    for number, (shape, first) in enumerate(run.shapes):
        skip = Label(f"tuples{run.number}_{number}_skip")
        if first:
            out.emit(*asm.ld_imm64(R1, first << 32), asm.jmp(asm.JLT, R9, R1, done))
        out.emit(asm.ldx(4, R2, R6, 0), asm.ldx(4, R3, R6, 4), asm.st(4, R10, TUPLE_KEY + 4, run.run_id(bank, number)))
        at = TUPLE_KEY + 8
        kept = run.hash_fields(number) if number in hashed else _key_order(shape)
        for index in _key_order(shape):
            field = shape.fields[index]
            _emit_field(out, field, skip)
            values = run.field_values.get((number, index), set())
            if len(values) <= PRECHECKED_VALUES:  # a packet with another value skips the lookup
                stored = Label(f"tuples{run.number}_{number}_{index}")
                for value in sorted(values):
                    out.emit(asm.jmp(asm.JEQ, R4, _raw(value, _field_size(field)), stored, width=32))
                out.emit(asm.ja(skip))
                out.place(stored)
            if index in kept:
                out.emit(asm.stx(_field_size(field), R10, at, R4))
                at += _field_size(field)
        fields_end = TUPLE_KEY + 8 + (run.hash_fields_bytes(number) if number in hashed else _fields_bytes(shape))
        for pad in range(at, fields_end):  # (an earlier shape's bytes)
            out.emit(asm.st(1, R10, pad, 0))
        at = fields_end
        if shape.address is not None:
            out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, shape.address + 4 * shape.words),
                     asm.jmp(asm.JGT, R5, R3, skip))
            for word in range(shape.words):
                bits = min(max(hashed[number][0] - 32 * word, 0), 32) if number in hashed else 32
                if bits == 0:
                    out.emit(asm.st(4, R10, at + 4 * word, 0))
                    continue
                out.emit(asm.ldx(4, R4, R2, shape.address + 4 * word))
                if bits < 32:
                    out.emit(asm.alu32(asm.AND, R4, _raw(0xFFFFFFFF << (32 - bits) & 0xFFFFFFFF, 4)))
                out.emit(asm.stx(4, R10, at + 4 * word, R4))
        end = at + 4 * shape.words
        if number in hashed:  # (zeros after the shape's bytes, where an earlier shape's may be)
            for offset in range(end, min(dirty, TUPLE_KEY + 4 + run.hash_key_size(number)), 4):
                out.emit(asm.st(4, R10, offset, 0))
        dirty = max(dirty, end)
        if shape.address is not None:
            if number in run.filters and filter_fd >= 0:
                slot, word, end, _ = run.filters[number]
                bits = end - max(end - 16, 32 * word)
                out.emit(asm.ldx(4, R4, R2, shape.address + 4 * word), asm.to_be(R4, 32),
                         asm.alu32(asm.RSH, R4, 32 * (word + 1) - end), asm.alu32(asm.AND, R4, (1 << bits) - 1),
                         asm.mov32(R5, R4), asm.alu32(asm.AND, R5, 31), asm.alu32(asm.RSH, R4, 5),
                         asm.alu32(asm.ADD, R4, filter_index(bank, slot, 0)), asm.stx(4, R10, -4, R4),
                         *asm.ld_map_fd(R1, filter_fd), asm.mov64(R2, R10), asm.alu64(asm.ADD, R2, -4))
                out.emit(asm.mov64(R7, R5), asm.call(Helper.map_lookup_elem), asm.jmp(asm.JEQ, R0, 0, skip),
                         asm.ldx(4, R1, R0, 0), asm.alu32(asm.RSH, R1, R7), asm.alu32(asm.AND, R1, 1),
                         asm.jmp(asm.JEQ, R1, 0, skip))
        if number in hashed:
            out.emit(*asm.ld_map_fd(R1, hash_fds[HASH_KEY_SIZES.index(run.hash_key_size(number))]), asm.mov64(R2, R10),
                     asm.alu64(asm.ADD, R2, TUPLE_KEY + 4))
        else:
            out.emit(*asm.ld_map_fd(R1, tuples_fd), asm.mov64(R2, R10), asm.alu64(asm.ADD, R2, TUPLE_KEY))
        out.emit(asm.call(Helper.map_lookup_elem), asm.jmp(asm.JEQ, R0, 0, skip), asm.ldx(8, R1, R0, 0),
                 asm.jmp(asm.JGE, R1, R9, skip), asm.mov64(R9, R1))
        out.place(skip)
    out.place(done)
    out.emit(asm.jmp(asm.JEQ, R9, -1, none), asm.mov32(R9, R9))
    finish(out)
    out.place(none)


def _emit_field(out: Assembler, field: tuple, missing: Label) -> None:
    """r4 = the field as libpcap loads it, masked, in network order (as the frame holds it), from
    data r2 and data_end r3; to `missing` when the frame is too short."""
    mask = None
    if field[0] == "and":
        field, mask = field[1], field[2]
    size = field[-1]
    if field[0] == "abs":
        offset = field[1]
        out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, offset + size), asm.jmp(asm.JGT, R5, R3, missing),
                 asm.ldx(size, R4, R2, offset))
    else:  # ("ind", ("msh", m), k, size): after the IPv4 header, X = 4 * (frame[m] & 0xf)
        header, offset = field[1][1], field[2]
        out.emit(asm.mov64(R5, R2), asm.alu64(asm.ADD, R5, header + 1), asm.jmp(asm.JGT, R5, R3, missing),
                 asm.ldx(1, R4, R2, header), asm.alu64(asm.AND, R4, 0xF), asm.alu64(asm.LSH, R4, 2),
                 asm.alu64(asm.ADD, R4, R2), asm.mov64(R5, R4), asm.alu64(asm.ADD, R5, offset + size),
                 asm.jmp(asm.JGT, R5, R3, missing), asm.ldx(size, R4, R4, offset))
    if mask is not None:  # the mask as a load of its network-order bytes gives it
        out.emit(asm.alu32(asm.AND, R4, _raw(mask & ((1 << 8 * size) - 1), size)))


def _raw(value: int, size: int) -> int:
    """`value` as a load of its `size` network-order bytes gives it."""
    return int.from_bytes(value.to_bytes(size, "big"), "little")


def _tail_call(out: Assembler, progs_fd: int, slot: int) -> None:
    out.emit(asm.mov64(R1, R6), asm.ld_map_fd(R2, progs_fd), asm.mov32(R3, slot),
             asm.call(Helper.tail_call))
