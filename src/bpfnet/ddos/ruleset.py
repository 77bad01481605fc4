"""The generated rule-set programs: ordered rules -> groups -> chunks of eBPF, first match decides.

Rules are grouped by packet key (`grouping.py`): a packet runs only its key's group, which holds
the rules of that key and the rules that can match any key, in rule order. A group is a chain of
XDP programs ("chunks") of at most `RULES_PER_CHUNK` rules, held in one bank of the `ddos_progs`
prog array (layout in bpf/include/ddos_structs.h). Each chunk runs its rules in order; on the
first match it stores the rule's match word (id, action, per-source flag) in the per-CPU
`ddos_match` map and tail-calls the verdict program. When none of its rules matches it
tail-calls the next chunk of its group, and the last chunk reports "no match" (word 0). Slots are
immediates in each chunk, so a packet that entered one rule set finishes in it even if the
active bank is switched meanwhile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

from bpfnet.ddos.compiler import emit_filter
from bpfnet.ddos.grouping import Key, group_rules, match_keys
from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.ebpf import asm
from bpfnet.ebpf.asm import R0, R1, R2, R3, R6, R9, R10, Assembler, Helper, Label

# mirror of ddos_structs.h
MAX_RULES = 4096
BANK_SLOTS = 2048
MAX_GROUPS = 16384  # entries of ddos_groups, both banks
SLOT_VERDICT, SLOT_BANKS = 0, 1
PROG_SLOTS = SLOT_BANKS + 2 * BANK_SLOTS
WORD_PER_SOURCE = 1 << 24
RULES_PER_CHUNK = 256
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


def bank_slot(bank: int, index: int) -> int:
    """The prog array slot of program `index` of `bank` (0 or 1)."""
    if bank not in (0, 1) or not 0 <= index < BANK_SLOTS:
        raise ValueError(f"no slot for bank {bank} program {index}")
    return SLOT_BANKS + bank * BANK_SLOTS + index


@dataclass(frozen=True)
class Chunk:
    index: int                  # program number within the bank
    rules: list[CompiledRule]
    next_index: int | None      # the group's next chunk, None for its last


@dataclass(frozen=True)
class Layout:
    """The programs of one rule set and where each group starts (key None: the any-key group)."""

    chunks: list[Chunk]
    entries: dict[Key | None, int]

    @property
    def groups(self) -> int:
        return sum(1 for key in self.entries if key is not None)


@functools.lru_cache(maxsize=16384)
def rule_keys(cbpf: tuple) -> frozenset[Key] | None:
    return match_keys(cbpf)


def plan_layout(rules: list[CompiledRule], per_chunk: int = RULES_PER_CHUNK) -> Layout:
    """Group the rules by key and cut each group into chunks. When grouping would need more
    programs than a bank holds (or repeat any-key rules too often), all rules form one group.
    Keys whose groups hold the same rules (a port rule's IPv4 and IPv6 keys) share programs."""
    groups = group_rules(rules, lambda rule: rule_keys(rule.cbpf))
    planned: dict[Key | None, list[CompiledRule]] = {**groups.by_key, None: groups.default}
    distinct = {tuple(r.id for r in group): group for group in planned.values() if group}
    if (sum(len(g) for g in distinct.values()) > MAX_GROUPED_RULES or len(planned) > MAX_GROUPS // 2
            or sum(_chunk_count(len(g), per_chunk) for g in distinct.values()) > BANK_SLOTS):
        planned = {None: rules}
    chunks: list[Chunk] = []
    entries: dict[Key | None, int] = {}
    first_chunk: dict[tuple[int, ...], int] = {}
    for key, group in planned.items():
        if not group:
            continue
        ids = tuple(r.id for r in group)
        if ids not in first_chunk:
            first_chunk[ids] = len(chunks)
            pieces = [group[i:i + per_chunk] for i in range(0, len(group), per_chunk)]
            for number, piece in enumerate(pieces):
                index = len(chunks)
                chunks.append(Chunk(index, piece, index + 1 if number + 1 < len(pieces) else None))
        entries[key] = first_chunk[ids]
    if len(chunks) > BANK_SLOTS:
        raise ValueError(f"{len(rules)} rules need {len(chunks)} programs of {per_chunk} rules; "
                         f"a bank holds {BANK_SLOTS}")
    return Layout(chunks, entries)


def _chunk_count(rules: int, per_chunk: int) -> int:
    return -(-rules // per_chunk)


def chunk_program(rules: list[CompiledRule], next_slot: int | None, match_map_fd: int,
                  progs_fd: int) -> bytes:
    """Instructions of one chunk; `next_slot` is the prog array slot of the group's next chunk.
    Map fds are those of `ddos_match` and `ddos_progs`."""
    out = Assembler()
    finish = Label("finish")
    out.emit(asm.mov64(R6, R1))
    for rule in rules:
        matched, following = Label(f"rule{rule.id}"), Label(f"after{rule.id}")
        emit_filter(list(rule.cbpf), out, matched, following)
        out.place(matched)
        out.emit(asm.mov32(R9, rule.match_word), asm.ja(finish))
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


def _tail_call(out: Assembler, progs_fd: int, slot: int) -> None:
    out.emit(asm.mov64(R1, R6), asm.ld_map_fd(R2, progs_fd), asm.mov32(R3, slot),
             asm.call(Helper.tail_call))
