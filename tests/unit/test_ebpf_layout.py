"""check_layout: a ctypes mirror against a struct layout as BTF describes it (no kernel needed)."""

import ctypes

import pytest

from bpfnet.ebpf import LayoutError
from bpfnet.ebpf.btf import Field, Layout, check_layout

U32 = Layout("unsigned int", 4, None)
BUCKET = Layout("struct bucket", 16, (Field("tokens", 0, 8, None), Field("last_ns", 8, 8, None)))
RULE = Layout("struct rule", 24, (Field("id", 0, 4, None), Field("pad", 4, 4, None), Field("bucket", 8, 16, BUCKET)))


class Bucket(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


class Rule(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bucket", Bucket)]


def test_a_faithful_mirror_passes():
    check_layout("map m value", Rule, RULE)
    check_layout("map m key", ctypes.c_uint32, U32)


def test_scalars_and_arrays_compare_by_size():
    check_layout("map m key", ctypes.c_uint8 * 4, U32)
    with pytest.raises(LayoutError, match=r"map m key: unsigned int is 4 bytes, Python's c_ushort is 2"):
        check_layout("map m key", ctypes.c_uint16, U32)


def test_swapped_fields_of_one_size_are_named():
    class Swapped(ctypes.Structure):
        _fields_ = [("last_ns", ctypes.c_uint64), ("tokens", ctypes.c_uint64)]

    with pytest.raises(LayoutError, match=r"map m value: struct bucket field 0 is tokens \(offset 0, 8 bytes\), "
                                          r"Python's Swapped has last_ns \(offset 0, 8 bytes\)"):
        check_layout("map m value", Swapped, BUCKET)


def test_nested_structs_are_checked():
    class SwappedBucket(ctypes.Structure):
        _fields_ = [("last_ns", ctypes.c_uint64), ("tokens", ctypes.c_uint64)]

    class Nested(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bucket", SwappedBucket)]

    with pytest.raises(LayoutError, match=r"map m value, field bucket: struct bucket field 0 is tokens"):
        check_layout("map m value", Nested, RULE)


def test_flattened_or_missing_fields_are_refused():
    class Flat(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("tokens", ctypes.c_uint64),
                    ("last_ns", ctypes.c_uint64)]

    with pytest.raises(LayoutError, match=r"field 2 is bucket \(offset 8, 16 bytes\), Python's Flat has tokens"):
        check_layout("map m value", Flat, RULE)

    class Short(ctypes.Structure):
        _fields_ = [("tokens", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 8)]

    with pytest.raises(LayoutError, match=r"field 1 is last_ns .* Python's Short has rest"):
        check_layout("map m value", Short, BUCKET)
