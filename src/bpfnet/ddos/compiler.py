"""Classic BPF -> eBPF, in Python, in the spirit of Cloudflare's cbpfc.

`emit_filter` translates one classic BPF program (as libpcap produces it) into eBPF
instructions appended to an `Assembler`; the code falls through or jumps to the caller's
`match` / `nomatch` labels. Semantics are those of libpcap's interpreter (the kernel's cBPF is
the same): a packet load out of bounds, or a division/modulo by X == 0, ends the filter with
"no match"; `RET k` matches when k != 0; shifts by 32 or more give 0.

Layout of the emitted code (cBPF jumps only go forward, so basic blocks form a DAG and are
emitted in program order; the verifier never sees a back edge):

- the caller keeps the XDP context in r6; each filter reloads `data` (r7) and `data_end` (r8)
  from it, so nothing is live between filters and the verifier prunes at every filter boundary;
- A and X live in r4 and r5 as 32-bit values (every ALU op is 32-bit, so the upper half is
  always zero); r2 and r3 are scratch;
- scratch memory M[0..15] lives on the stack at r10 + stack_base + 4 * i;
- absolute loads check `data + k + size <= data_end` unless every path to the load already
  checked at least that much (tracked per basic block, minimum over predecessors); loads with
  k + size > 0xffff cannot be proved to the verifier and never match an XDP frame anyway;
- indirect loads [X + k] bound X + k to 0xffff - size, form the pointer, then check its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bpfnet.ddos.pcap import CbpfInsn
from bpfnet.ebpf import asm
from bpfnet.ebpf.asm import R2, R3, R4, R5, R6, R7, R8, R10, Assembler, Label
from bpfnet.errors import BpfnetError

# classic BPF encoding (linux/filter.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MEMWORDS = 16
MAX_PACKET_OFF = 0xFFFF  # the verifier cannot prove packet ranges beyond this

_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
_ALU_OPS = {0x00: asm.ADD, 0x10: asm.SUB, 0x20: asm.MUL, 0x30: asm.DIV, 0x40: asm.OR,
            0x50: asm.AND, 0x60: asm.LSH, 0x70: asm.RSH, 0x80: asm.NEG, 0x90: asm.MOD,
            0xA0: asm.XOR}
_JMP_OPS = {BPF_JEQ: asm.JEQ, BPF_JGT: asm.JGT, BPF_JGE: asm.JGE, BPF_JSET: asm.JSET}
_INVERTED = {asm.JEQ: asm.JNE, asm.JGT: asm.JLE, asm.JGE: asm.JLT}

XDP_MD_DATA, XDP_MD_DATA_END = 0, 4
CTX, DATA, DATA_END, A, X = R6, R7, R8, R4, R5
DEFAULT_STACK_BASE = -4 * BPF_MEMWORDS


class CbpfError(BpfnetError, ValueError):
    """The classic BPF program is malformed (bad opcode, jump out of range, no return)."""


def _cls(code: int) -> int:
    return code & 0x07


@dataclass
class Block:
    """A basic block: instructions [start, end) of the cBPF program, its exit and successors."""

    start: int
    end: int
    succs: list[int] = field(default_factory=list)   # successor block starts
    always_fails: bool = False                        # contains a load/division that can never succeed
    checked_in: int | None = None                     # bytes of packet proven present on entry
    checked_out: int = 0


def _validate(prog: list[CbpfInsn]) -> None:
    if not prog:
        raise CbpfError("empty program")
    for pc, ins in enumerate(prog):
        cls = _cls(ins.code)
        if cls == BPF_JMP:
            op = ins.code & 0xF0
            if op == BPF_JA:
                targets = [pc + 1 + ins.k]
            elif op in _JMP_OPS:
                targets = [pc + 1 + ins.jt, pc + 1 + ins.jf]
            else:
                raise CbpfError(f"insn {pc}: unknown jump opcode {ins.code:#x}")
            if max(targets) >= len(prog):
                raise CbpfError(f"insn {pc}: jump past the end of the program")
        elif cls in (BPF_LD, BPF_LDX):
            mode = ins.code & 0xE0
            if cls == BPF_LD and mode not in (BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN):
                raise CbpfError(f"insn {pc}: unknown load mode {ins.code:#x}")
            if cls == BPF_LDX and mode not in (BPF_IMM, BPF_MEM, BPF_LEN, BPF_MSH):
                raise CbpfError(f"insn {pc}: unknown ldx mode {ins.code:#x}")
            if (ins.code & 0x18) not in _SIZES:
                raise CbpfError(f"insn {pc}: unknown load size {ins.code:#x}")
            if mode == BPF_MEM and ins.k >= BPF_MEMWORDS:
                raise CbpfError(f"insn {pc}: scratch slot {ins.k} out of range")
        elif cls in (BPF_ST, BPF_STX):
            if ins.k >= BPF_MEMWORDS:
                raise CbpfError(f"insn {pc}: scratch slot {ins.k} out of range")
        elif cls == BPF_ALU:
            if ins.code & 0xF0 not in _ALU_OPS:
                raise CbpfError(f"insn {pc}: unknown ALU opcode {ins.code:#x}")
        elif cls == BPF_MISC:
            if ins.code & 0xF8 not in (BPF_TAX, BPF_TXA):
                raise CbpfError(f"insn {pc}: unknown misc opcode {ins.code:#x}")
        elif cls == BPF_RET:
            if ins.code & 0x18 not in (BPF_K, BPF_X, BPF_A):
                raise CbpfError(f"insn {pc}: unknown return source {ins.code:#x}")
    last = prog[-1]
    if _cls(last.code) not in (BPF_RET, BPF_JMP):
        raise CbpfError("program does not end with a return")


def _abs_load_end(ins: CbpfInsn) -> int | None:
    """Bytes an absolute load needs (k + size); None if it is not an absolute packet load."""
    cls, mode = _cls(ins.code), ins.code & 0xE0
    if cls == BPF_LD and mode == BPF_ABS:
        return ins.k + _SIZES[ins.code & 0x18]
    if cls == BPF_LDX and mode == BPF_MSH:
        return ins.k + 1
    return None


def _never_succeeds(ins: CbpfInsn) -> bool:
    """Instructions that end every execution with "no match"."""
    end = _abs_load_end(ins)
    if end is not None:
        return end > MAX_PACKET_OFF
    cls, mode = _cls(ins.code), ins.code & 0xE0
    if cls == BPF_LD and mode == BPF_IND:
        return ins.k + _SIZES[ins.code & 0x18] > MAX_PACKET_OFF
    if cls == BPF_ALU and ins.code & 0xF8 in (0x30, 0x90):  # DIV K, MOD K
        return ins.k == 0
    return False


def split_blocks(prog: list[CbpfInsn]) -> dict[int, Block]:
    """Basic blocks of reachable code, keyed by first instruction, with packet checks known.

    A block ends at a jump, a return, or before a jump target. An instruction that can never
    succeed (see `_never_succeeds`) ends its block with no successors, which makes the code
    after it unreachable unless something else jumps there.
    """
    _validate(prog)
    leaders = {0}
    for pc, ins in enumerate(prog):
        if _cls(ins.code) == BPF_JMP:
            if ins.code & 0xF0 == BPF_JA:
                leaders.add(pc + 1 + ins.k)
            else:
                leaders.update((pc + 1 + ins.jt, pc + 1 + ins.jf))
            leaders.add(pc + 1)
        elif _cls(ins.code) == BPF_RET:
            leaders.add(pc + 1)
    starts = sorted(s for s in leaders if s < len(prog))
    blocks: dict[int, Block] = {}
    for start, nxt in zip(starts, starts[1:] + [len(prog)], strict=False):
        block = Block(start, nxt)
        for pc in range(start, nxt):
            ins = prog[pc]
            if _never_succeeds(ins):
                block.end, block.always_fails = pc + 1, True
                break
        else:
            last = prog[nxt - 1]
            if _cls(last.code) == BPF_JMP:
                if last.code & 0xF0 == BPF_JA:
                    block.succs = [nxt + last.k]
                else:
                    block.succs = [nxt + last.jt, nxt + last.jf]
            elif _cls(last.code) != BPF_RET:
                block.succs = [nxt]
        blocks[start] = block

    reachable: dict[int, Block] = {}
    blocks[0].checked_in = 0
    for start in starts:  # program order is a topological order (jumps go forward)
        block = blocks[start]
        if block.checked_in is None:
            continue
        reachable[start] = block
        checked = block.checked_in
        for pc in range(block.start, block.end):
            end = _abs_load_end(prog[pc])
            if end is not None and end <= MAX_PACKET_OFF:
                checked = max(checked, end)
        block.checked_out = checked
        for succ in block.succs:
            target = blocks[succ]
            target.checked_in = checked if target.checked_in is None else min(target.checked_in, checked)
    return reachable


@dataclass
class _Emitter:
    out: Assembler
    match: Label
    nomatch: Label
    stack_base: int
    checked: int = 0  # packet bytes proven present on the current path

    def slot(self, k: int) -> int:
        return self.stack_base + 4 * k

    def load_abs(self, dst: asm.Reg, k: int, size: int) -> None:
        end = k + size
        if end > self.checked:
            self.out.emit(asm.mov64(R3, DATA), asm.alu64(asm.ADD, R3, end),
                          asm.jmp(asm.JGT, R3, DATA_END, self.nomatch))
            self.checked = end
        if k <= 0x7FFF:
            self.out.emit(asm.ldx(size, dst, DATA, k))
        else:  # beyond the 16-bit instruction offset: form the pointer first
            self.out.emit(asm.mov64(R2, DATA), asm.alu64(asm.ADD, R2, k), asm.ldx(size, dst, R2, 0))
        self._to_host(dst, size)

    def load_ind(self, k: int, size: int) -> None:
        self.out.emit(
            asm.mov64(R2, X), asm.alu64(asm.ADD, R2, k),
            asm.jmp(asm.JGT, R2, MAX_PACKET_OFF - size, self.nomatch),
            asm.mov64(R3, DATA), asm.alu64(asm.ADD, R3, R2),
            asm.mov64(R2, R3), asm.alu64(asm.ADD, R2, size),
            asm.jmp(asm.JGT, R2, DATA_END, self.nomatch),
            asm.ldx(size, A, R3, 0))
        self._to_host(A, size)

    def _to_host(self, dst: asm.Reg, size: int) -> None:
        if size > 1:
            self.out.emit(asm.to_be(dst, size * 8))

    def packet_len(self, dst: asm.Reg) -> None:
        self.out.emit(asm.mov64(dst, DATA_END), asm.alu64(asm.SUB, dst, DATA), asm.mov32(dst, dst))

    def alu(self, ins: CbpfInsn) -> None:
        op = _ALU_OPS[ins.code & 0xF0]
        if op == asm.NEG:
            self.out.emit(asm.neg32(A))
            return
        if ins.code & BPF_X:
            if op in (asm.DIV, asm.MOD):
                self.out.emit(asm.jmp(asm.JEQ, X, 0, self.nomatch, width=32))
            if op in (asm.LSH, asm.RSH):  # libpcap defines shifts by >= 32 as 0
                ok, done = Label("shift"), Label("shifted")
                self.out.emit(asm.jmp(asm.JLT, X, 32, ok, width=32), asm.mov32(A, 0), asm.ja(done))
                self.out.place(ok)
                self.out.emit(asm.alu32(op, A, X))
                self.out.place(done)
                return
            self.out.emit(asm.alu32(op, A, X))
        elif op in (asm.LSH, asm.RSH) and ins.k >= 32:
            self.out.emit(asm.mov32(A, 0))
        else:
            self.out.emit(asm.alu32(op, A, ins.k))

    def insn(self, ins: CbpfInsn) -> None:
        """Translate one non-jump, non-return instruction."""
        cls, mode, size = _cls(ins.code), ins.code & 0xE0, _SIZES.get(ins.code & 0x18, 4)
        emit = self.out.emit
        if cls == BPF_LD:
            if mode == BPF_IMM:
                emit(asm.mov32(A, ins.k))
            elif mode == BPF_ABS:
                self.load_abs(A, ins.k, size)
            elif mode == BPF_IND:
                self.load_ind(ins.k, size)
            elif mode == BPF_MEM:
                emit(asm.ldx(4, A, R10, self.slot(ins.k)))
            else:
                self.packet_len(A)
        elif cls == BPF_LDX:
            if mode == BPF_IMM:
                emit(asm.mov32(X, ins.k))
            elif mode == BPF_MEM:
                emit(asm.ldx(4, X, R10, self.slot(ins.k)))
            elif mode == BPF_LEN:
                self.packet_len(X)
            else:  # MSH: X = 4 * (P[k] & 0xf), the IPv4 header length idiom
                self.load_abs(X, ins.k, 1)
                emit(asm.alu32(asm.AND, X, 0xF), asm.alu32(asm.LSH, X, 2))
        elif cls == BPF_ST:
            emit(asm.stx(4, R10, self.slot(ins.k), A))
        elif cls == BPF_STX:
            emit(asm.stx(4, R10, self.slot(ins.k), X))
        elif cls == BPF_ALU:
            self.alu(ins)
        elif cls == BPF_MISC:
            emit(asm.mov32(X, A) if ins.code & 0xF8 == BPF_TAX else asm.mov32(A, X))

    def ret(self, ins: CbpfInsn) -> None:
        src = ins.code & 0x18
        if src == BPF_K:
            self.out.emit(asm.ja(self.match if ins.k else self.nomatch))
        else:
            reg = A if src == BPF_A else X
            self.out.emit(asm.jmp(asm.JEQ, reg, 0, self.nomatch, width=32), asm.ja(self.match))

    def branch(self, ins: CbpfInsn, on_true: Label, on_false: Label, next_label: Label | None) -> None:
        op = _JMP_OPS[ins.code & 0xF0]
        src = X if ins.code & BPF_X else ins.k
        if on_true is on_false:
            self.out.emit(asm.ja(on_true))
        elif on_false is next_label:
            self.out.emit(asm.jmp(op, A, src, on_true, width=32))
        elif on_true is next_label and op in _INVERTED:
            self.out.emit(asm.jmp(_INVERTED[op], A, src, on_false, width=32))
        elif on_true is next_label:  # "jump unless A & src": test the masked value against 0
            self.out.emit(asm.mov32(R2, A), asm.alu32(asm.AND, R2, src),
                          asm.jmp(asm.JEQ, R2, 0, on_false, width=32))
        else:
            self.out.emit(asm.jmp(op, A, src, on_true, width=32), asm.ja(on_false))


def _scratch_slots_read(prog: list[CbpfInsn]) -> set[int]:
    return {ins.k for ins in prog
            if _cls(ins.code) in (BPF_LD, BPF_LDX) and ins.code & 0xE0 == BPF_MEM}


CompareHook = Callable[[Assembler, Label], None]


def emit_filter(prog: list[CbpfInsn], out: Assembler, match: Label, nomatch: Label,
                stack_base: int = DEFAULT_STACK_BASE, compares: dict[int, CompareHook] | None = None) -> None:
    """Append the eBPF translation of `prog`; it ends by jumping to `match` or `nomatch`.

    Expects the XDP context in r6; clobbers r2-r5, r7, r8 and the 64 bytes of stack at
    `stack_base`. `compares` replaces the conditional jump at some cBPF positions: the hook
    emits the code that decides there (A is in r4), given the `nomatch` label (a value run's
    table lookup, ruleset.py). Raises CbpfError for malformed programs.
    """
    blocks = split_blocks(prog)
    labels = {start: Label(f"pc{start}") for start in blocks}
    e = _Emitter(out, match, nomatch, stack_base)
    out.emit(asm.ldx(4, DATA, CTX, XDP_MD_DATA), asm.ldx(4, DATA_END, CTX, XDP_MD_DATA_END),
             asm.mov32(A, 0), asm.mov32(X, 0))
    for k in sorted(_scratch_slots_read(prog)):  # the verifier wants initialised stack
        out.emit(asm.st(4, R10, e.slot(k), 0))
    order = sorted(blocks)
    for index, start in enumerate(order):
        block = blocks[start]
        next_label = labels[order[index + 1]] if index + 1 < len(order) else None
        out.place(labels[start])
        e.checked = block.checked_in or 0
        for pc in range(block.start, block.end - 1):
            e.insn(prog[pc])
        last = prog[block.end - 1]
        if block.always_fails:
            out.emit(asm.ja(nomatch))
        elif _cls(last.code) == BPF_RET:
            e.ret(last)
        elif _cls(last.code) == BPF_JMP:
            if last.code & 0xF0 == BPF_JA:
                out.emit(asm.ja(labels[block.succs[0]]))
            elif compares is not None and block.end - 1 in compares:
                compares[block.end - 1](out, nomatch)
            else:
                e.branch(last, labels[block.succs[0]], labels[block.succs[1]], next_label)
        else:
            e.insn(last)
            out.emit(asm.ja(labels[block.succs[0]]))


def compile_standalone(prog: list[CbpfInsn], match_ret: int = 1, nomatch_ret: int = 2) -> bytes:
    """A complete XDP program: returns `match_ret` (XDP_DROP) on match, else `nomatch_ret`."""
    out = Assembler()
    matched, missed = Label("match"), Label("nomatch")
    out.emit(asm.mov64(R6, asm.R1))
    emit_filter(prog, out, matched, missed)
    out.place(matched)
    out.emit(asm.mov64(asm.R0, match_ret), asm.exit_insn())
    out.place(missed)
    out.emit(asm.mov64(asm.R0, nomatch_ret), asm.exit_insn())
    return out.assemble()


def compile_multi(progs: list[list[CbpfInsn]], match_bits: list[int], base: int = 0) -> bytes:
    """An XDP program returning `base | (OR of match_bits[i] for every filter i that matches)`.

    Used by the equivalence tests to check up to 32 filters per BPF_PROG_TEST_RUN call.
    """
    out = Assembler()
    out.emit(asm.mov64(R6, asm.R1), asm.mov32(asm.R9, base))
    for prog, bit in zip(progs, match_bits, strict=False):
        matched, done = Label("match"), Label("next")
        emit_filter(prog, out, matched, done)
        out.place(matched)
        out.emit(asm.alu32(asm.OR, asm.R9, bit))
        out.place(done)
    out.emit(asm.mov64(asm.R0, asm.R9), asm.exit_insn())
    return out.assemble()
