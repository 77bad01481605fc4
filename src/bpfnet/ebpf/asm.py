"""eBPF instruction encoders and a small label-resolving assembler.

Used to emit programs from Python without a C compiler (the ddos rule compiler). Each encoder
returns an `Insn`; `Assembler` collects instructions and `Label`s and resolves jump offsets
when `assemble()` turns them into the kernel's 8-byte instruction format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
_SIZE_BYTES = {1: B, 2: H, 4: W, 8: DW}
# modes
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
# operand source
K, X = 0x00, 0x08
# ALU operations
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH, END = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)
TO_LE, TO_BE = 0x00, 0x08
# jump operations
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)

PSEUDO_MAP_FD = 1


class Reg(IntEnum):
    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = Reg


class Helper(IntEnum):
    map_lookup_elem = 1
    ktime_get_ns = 5
    tail_call = 12
    get_prandom_u32 = 7
    jiffies64 = 118


def _s32(v: int) -> int:
    """An immediate given as u32 or s32, as the signed field the encoding stores."""
    if not -(1 << 31) <= v < (1 << 32):
        raise ValueError(f"immediate {v} does not fit 32 bits")
    return v - (1 << 32) if v >= (1 << 31) else v


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        if not -(1 << 15) <= self.off < (1 << 15):
            raise ValueError(f"offset {self.off} does not fit 16 bits")
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, _s32(self.imm))


@dataclass(eq=False)
class Label:
    """A jump target; place it with `Assembler.place`."""

    name: str = ""


@dataclass(frozen=True)
class _Jump:
    code: int
    dst: int
    src: int
    imm: int
    target: Label


# --- encoders ----------------------------------------------------------------------------------

def alu32(op: int, dst: Reg, src: Reg | int) -> Insn:
    """32-bit ALU `dst op= src` (register or immediate); results are zero-extended to 64 bits."""
    if isinstance(src, Reg):
        return Insn(ALU | op | X, dst, src)
    return Insn(ALU | op | K, dst, imm=src)


def alu64(op: int, dst: Reg, src: Reg | int) -> Insn:
    if isinstance(src, Reg):
        return Insn(ALU64 | op | X, dst, src)
    return Insn(ALU64 | op | K, dst, imm=src)


def mov32(dst: Reg, src: Reg | int) -> Insn:
    return alu32(MOV, dst, src)


def mov64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(MOV, dst, src)


def neg32(dst: Reg) -> Insn:
    return Insn(ALU | NEG, dst)


def to_be(dst: Reg, bits: int) -> Insn:
    """Convert `dst` from big endian (network order) to host order, keeping the low `bits`."""
    return Insn(ALU | END | TO_BE, dst, imm=bits)


def ldx(size: int, dst: Reg, src: Reg, off: int = 0) -> Insn:
    """dst = *(u<size*8> *)(src + off), size in bytes."""
    return Insn(LDX | MEM | _SIZE_BYTES[size], dst, src, off)


def stx(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """*(u<size*8> *)(dst + off) = src."""
    return Insn(STX | MEM | _SIZE_BYTES[size], dst, src, off)


def st(size: int, dst: Reg, off: int, imm: int) -> Insn:
    """*(u<size*8> *)(dst + off) = imm."""
    return Insn(ST | MEM | _SIZE_BYTES[size], dst, 0, off, imm)


def ld_imm64(dst: Reg, value: int) -> list[Insn]:
    value &= (1 << 64) - 1
    return [Insn(LD | DW | IMM, dst, imm=_s32(value & 0xFFFFFFFF)), Insn(0, imm=_s32(value >> 32))]


def ld_map_fd(dst: Reg, fd: int) -> list[Insn]:
    """dst = &map (the loader replaces the fd with the map pointer)."""
    return [Insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, imm=fd), Insn(0)]


def call(helper: int) -> Insn:
    return Insn(JMP | CALL, imm=int(helper))


def exit_insn() -> Insn:
    return Insn(JMP | EXIT)


def jmp(op: int, dst: Reg, src: Reg | int, target: Label, width: int = 64) -> _Jump:
    """Conditional jump `if dst op src goto target` comparing 64 (JMP) or 32 bits (JMP32)."""
    cls = JMP if width == 64 else JMP32
    if isinstance(src, Reg):
        return _Jump(cls | op | X, dst, src, 0, target)
    return _Jump(cls | op | K, dst, 0, src, target)


def ja(target: Label) -> _Jump:
    return _Jump(JMP | JA, 0, 0, 0, target)


# --- assembler ---------------------------------------------------------------------------------

@dataclass
class Assembler:
    """Collects instructions, jumps and labels; `assemble()` resolves jumps to offsets.

    An unconditional jump to a label placed right after it is dropped, so code generators can
    always emit "goto next", and code that no path reaches is dropped, so they can emit both
    outcomes of a test that only ever has one (the verifier rejects unreachable instructions).
    """

    items: list[Insn | _Jump | Label] = field(default_factory=list)

    def emit(self, *insns: Insn | _Jump | list[Insn]) -> None:
        for insn in insns:
            if isinstance(insn, list):
                self.items.extend(insn)
            else:
                self.items.append(insn)

    def place(self, label: Label) -> None:
        self.items.append(label)

    def __len__(self) -> int:
        """Instructions emitted so far (upper bound of the assembled length)."""
        return sum(1 for i in self.items if not isinstance(i, Label))

    @staticmethod
    def _without_jumps_to_next(items: list[Insn | _Jump | Label]) -> list[Insn | _Jump | Label]:
        out: list[Insn | _Jump | Label] = []
        for pos, item in enumerate(items):
            if isinstance(item, _Jump) and item.code == JMP | JA:
                following = pos + 1
                while following < len(items) and isinstance(items[following], Label):
                    if items[following] is item.target:
                        break
                    following += 1
                else:
                    following = -1
                if following != -1:
                    continue
            out.append(item)
        return out

    @staticmethod
    def _without_unreachable(items: list[Insn | _Jump | Label]) -> list[Insn | _Jump | Label]:
        """Drop instructions no path reaches (the verifier rejects unreachable code)."""
        where = {id(item): pos for pos, item in enumerate(items) if isinstance(item, Label)}
        reached = [False] * len(items)
        todo = [0]
        while todo:
            pos = todo.pop()
            while pos < len(items) and not reached[pos]:
                reached[pos] = True
                item = items[pos]
                if isinstance(item, _Jump):
                    if id(item.target) not in where:
                        raise ValueError(f"jump to label {item.target.name!r} that was never placed")
                    todo.append(where[id(item.target)])
                    if item.code == JMP | JA:
                        break
                elif isinstance(item, Insn):
                    if item.code == JMP | EXIT:
                        break
                    if item.code == LD | DW | IMM:  # the second half of a 16-byte load
                        pos += 1
                        reached[pos] = True
                pos += 1
        return [item for pos, item in enumerate(items) if reached[pos] or isinstance(item, Label)]

    def assemble(self) -> bytes:
        items = self.items
        while True:  # each pass can expose more jumps to the next instruction or dead code
            shorter = self._without_unreachable(self._without_jumps_to_next(items))
            if len(shorter) == len(items):
                break
            items = shorter
        where: dict[int, int] = {}
        pc = 0
        for item in items:
            if isinstance(item, Label):
                where[id(item)] = pc
            else:
                pc += 1
        code = bytearray()
        pc = 0
        for item in items:
            if isinstance(item, Label):
                continue
            if isinstance(item, _Jump):
                item = Insn(item.code, item.dst, item.src, where[id(item.target)] - pc - 1, item.imm)
            code += item.encode()
            pc += 1
        return bytes(code)
