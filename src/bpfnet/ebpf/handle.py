"""File-descriptor ownership shared by maps, programs and links."""

from __future__ import annotations

import ctypes
import os

from . import _libbpf
from .errors import BpfError


class FdHandle:
    """Owns one BPF file descriptor: closes it once, on close() or when leaving a `with` block."""

    kind = "object"

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.kind} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def pin(self, path) -> None:
        """Pin in bpffs so the object outlives this process."""
        result = _libbpf.lib.bpf_obj_pin(self.fd, str(path).encode())
        if result < 0:
            raise BpfError(f"pinning {self.kind} at {path}", _libbpf.errno_error(result))

    @staticmethod
    def info(fd: int, kind: str) -> bytes:
        """The kernel's bpf_{prog,map,link}_info for `fd` (BPF_OBJ_GET_INFO_BY_FD)."""
        buffer = ctypes.create_string_buffer(256)
        size = _libbpf.u32(len(buffer))
        result = _libbpf.lib.bpf_obj_get_info_by_fd(fd, buffer, ctypes.byref(size))
        if result < 0:
            raise BpfError(f"reading {kind} info", _libbpf.errno_error(result))
        return buffer.raw

    @staticmethod
    def fd_from_pin(path, kind: str) -> int:
        fd = _libbpf.lib.bpf_obj_get(str(path).encode())
        if fd < 0:
            raise BpfError(f"opening pinned {kind} {path}", _libbpf.errno_error(fd))
        return fd
