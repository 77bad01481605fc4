"""BPF programs: test runs (BPF_PROG_TEST_RUN), raw loading from instructions, attaching."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from . import _libbpf
from . import link as _link
from ._libbpf import AttachType, ProgType
from .errors import BpfError, VerifierError
from .handle import FdHandle

_PROG_INFO_TYPE_NAME = (0, 64)  # offsets of `type` and `name` in struct bpf_prog_info
XDP_MD = struct.Struct("<IIIIII")  # struct xdp_md: data, data_end, data_meta, ifindex, rxq, egress


@dataclass(frozen=True)
class TestRun:
    """What BPF_PROG_TEST_RUN returned: the verdict, the packet and context as the program left
    them, and the kernel's average time per repetition."""

    retval: int
    data: bytes
    ctx: bytes | None
    duration_ns: int


class Program(FdHandle):
    kind = "program"

    def __init__(self, fd: int, name: str, type: int, owned: bool = True) -> None:
        super().__init__(fd if owned else os.dup(fd))
        self.name = name
        self.type = ProgType(type) if type in ProgType._value2member_map_ else type

    def __repr__(self) -> str:
        return f"Program({self.name!r}, {getattr(self.type, 'name', self.type)})"

    @classmethod
    def from_fd(cls, fd: int) -> Program:
        info = cls.info(fd, "program")
        return cls(fd, info[64:80].rstrip(b"\0").decode(), struct.unpack_from("<I", info, 0)[0])

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        fd = _libbpf.lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            raise BpfError(f"opening program id {prog_id}", _libbpf.errno_error(fd))
        return cls.from_fd(fd)

    @classmethod
    def from_pin(cls, path) -> Program:
        return cls.from_fd(cls.fd_from_pin(path, "program"))

    @property
    def id(self) -> int:
        return struct.unpack_from("<I", self.info(self.fd, "program"), 4)[0]

    # --- loading from instructions ----------------------------------------------------------
    @classmethod
    def load_raw(cls, type: ProgType, insns: bytes, name: str = "raw", license: str = "GPL",
                 expected_attach_type: AttachType | None = None) -> Program:
        """Load a program from raw eBPF instructions (8 bytes each), maps referenced by fd.

        XDP programs default to the XDP attach type, like libbpf's SEC("xdp"), so they can share
        prog arrays with programs loaded from objects.
        """
        if len(insns) % 8:
            raise ValueError(f"instructions are {len(insns)} bytes, not a multiple of 8")
        if expected_attach_type is None and type == ProgType.XDP:
            expected_attach_type = AttachType.XDP
        buffer = ctypes.create_string_buffer(insns, len(insns))

        def attempt(log_level: int, log: ctypes.Array | None) -> int:
            options = _libbpf.opts(_libbpf.ProgLoadOpts,
                                   expected_attach_type=int(expected_attach_type or 0),
                                   log_level=log_level, log_size=len(log) if log else 0,
                                   log_buf=ctypes.cast(log, ctypes.c_void_p) if log else None)
            return _libbpf.lib.bpf_prog_load(int(type), name[:15].encode(), license.encode(), buffer,
                                             len(insns) // 8, ctypes.byref(options))

        fd = attempt(0, None)
        if fd < 0:
            err = _libbpf.errno_error(fd)
            log = ctypes.create_string_buffer(4 << 20)
            retry = attempt(1, log)
            if retry >= 0:  # loaded the second time (e.g. a transient EAGAIN)
                fd = retry
            else:
                raise VerifierError(name, err, log.value.decode(errors="replace"))
        return cls(fd, name, type)

    # --- test runs ------------------------------------------------------------------------
    def test_run(self, data: bytes, ctx: bytes | None = None, repeat: int = 1,
                 data_out_size: int | None = None) -> TestRun:
        """Run the program once (or `repeat` times on the same buffer) on `data` in the kernel."""
        data = bytes(data)
        out = ctypes.create_string_buffer(data_out_size or len(data) + 4096)
        ctx_out = ctypes.create_string_buffer(len(ctx)) if ctx else None
        options = _libbpf.opts(
            _libbpf.TestRunOpts, data_in=ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p),
            data_size_in=len(data), data_out=ctypes.cast(out, ctypes.c_void_p), data_size_out=len(out),
            ctx_in=ctypes.cast(ctypes.c_char_p(ctx), ctypes.c_void_p) if ctx else None,
            ctx_size_in=len(ctx) if ctx else 0,
            ctx_out=ctypes.cast(ctx_out, ctypes.c_void_p) if ctx_out else None,
            ctx_size_out=len(ctx) if ctx else 0, repeat=repeat)
        result = _libbpf.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(options))
        if result < 0:
            raise BpfError(f"test run of {self.name}", _libbpf.errno_error(result))
        return TestRun(options.retval, out.raw[:options.data_size_out],
                       ctx_out.raw[:options.ctx_size_out] if ctx_out else None, options.duration)

    def run_live_frames(self, data: bytes, repeat: int, ifindex: int, batch_size: int = 64) -> int:
        """Inject `repeat` copies of the frame as if received on `ifindex` (XDP live frames): the
        program's XDP_TX/XDP_REDIRECT verdicts really send them. Returns the kernel's ns/frame."""
        data = bytes(data)
        ctx = XDP_MD.pack(0, len(data), 0, ifindex, 0, 0)
        options = _libbpf.opts(
            _libbpf.TestRunOpts, data_in=ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p),
            data_size_in=len(data), ctx_in=ctypes.cast(ctypes.c_char_p(ctx), ctypes.c_void_p),
            ctx_size_in=len(ctx), repeat=repeat, flags=_libbpf.BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size=batch_size)
        result = _libbpf.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(options))
        if result < 0:
            raise BpfError(f"live-frames run of {self.name}", _libbpf.errno_error(result))
        return options.duration

    # --- attaching ------------------------------------------------------------------------
    def attach_xdp(self, ifindex: int, mode: str = "native") -> _link.Link:
        """Attach at XDP on `ifindex`; mode "native" (driver) or "generic" (skb)."""
        flags = {"native": _libbpf.XDP_FLAGS_DRV_MODE, "generic": _libbpf.XDP_FLAGS_SKB_MODE}
        if mode not in flags:
            raise ValueError(f"XDP mode {mode!r}: use 'native' or 'generic'")
        return _link.create(self.fd, ifindex, AttachType.XDP, flags[mode],
                            f"{self.name} at XDP ({mode}) on ifindex {ifindex}")

    def attach_tcx(self, ifindex: int, direction: str) -> _link.Link:
        """Attach as a tcx (tc express) program at `direction` ("ingress" or "egress")."""
        types = {"ingress": AttachType.TCX_INGRESS, "egress": AttachType.TCX_EGRESS}
        if direction not in types:
            raise ValueError(f"tc direction {direction!r}: use 'ingress' or 'egress'")
        return _link.create(self.fd, ifindex, types[direction], 0,
                            f"{self.name} at tc {direction} on ifindex {ifindex}")

    def attach_cgroup(self, cgroup_path, attach_type: AttachType) -> _link.Link:
        """Attach to a cgroup v2 directory (mounting cgroup2 at /sys/fs/cgroup if absent)."""
        path = Path(cgroup_path)
        if not path.exists():
            raise FileNotFoundError(f"cgroup {path} does not exist")
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return _link.create(self.fd, dir_fd, attach_type, 0,
                                f"{self.name} at {AttachType(attach_type).name} on cgroup {path}")
        finally:
            os.close(dir_fd)


def cgroup2_root() -> Path:
    """The cgroup v2 mount point, mounted at /sys/fs/cgroup when no cgroup2 is mounted."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    root = Path("/sys/fs/cgroup")
    root.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"cgroup2", str(root).encode(), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting cgroup2 at {root}: {os.strerror(err)}")
    return root
