"""Raw ctypes declarations of the system libbpf.so.1 (1.1.x) and the kernel constants bpfnet uses.

Only this module touches ctypes function pointers; the rest of bpfnet.ebpf wraps them in classes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import threading

lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

c_void_p, c_char_p, c_int, c_uint, c_size_t = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.c_uint, ctypes.c_size_t)
u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class MapType(enum.IntEnum):
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    QUEUE = 22
    STACK = 23
    DEVMAP_HASH = 25
    RINGBUF = 27


PERCPU_MAP_TYPES = {MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH}


class ProgType(enum.IntEnum):
    SOCKET_FILTER = 1
    SCHED_CLS = 3
    SCHED_ACT = 4
    XDP = 6
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    SOCK_OPS = 13
    CGROUP_SOCK_ADDR = 18


class AttachType(enum.IntEnum):
    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    XDP = 37
    TCX_INGRESS = 46
    TCX_EGRESS = 47


# Update flags for maps, XDP attach flags, test-run flags.
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_NO_PREALLOC = 1
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


class TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
                ("data_size_in", u32), ("data_size_out", u32), ("ctx_in", c_void_p),
                ("ctx_out", c_void_p), ("ctx_size_in", u32), ("ctx_size_out", u32),
                ("retval", u32), ("repeat", c_int), ("duration", u32), ("flags", u32),
                ("cpu", u32), ("batch_size", u32)]


class MapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", u64), ("flags", u64)]


class MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("btf_fd", u32), ("btf_key_type_id", u32),
                ("btf_value_type_id", u32), ("btf_vmlinux_value_type_id", u32),
                ("inner_map_fd", u32), ("map_flags", u32), ("map_extra", u64),
                ("numa_node", u32), ("map_ifindex", u32)]


class ProgLoadOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("attempts", c_int), ("expected_attach_type", c_uint),
                ("prog_btf_fd", u32), ("prog_flags", u32), ("prog_ifindex", u32),
                ("kern_version", u32), ("attach_btf_id", u32), ("attach_prog_fd", u32),
                ("attach_btf_obj_fd", u32), ("fd_array", c_void_p), ("func_info", c_void_p),
                ("func_info_cnt", u32), ("func_info_rec_size", u32), ("line_info", c_void_p),
                ("line_info_cnt", u32), ("line_info_rec_size", u32), ("log_level", u32),
                ("log_size", u32), ("log_buf", c_void_p)]


class LinkCreateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("flags", u32), ("iter_info", c_void_p), ("iter_info_len", u32),
                ("target_btf_id", u32), ("_union", ctypes.c_uint8 * 32)]


class LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("flags", u32), ("old_prog_fd", u32)]


def opts(struct_type: type[ctypes.Structure], **fields) -> ctypes.Structure:
    """An libbpf options struct with its `sz` set, as the LIBBPF_OPTS macro does."""
    value = struct_type(**fields)
    value.sz = ctypes.sizeof(struct_type)
    return value


def _declare(name: str, restype, *argtypes) -> None:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)


for _name, _res, _args in [
    ("bpf_object__open_mem", c_void_p, (c_void_p, c_size_t, c_void_p)),
    ("bpf_object__load", c_int, (c_void_p,)),
    ("bpf_object__close", None, (c_void_p,)),
    ("bpf_object__next_map", c_void_p, (c_void_p, c_void_p)),
    ("bpf_object__next_program", c_void_p, (c_void_p, c_void_p)),
    ("bpf_map__name", c_char_p, (c_void_p,)),
    ("bpf_map__fd", c_int, (c_void_p,)),
    ("bpf_map__type", c_int, (c_void_p,)),
    ("bpf_map__key_size", u32, (c_void_p,)),
    ("bpf_map__value_size", u32, (c_void_p,)),
    ("bpf_map__max_entries", u32, (c_void_p,)),
    ("bpf_map__set_max_entries", c_int, (c_void_p, u32)),
    ("bpf_map__reuse_fd", c_int, (c_void_p, c_int)),
    ("bpf_map__initial_value", c_void_p, (c_void_p, ctypes.POINTER(c_size_t))),
    ("bpf_map__set_initial_value", c_int, (c_void_p, c_void_p, c_size_t)),
    ("bpf_program__name", c_char_p, (c_void_p,)),
    ("bpf_program__fd", c_int, (c_void_p,)),
    ("bpf_program__type", c_int, (c_void_p,)),
    ("bpf_program__expected_attach_type", c_int, (c_void_p,)),
    ("bpf_program__set_autoload", c_int, (c_void_p, ctypes.c_bool)),
    ("bpf_map_create", c_int, (c_int, c_char_p, u32, u32, u32, c_void_p)),
    ("bpf_map_lookup_elem", c_int, (c_int, c_void_p, c_void_p)),
    ("bpf_map_lookup_and_delete_elem", c_int, (c_int, c_void_p, c_void_p)),
    ("bpf_map_update_elem", c_int, (c_int, c_void_p, c_void_p, u64)),
    ("bpf_map_delete_elem", c_int, (c_int, c_void_p)),
    ("bpf_map_get_next_key", c_int, (c_int, c_void_p, c_void_p)),
    ("bpf_map_lookup_batch", c_int, (c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     ctypes.POINTER(u32), c_void_p)),
    ("bpf_map_update_batch", c_int, (c_int, c_void_p, c_void_p, ctypes.POINTER(u32), c_void_p)),
    ("bpf_map_delete_batch", c_int, (c_int, c_void_p, ctypes.POINTER(u32), c_void_p)),
    ("bpf_prog_load", c_int, (c_int, c_char_p, c_char_p, c_void_p, c_size_t, c_void_p)),
    ("bpf_prog_test_run_opts", c_int, (c_int, c_void_p)),
    ("bpf_obj_pin", c_int, (c_int, c_char_p)),
    ("bpf_obj_get", c_int, (c_char_p,)),
    ("bpf_link_create", c_int, (c_int, c_int, c_int, c_void_p)),
    ("bpf_link_update", c_int, (c_int, c_int, c_void_p)),
    ("bpf_link_detach", c_int, (c_int,)),
    ("bpf_prog_get_fd_by_id", c_int, (u32,)),
    ("bpf_obj_get_info_by_fd", c_int, (c_int, c_void_p, ctypes.POINTER(u32))),
    ("libbpf_num_possible_cpus", c_int, ()),
    ("libbpf_strerror", c_int, (c_int, c_char_p, c_size_t)),
    ("libbpf_probe_bpf_helper", c_int, (c_int, c_int, c_void_p)),
    ("libbpf_probe_bpf_map_type", c_int, (c_int, c_void_p)),
    ("libbpf_probe_bpf_prog_type", c_int, (c_int, c_void_p)),
]:
    _declare(_name, _res, *_args)

libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
libc.vsnprintf.restype = c_int

POSSIBLE_CPUS = lib.libbpf_num_possible_cpus()


# libbpf reports everything, the verifier log included, through one print callback. Collect the
# messages per thread so a failed load can show the log of that load alone.
_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_log = threading.local()


@_PRINT_FN
def _collect(level, fmt, args):  # pragma: no cover - called from C
    buffer = ctypes.create_string_buffer(4096)
    libc.vsnprintf(buffer, len(buffer), fmt, args)
    lines = getattr(_log, "lines", None)
    if lines is not None:
        lines.append(buffer.value.decode(errors="replace"))
    return 0


lib.libbpf_set_print.restype = c_void_p
lib.libbpf_set_print.argtypes = [_PRINT_FN]
lib.libbpf_set_print(_collect)


class captured_log:
    """Context manager collecting libbpf's messages emitted by this thread."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        _log.lines = self.lines
        return self.lines

    def __exit__(self, *exc) -> None:
        _log.lines = None


def errno_error(result: int) -> int:
    """The positive errno of a libbpf call that returned `result` (negative errno or -1)."""
    if result < -1:
        return -result
    return ctypes.get_errno() or (-result if result < 0 else 0)


def strerror(err: int) -> str:
    return os.strerror(err)
