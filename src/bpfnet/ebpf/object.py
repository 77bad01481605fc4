"""ObjectSpec (an ELF object, editable before load) and Object (its loaded maps and programs)."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import _libbpf
from ._libbpf import lib
from .btf import map_layouts
from .errors import BpfError, LayoutError, VerifierError
from .map import Map
from .program import Program

BTF_KIND_VAR, BTF_KIND_DATASEC = 14, 15
for _name, _res, _args in [
    ("bpf_object__btf", ctypes.c_void_p, (ctypes.c_void_p,)),
    ("btf__find_by_name_kind", ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint)),
    ("btf__type_by_id", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_uint32)),
    ("btf__name_by_offset", ctypes.c_char_p, (ctypes.c_void_p, ctypes.c_uint32)),
    ("bpf_map__is_internal", ctypes.c_bool, (ctypes.c_void_p,)),
]:
    getattr(lib, _name).restype = _res
    getattr(lib, _name).argtypes = list(_args)


@dataclass(frozen=True)
class Variable:
    offset: int
    size: int


@dataclass
class ObjectSpec:
    """A BPF ELF object before loading. Set `constants` (the `const volatile` globals in .rodata)
    and map sizes, then `load()`."""

    name: str
    elf: bytes
    constants: dict[str, int | bool | bytes] = field(default_factory=dict)
    max_entries: dict[str, int] = field(default_factory=dict)
    reused_maps: dict[str, Map] = field(default_factory=dict)

    @classmethod
    def builtin(cls, name: str) -> ObjectSpec:
        """One of bpfnet's own objects, compiled from src/bpfnet/bpf/<name>.bpf.c."""
        path = resources.files("bpfnet.bpf").joinpath("build", f"{name}.o")
        if not path.is_file():
            raise FileNotFoundError(
                f"BPF object {name}.o is not built: run `python hatch_build.py` (or scripts/setup.sh)")
        return cls(name, path.read_bytes())

    @classmethod
    def from_file(cls, path) -> ObjectSpec:
        path = Path(path)
        return cls(path.name.removesuffix(".o").removesuffix(".bpf"), path.read_bytes())

    def set_max_entries(self, map_name: str, entries: int) -> None:
        self.max_entries[map_name] = entries

    def reuse_map(self, map_name: str, existing: Map) -> None:
        """Use an existing map instead of creating `map_name` (to share maps between objects)."""
        self.reused_maps[map_name] = existing

    def load(self, pin_dir: Path | None = None) -> Object:
        """Load into the kernel. With `pin_dir`, maps already pinned there (same shape) are
        reused and the others are pinned there after loading."""
        buffer = ctypes.create_string_buffer(self.elf, len(self.elf))
        obj = lib.bpf_object__open_mem(buffer, len(self.elf), None)
        if not obj:
            raise BpfError(f"opening BPF object {self.name}", ctypes.get_errno() or 22)
        try:
            maps = _iterate(lib.bpf_object__next_map, obj)
            names = {lib.bpf_map__name(m).decode(): m for m in maps}
            self._check_names(names)
            for name, entries in self.max_entries.items():
                lib.bpf_map__set_max_entries(names[name], entries)
            self._write_constants(obj, names)
            # explicitly shared maps win over pins: a pin may be older than the map it stands for
            reused = _pinned_maps(Path(pin_dir), names) if pin_dir is not None else {}
            reused.update(self.reused_maps)
            for name, existing in reused.items():
                _check_shape(names[name], existing)
                result = lib.bpf_map__reuse_fd(names[name], existing.fd)
                if result < 0:
                    raise BpfError(f"reusing map {name}", _libbpf.errno_error(result))
            with _libbpf.captured_log() as log:
                result = lib.bpf_object__load(obj)
            if result < 0:
                raise VerifierError(self.name, _libbpf.errno_error(result), "\n".join(log))
            loaded = Object(self.name, obj)
        except BaseException:
            lib.bpf_object__close(obj)
            raise
        if pin_dir is not None:
            for name, m in loaded.maps.items():
                if lib.bpf_map__is_internal(names[name]) or name in self.reused_maps:
                    continue  # .rodata/.bss belong to the program; shared maps to their owner
                if not (Path(pin_dir) / name).exists():
                    m.pin(Path(pin_dir) / name)
        return loaded

    def _check_names(self, names: dict) -> None:
        for name in [*self.max_entries, *self.reused_maps]:
            if name not in names:
                raise KeyError(f"object {self.name} has no map {name!r} (maps: {', '.join(sorted(names))})")

    def _write_constants(self, obj, names: dict) -> None:
        if not self.constants:
            return
        rodata = next((m for n, m in names.items() if n.endswith(".rodata")), None)
        variables = _datasec_variables(obj, ".rodata")
        unknown = set(self.constants) - set(variables)
        if rodata is None or unknown:
            raise KeyError(f"object {self.name} has no constant(s) {', '.join(sorted(unknown))} "
                           f"(constants: {', '.join(sorted(variables)) or 'none'})")
        size = ctypes.c_size_t()
        base = lib.bpf_map__initial_value(rodata, ctypes.byref(size))
        for name, value in self.constants.items():
            var = variables[name]
            if isinstance(value, (bytes, bytearray)):
                if len(value) != var.size:
                    raise LayoutError(f"constant {name} is {var.size} bytes, got {len(value)}")
                raw = bytes(value)
            else:
                raw = int(value).to_bytes(var.size, "little", signed=int(value) < 0)
            ctypes.memmove(base + var.offset, raw, var.size)


