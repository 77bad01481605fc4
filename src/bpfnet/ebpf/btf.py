"""Struct layouts from an object's BTF, and their check against the ctypes mirrors in Python.

A map's key and value types are read from BTF when the object is loaded. A Python mirror of a C
struct must then have the same fields, in the same order, with the same names, offsets and sizes
(Cilium's alignchecker does the same for its Go mirrors): swapping two fields of the same size in
C is refused at load instead of corrupting every entry.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from ._libbpf import lib
from .errors import LayoutError

for _name, _res, _args in [
    ("bpf_map__btf_key_type_id", ctypes.c_uint32, (ctypes.c_void_p,)),
    ("bpf_map__btf_value_type_id", ctypes.c_uint32, (ctypes.c_void_p,)),
    ("btf__type_by_id", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_uint32)),
    ("btf__name_by_offset", ctypes.c_char_p, (ctypes.c_void_p, ctypes.c_uint32)),
    ("btf__resolve_type", ctypes.c_int, (ctypes.c_void_p, ctypes.c_uint32)),
    ("btf__resolve_size", ctypes.c_int64, (ctypes.c_void_p, ctypes.c_uint32)),
]:
    getattr(lib, _name).restype = _res
    getattr(lib, _name).argtypes = list(_args)

BTF_KIND_STRUCT, BTF_KIND_UNION = 4, 5
_TYPE = struct.Struct("<III")    # struct btf_type: name_off, info, size (or type)
_MEMBER = struct.Struct("<III")  # struct btf_member: name_off, type, offset (bits)


@dataclass(frozen=True)
class Field:
    name: str
    offset: int                 # bytes
    size: int                   # bytes
    layout: Layout | None       # the field's own struct layout, when it is a struct


@dataclass(frozen=True)
class Layout:
    """A type as BTF describes it: its name and size, and its fields when it is a struct or union."""

    name: str                   # "struct lb_vip_key", "__u32"
    size: int
    fields: tuple[Field, ...] | None


def type_layout(btf: int, type_id: int) -> Layout | None:
    """The layout of BTF type `type_id` (typedefs and qualifiers resolved); None for type id 0."""
    if not btf or not type_id:
        return None
    resolved = lib.btf__resolve_type(btf, type_id)
    if resolved < 0:
        return None
    name_off, info, size = _TYPE.unpack(ctypes.string_at(lib.btf__type_by_id(btf, resolved), _TYPE.size))
    kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
    name = (lib.btf__name_by_offset(btf, name_off) or b"").decode()
    if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
        return Layout(name, lib.btf__resolve_size(btf, type_id), None)
    base = lib.btf__type_by_id(btf, resolved) + _TYPE.size
    fields = []
    for i in range(vlen):
        member_name, member_type, offset = _MEMBER.unpack(ctypes.string_at(base + i * _MEMBER.size, _MEMBER.size))
        bit_offset = offset & 0xFFFFFF if kflag else offset
        fields.append(Field((lib.btf__name_by_offset(btf, member_name) or b"").decode(), bit_offset // 8,
                            lib.btf__resolve_size(btf, member_type), type_layout(btf, member_type)))
    keyword = "struct" if kind == BTF_KIND_STRUCT else "union"
    return Layout(f"{keyword} {name}" if name else f"anonymous {keyword}", size, tuple(fields))


def map_layouts(btf: int, bpf_map: int) -> tuple[Layout | None, Layout | None]:
    """The key and value layouts of a libbpf `struct bpf_map *` (None where BTF has none)."""
    return (type_layout(btf, lib.bpf_map__btf_key_type_id(bpf_map)),
            type_layout(btf, lib.bpf_map__btf_value_type_id(bpf_map)))


def _ctypes_fields(ctype: type) -> list[tuple[str, int, int, type]] | None:
    if not (isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))):
        return None
    return [(name, getattr(ctype, name).offset, ctypes.sizeof(ftype), ftype)
            for name, ftype, *_ in ctype._fields_]


def check_layout(what: str, ctype: type, layout: Layout) -> None:
    """Raise LayoutError unless ctypes type `ctype` mirrors `layout` (sizes; for structs also field
    names, offsets and sizes, nested structs included). `what` says where, e.g. "map lb.vip_map key"."""
    python = getattr(ctype, "__name__", str(ctype))
    if ctypes.sizeof(ctype) != layout.size:
        raise LayoutError(f"{what}: {layout.name} is {layout.size} bytes, Python's {python} is "
                          f"{ctypes.sizeof(ctype)}")
    fields = _ctypes_fields(ctype)
    if fields is None or layout.fields is None:
        return  # a scalar or an array on either side: the size is all there is to compare
    for index in range(max(len(fields), len(layout.fields))):
        if index >= len(layout.fields):
            raise LayoutError(f"{what}: {layout.name} has {len(layout.fields)} fields, Python's {python} "
                              f"has more: {fields[index][0]}")
        c_field = layout.fields[index]
        if index >= len(fields):
            raise LayoutError(f"{what}: {layout.name} field {c_field.name} is missing from Python's {python}")
        name, offset, size, ftype = fields[index]
        if (name, offset, size) != (c_field.name, c_field.offset, c_field.size):
            raise LayoutError(
                f"{what}: {layout.name} field {index} is {c_field.name} (offset {c_field.offset}, "
                f"{c_field.size} bytes), Python's {python} has {name} (offset {offset}, {size} bytes)")
        if c_field.layout is not None:
            check_layout(f"{what}, field {name}", ftype, c_field.layout)
