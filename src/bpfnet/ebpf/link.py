"""BPF links: an attachment that lasts while its fd (or a pin) lives, replaceable atomically."""

from __future__ import annotations

import ctypes
import struct

from . import _libbpf
from .errors import BpfError
from .handle import FdHandle


class Link(FdHandle):
    """An attached program. Closing the link detaches it unless the link is pinned."""

    kind = "link"

    def __init__(self, fd: int, description: str = "") -> None:
        super().__init__(fd)
        self.description = description

    def __repr__(self) -> str:
        return f"Link({self.description or self._fd})"

    @classmethod
    def from_pin(cls, path) -> Link:
        return cls(cls.fd_from_pin(path, "link"), f"pinned {path}")

    def update(self, program) -> None:
        """Swap in `program` atomically: every packet runs either the old or the new one."""
        result = _libbpf.lib.bpf_link_update(self.fd, program.fd, None)
        if result < 0:
            raise BpfError(f"replacing the program of {self!r} with {program.name}",
                           _libbpf.errno_error(result))

    def detach(self) -> None:
        """Detach now, even if the link is pinned elsewhere."""
        result = _libbpf.lib.bpf_link_detach(self.fd)
        if result < 0:
            raise BpfError(f"detaching {self!r}", _libbpf.errno_error(result))

    @property
    def program_id(self) -> int:
        _type, _id, prog_id = struct.unpack_from("<III", self.info(self.fd, "link"))
        return prog_id


def create(program_fd: int, target_fd: int, attach_type: int, flags: int, description: str) -> Link:
    options = _libbpf.opts(_libbpf.LinkCreateOpts, flags=flags)
    fd = _libbpf.lib.bpf_link_create(program_fd, target_fd, attach_type, ctypes.byref(options))
    if fd < 0:
        raise BpfError(f"attaching {description}", _libbpf.errno_error(fd))
    return Link(fd, description)
