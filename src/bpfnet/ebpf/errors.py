"""Errors raised by the eBPF runtime. Each names what failed and why."""

from __future__ import annotations

import os

from bpfnet.errors import BpfnetError


class BpfError(BpfnetError, OSError):
    """A BPF system call or libbpf call failed."""

    def __init__(self, what: str, err: int, detail: str = "") -> None:
        message = f"{what}: {os.strerror(err)} (errno {err})"
        if detail:
            message += f"\n{detail}"
        super().__init__(err, message)
        self.what = what

    def __str__(self) -> str:
        return self.args[1]


class VerifierError(BpfError):
    """The kernel refused to load a program; carries the tail of the verifier log."""

    def __init__(self, program: str, err: int, log: str) -> None:
        tail = "\n".join(log.strip().splitlines()[-25:])
        super().__init__(f"loading program {program!r}", err, f"verifier log (tail):\n{tail}" if tail else "")
        self.program = program
        self.log = log


class LayoutError(BpfnetError, ValueError):
    """A Python struct declaration or a pinned map does not match the map's layout."""
