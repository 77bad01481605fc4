"""The generated rule-set programs: ordered rules -> chunks of eBPF, first match decides.

A rule set is a chain of XDP programs ("chunks") of at most `RULES_PER_CHUNK` rules each, held in
one bank of the `ddos_progs` prog array (layout in bpf/include/ddos_structs.h). Each chunk runs
its rules in order; on the first match it stores the rule's match word (id, action, per-source
flag) in the per-CPU `ddos_match` map and tail-calls the verdict program. When none of its rules
matches it tail-calls the next chunk of the same bank, and the last chunk reports "no match"
(word 0). The bank number is an immediate in each chunk, so a packet that entered one rule set
finishes in it even if the head slot is switched meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from bpfnet.ddos.compiler import emit_filter
from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.ebpf import asm
from bpfnet.ebpf.asm import R0, R1, R2, R3, R6, R9, R10, Assembler, Helper, Label

# mirror of ddos_structs.h
MAX_RULES = 4096
MAX_CHUNKS = 16
SLOT_HEAD, SLOT_VERDICT, SLOT_BANKS = 0, 1, 2
PROG_SLOTS = SLOT_BANKS + 2 * MAX_CHUNKS
WORD_PER_SOURCE = 1 << 24
RULES_PER_CHUNK = 256
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


def chunk_slot(bank: int, index: int) -> int:
    """The prog array slot of chunk `index` of `bank` (0 or 1)."""
    if bank not in (0, 1) or not 0 <= index < MAX_CHUNKS:
        raise ValueError(f"no slot for bank {bank} chunk {index}")
    return SLOT_BANKS + bank * MAX_CHUNKS + index


def split_chunks(rules: list[CompiledRule], per_chunk: int = RULES_PER_CHUNK) -> list[list[CompiledRule]]:
    """Consecutive groups of at most `per_chunk` rules (order kept); no rules, no chunks."""
    chunks = [rules[i:i + per_chunk] for i in range(0, len(rules), per_chunk)]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"{len(rules)} rules need {len(chunks)} programs of {per_chunk}; "
                         f"the data plane holds {MAX_CHUNKS}")
    return chunks


def chunk_program(rules: list[CompiledRule], bank: int, index: int, last: bool,
                  match_map_fd: int, progs_fd: int) -> bytes:
    """Instructions of one chunk. Map fds are those of `ddos_match` and `ddos_progs`."""
    out = Assembler()
    finish = Label("finish")
    out.emit(asm.mov64(R6, R1))
    for rule in rules:
        matched, following = Label(f"rule{rule.id}"), Label(f"after{rule.id}")
        emit_filter(list(rule.cbpf), out, matched, following)
        out.place(matched)
        out.emit(asm.mov32(R9, rule.match_word), asm.ja(finish))
        out.place(following)
    if not last:
        _tail_call(out, progs_fd, chunk_slot(bank, index + 1))
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
