"""The generated rule-set programs: ordered rules -> groups -> chunks of eBPF, first match decides.

Rules are grouped by packet key (`grouping.py`): a packet runs only its key's group, which holds
the rules of that key and the rules that can match any key, in rule order. A group is a chain of
XDP programs ("chunks") of at most `RULES_PER_CHUNK` rules, held in one bank of the `ddos_progs`
prog array (layout in bpf/include/ddos/structs.h). Each chunk runs its rules in order; on the
first match it stores the rule's match word (id, action, per-source flag) in the per-CPU
`ddos_match` map and tail-calls the verdict program. When none of its rules matches it
tail-calls the next chunk of its group, and the last chunk reports "no match" (word 0). Slots are
immediates in each chunk, so a packet that entered one rule set finishes in it even if the
active bank is switched meanwhile.

Consecutive source-network rules of a group (`src net`, `src host`; `grouping.source_prefixes`)
run as one "prefix run": a single LPM lookup in `ddos_prefixes` instead of each rule's code, so a
thousand blocked networks cost one lookup, not a thousand tests. The run's id (bank and number)
is an immediate too.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import IntEnum

from bpfnet.ddos.compiler import emit_filter
from bpfnet.ddos.grouping import SOURCE_ADDRESS, Key, Prefix, group_rules, match_keys, source_prefixes
from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.ebpf import asm
from bpfnet.ebpf.asm import R0, R1, R2, R3, R4, R5, R6, R9, R10, Assembler, Helper, Label

# mirror of ddos/structs.h
MAX_RULES = 4096
BANK_SLOTS = 2048
MAX_GROUPS = 16384  # entries of ddos_groups, both banks
SLOT_VERDICT, SLOT_BANKS = 0, 1
PROG_SLOTS = SLOT_BANKS + 2 * BANK_SLOTS
WORD_PER_SOURCE = 1 << 24
RULES_PER_CHUNK = 256       # rules or prefix runs
MAX_PREFIXES = 262144       # entries of ddos_prefixes, both banks
MIN_PREFIX_RUN = 2          # consecutive source-network rules that become one lookup
MAX_GROUPED_RULES = 16384  # rules summed over groups (any-key rules repeat in each group)
XDP_PASS = 2


class Action(IntEnum):
    NONE = 0
    DROP = 1
    PASS = 2
    LIMIT = 3


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


Item = CompiledRule | PrefixRun


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
        return [rule for item in self.items for rule in (item.rules if isinstance(item, PrefixRun) else (item,))]


@dataclass(frozen=True)
class Layout:
    """The programs of one rule set, where each group starts (key None: the any-key group), and
    the prefix runs whose lookup entries the set needs."""

    chunks: list[Chunk]
    entries: dict[Key | None, int]
    runs: list[PrefixRun]

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
    for key, group in planned.items():
        if not group:
            continue
        ids = tuple(r.id for r in group)
        if ids not in first_chunk:
            first_chunk[ids] = len(chunks)
            items = _with_prefix_runs(group, runs)
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
    return Layout(chunks, entries, list(runs.values()))


def _with_prefix_runs(group: list[CompiledRule], runs: dict[tuple[int, ...], PrefixRun]) -> list[Item]:
    """The group's rules with each stretch of at least MIN_PREFIX_RUN consecutive source-network
    rules replaced by its prefix run (the same stretch in another group is the same run)."""
    items: list[Item] = []
    stretch: list[CompiledRule] = []
    for rule in [*group, None]:
        if rule is not None and rule_prefixes(rule.cbpf) is not None:
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


def chunk_program(items: list[Item], next_slot: int | None, match_map_fd: int, progs_fd: int,
                  bank: int = 0, prefixes_fd: int | None = None) -> bytes:
    """Instructions of one chunk; `next_slot` is the prog array slot of the group's next chunk.
    Map fds are those of `ddos_match`, `ddos_progs` and (for prefix runs) `ddos_prefixes`."""
    out = Assembler()
    finish = Label("finish")
    out.emit(asm.mov64(R6, R1))
    for item in items:
        if isinstance(item, PrefixRun):
            if prefixes_fd is None:
                raise ValueError("a chunk with a prefix run needs the ddos_prefixes map")
            _emit_prefix_lookup(out, item.run_id(bank), prefixes_fd, finish)
            continue
        matched, following = Label(f"rule{item.id}"), Label(f"after{item.id}")
        emit_filter(list(item.cbpf), out, matched, following)
        out.place(matched)
        out.emit(asm.mov32(R9, item.match_word), asm.ja(finish))
        out.place(following)
    if next_slot is not None:
        _tail_call(out, progs_fd, next_slot)
    out.emit(asm.mov32(R9, 0))  # no rule matched (or the next chunk is missing)
    out.place(finish)
    stored = Label("stored")
    out.emit(asm.st(4, R10, -4, 0), asm.ld_map_fd(R1, match_map_fd), asm.mov64(R2, R10),
             asm.alu64(asm.ADD, R2, -4), asm.call(Helper.map_lookup_elem),
             asm.jmp(asm.JEQ, R0, 0, stored), asm.stx(4, R0, 0, R9))
    out.place(stored)
    _tail_call(out, progs_fd, SLOT_VERDICT)
    out.emit(asm.mov64(R0, XDP_PASS), asm.exit_insn())  # the verdict program is missing
    return out.assemble()


def _emit_prefix_lookup(out: Assembler, run_id: int, prefixes_fd: int, finish: Label) -> None:
    """Look the frame's source address up in the run's networks: on a hit the entry's match word
    goes to `finish`. A frame of another ethertype, or too short to hold the address, matches
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
             asm.jmp(asm.JEQ, R0, 0, missed), asm.ldx(4, R9, R0, 0), asm.ja(finish))
    out.place(missed)


def _tail_call(out: Assembler, progs_fd: int, slot: int) -> None:
    out.emit(asm.mov64(R1, R6), asm.ld_map_fd(R2, progs_fd), asm.mov32(R3, slot),
             asm.call(Helper.tail_call))