class Object:
    """A loaded object. Its maps and programs hold their own fds, so they stay valid after close()."""

    def __init__(self, name: str, obj: int) -> None:
        self.name = name
        self._obj: int | None = obj
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        btf = lib.bpf_object__btf(obj)
        for m in _iterate(lib.bpf_object__next_map, obj):
            name_ = lib.bpf_map__name(m).decode()
            loaded = Map(lib.bpf_map__fd(m), name_, lib.bpf_map__type(m), lib.bpf_map__key_size(m),
                         lib.bpf_map__value_size(m), lib.bpf_map__max_entries(m), owned=False)
            loaded.key_layout, loaded.value_layout = map_layouts(btf, m)
            self.maps[name_] = loaded
        for p in _iterate(lib.bpf_object__next_program, obj):
            fd = lib.bpf_program__fd(p)
            if fd >= 0:
                name_ = lib.bpf_program__name(p).decode()
                self.programs[name_] = Program(fd, name_, lib.bpf_program__type(p), owned=False)

    def close(self) -> None:
        for handle in [*self.maps.values(), *self.programs.values()]:
            handle.close()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> Object:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Object({self.name!r}, maps={sorted(self.maps)}, programs={sorted(self.programs)})"


def _iterate(next_fn, obj) -> list[int]:
    items: list[int] = []
    item = None
    while True:
        item = next_fn(obj, item)
        if not item:
            return items
        items.append(item)


def _datasec_variables(obj, section: str) -> dict[str, Variable]:
    btf = lib.bpf_object__btf(obj)
    if not btf:
        return {}
    type_id = lib.btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
    if type_id < 0:
        return {}
    datasec = lib.btf__type_by_id(btf, type_id)
    _name_off, info, _size = struct.unpack("<III", ctypes.string_at(datasec, 12))
    count = info & 0xFFFF
    variables = {}
    for i in range(count):
        var_type, offset, size = struct.unpack("<III", ctypes.string_at(datasec + 12 + 12 * i, 12))
        var = lib.btf__type_by_id(btf, var_type)
        name_off = struct.unpack("<I", ctypes.string_at(var, 4))[0]
        variables[lib.btf__name_by_offset(btf, name_off).decode()] = Variable(offset, size)
    return variables


def _pinned_maps(pin_dir: Path, names: dict) -> dict[str, Map]:
    found = {}
    for name, m in names.items():
        path = pin_dir / name
        if not lib.bpf_map__is_internal(m) and path.exists():
            found[name] = Map.from_pin(path)
    return found


def _check_shape(spec_map, existing: Map) -> None:
    want = (lib.bpf_map__type(spec_map), lib.bpf_map__key_size(spec_map),
            lib.bpf_map__value_size(spec_map), lib.bpf_map__max_entries(spec_map))
    have = (int(existing.type), existing.key_size, existing.value_size, existing.max_entries)
    if want != have:
        name = lib.bpf_map__name(spec_map).decode()
        raise LayoutError(f"map {name}: the existing map has (type, key, value, max_entries) = "
                          f"{have}, the program wants {want}")
