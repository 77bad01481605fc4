"""Where bpfnet pins its objects in bpffs: /sys/fs/bpf/bpfnet/<app>/<instance>/..."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "bpfnet"
BPF_FS_MAGIC = 0xCAFE4A11


def _is_bpffs(path: Path) -> bool:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    return libc.statfs(str(path).encode(), ctypes.byref(buf)) == 0 and buf.f_type == BPF_FS_MAGIC


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is not mounted (as systemd does on most distributions)."""
    BPFFS.mkdir(parents=True, exist_ok=True)
    if not _is_bpffs(BPFFS):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpffs", str(BPFFS).encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mounting bpffs at {BPFFS}: {os.strerror(err)}")


def pin_dir(*parts: str, root: Path = PIN_ROOT) -> Path:
    """The pin directory for `parts` under `root`, created (and bpffs mounted) if needed."""
    ensure_bpffs()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def unpin(path: Path) -> None:
    """Remove a pinned object or a whole pin directory; missing paths are fine."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_empty_parents(path: Path, stop: Path = BPFFS) -> None:
    """Remove `path`'s empty ancestors up to (not including) `stop`, so teardown leaves no husks."""
    path = Path(path)
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent
