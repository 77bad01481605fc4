"""BPF maps: raw byte access, typed access through ctypes structs, per-CPU values, batches."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from . import _libbpf
from ._libbpf import PERCPU_MAP_TYPES, POSSIBLE_CPUS, MapType
from .btf import Layout, check_layout
from .errors import BpfError, LayoutError
from .handle import FdHandle

# bytes, or a ctypes value whose bytes are the key (a Structure, an Array, c_uint32, ...)
Key = bytes | bytearray | ctypes.Structure | ctypes.Array | ctypes._SimpleCData
K = TypeVar("K", bound=Key)
V = TypeVar("V")

_MAP_INFO = struct.Struct("<IIIIII16s")  # type, id, key_size, value_size, max_entries, flags, name


def _as_bytes(value, size: int, what: str) -> bytes:
    data = bytes(value)
    if len(data) != size:
        raise LayoutError(f"{what} is {len(data)} bytes, the map wants {size}")
    return data


class Map(FdHandle):
    """A loaded BPF map. Keys and values are bytes; `typed()` gives struct access."""

    kind = "map"

    def __init__(self, fd: int, name: str, type: int, key_size: int, value_size: int,
                 max_entries: int, owned: bool = True) -> None:
        super().__init__(fd if owned else os.dup(fd))
        self.name = name
        self.type = MapType(type) if type in MapType._value2member_map_ else type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        # The key and value types from the object's BTF; None for maps opened from a pin or an fd.
        self.key_layout: Layout | None = None
        self.value_layout: Layout | None = None

    def __repr__(self) -> str:
        return (f"Map({self.name!r}, {getattr(self.type, 'name', self.type)}, key={self.key_size}, "
                f"value={self.value_size}, max_entries={self.max_entries})")

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, type: MapType, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, inner_map_fd: int | None = None) -> Map:
        options = _libbpf.opts(_libbpf.MapCreateOpts, map_flags=flags,
                               inner_map_fd=inner_map_fd or 0)
        fd = _libbpf.lib.bpf_map_create(int(type), name[:15].encode() or None, key_size,
                                        value_size, max_entries, ctypes.byref(options))
        if fd < 0:
            raise BpfError(f"creating map {name or type.name}", _libbpf.errno_error(fd))
        return cls(fd, name, type, key_size, value_size, max_entries)

    @classmethod
    def from_fd(cls, fd: int) -> Map:
        """Wrap an fd we own (closed with the Map); reads the map's shape from the kernel."""
        type_, _id, key_size, value_size, max_entries, _flags, name = _MAP_INFO.unpack_from(
            cls.info(fd, "map"))
        return cls(fd, name.rstrip(b"\0").decode(), type_, key_size, value_size, max_entries)

    @classmethod
    def from_pin(cls, path) -> Map:
        return cls.from_fd(cls.fd_from_pin(path, "map"))

    # --- geometry -------------------------------------------------------------------------
    @property
    def per_cpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    @property
    def _value_buffer_size(self) -> int:
        if self.per_cpu:  # the kernel rounds each CPU's slot up to 8 bytes
            return ((self.value_size + 7) // 8 * 8) * POSSIBLE_CPUS
        return self.value_size

    def _split_cpus(self, raw: bytes) -> list[bytes]:
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i * stride:i * stride + self.value_size] for i in range(POSSIBLE_CPUS)]

    def _join_cpus(self, values) -> bytes:
        stride = (self.value_size + 7) // 8 * 8
        if isinstance(values, (list, tuple)):
            if len(values) != POSSIBLE_CPUS:
                raise LayoutError(f"{self.name}: {len(values)} per-CPU values for {POSSIBLE_CPUS} CPUs")
            parts = [_as_bytes(v, self.value_size, "value").ljust(stride, b"\0") for v in values]
        else:  # one value replicated on every CPU
            parts = [_as_bytes(values, self.value_size, "value").ljust(stride, b"\0")] * POSSIBLE_CPUS
        return b"".join(parts)

    def _key(self, key: Key | None) -> ctypes.Array | None:
        if key is None or self.key_size == 0:
            return None
        return ctypes.create_string_buffer(_as_bytes(key, self.key_size, f"{self.name} key"),
                                           self.key_size)

    def _decode(self, raw: bytes):
        return self._split_cpus(raw) if self.per_cpu else raw

    # --- element access -------------------------------------------------------------------
    def lookup(self, key: Key | None):
        """The value at `key` (a list of per-CPU values for per-CPU maps), or None if absent."""
        value = ctypes.create_string_buffer(self._value_buffer_size)
        result = _libbpf.lib.bpf_map_lookup_elem(self.fd, self._key(key), value)
        if result < 0:
            err = _libbpf.errno_error(result)
            if err == 2:  # ENOENT
                return None
            raise BpfError(f"lookup in map {self.name}", err)
        return self._decode(value.raw)

    def __getitem__(self, key: Key):
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Key, value) -> None:
        self.update(key, value)

    def update(self, key: Key | None, value, flags: int = _libbpf.BPF_ANY) -> None:
        raw = self._join_cpus(value) if self.per_cpu else _as_bytes(value, self.value_size,
                                                                     f"{self.name} value")
        result = _libbpf.lib.bpf_map_update_elem(self.fd, self._key(key), raw, flags)
        if result < 0:
            raise BpfError(f"update of map {self.name}", _libbpf.errno_error(result))

    def push(self, value) -> None:
        """Push onto a queue or stack map."""
        self.update(None, value)

    def pop(self):
        """Pop from a queue or stack map; None when empty."""
        value = ctypes.create_string_buffer(self.value_size)
        result = _libbpf.lib.bpf_map_lookup_and_delete_elem(self.fd, None, value)
        if result < 0:
            err = _libbpf.errno_error(result)
            if err == 2:
                return None
            raise BpfError(f"pop from map {self.name}", err)
        return value.raw

    def delete(self, key: Key) -> bool:
        """Delete `key`; False when it was not there."""
        result = _libbpf.lib.bpf_map_delete_elem(self.fd, self._key(key))
        if result < 0:
            err = _libbpf.errno_error(result)
            if err == 2:
                return False
            raise BpfError(f"delete from map {self.name}", err)
        return True

    def keys(self) -> Iterator[bytes]:
        key = None
        next_key = ctypes.create_string_buffer(self.key_size)
        while True:
            result = _libbpf.lib.bpf_map_get_next_key(self.fd, key, next_key)
            if result < 0:
                err = _libbpf.errno_error(result)
                if err == 2:
                    return
                raise BpfError(f"iterating map {self.name}", err)
            yield next_key.raw
            key = ctypes.create_string_buffer(next_key.raw, self.key_size)

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted while we walked
                yield key, value

    def clear(self) -> None:
        for key in list(self.keys()):
            self.delete(key)

    # --- batches --------------------------------------------------------------------------
    def update_batch(self, keys: Iterable[Key], values: Iterable, flags: int = 0) -> None:
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if not keys:
            return
        key_blob = b"".join(_as_bytes(k, self.key_size, "key") for k in keys)
        value_blob = b"".join(self._join_cpus(v) if self.per_cpu else _as_bytes(v, self.value_size, "value")
                              for v in values)
        count = _libbpf.u32(len(keys))
        options = _libbpf.opts(_libbpf.MapBatchOpts, elem_flags=flags)
        result = _libbpf.lib.bpf_map_update_batch(self.fd, key_blob, value_blob, ctypes.byref(count),
                                                  ctypes.byref(options))
        if result < 0:
            raise BpfError(f"batch update of map {self.name} (done {count.value} of {len(keys)})",
                           _libbpf.errno_error(result))

    def delete_batch(self, keys: Iterable[Key]) -> None:
        keys = list(keys)
        if not keys:
            return
        key_blob = b"".join(_as_bytes(k, self.key_size, "key") for k in keys)
        count = _libbpf.u32(len(keys))
        options = _libbpf.opts(_libbpf.MapBatchOpts)
        result = _libbpf.lib.bpf_map_delete_batch(self.fd, key_blob, ctypes.byref(count),
                                                  ctypes.byref(options))
        if result < 0:
            raise BpfError(f"batch delete from map {self.name} (done {count.value} of {len(keys)})",
                           _libbpf.errno_error(result))

    def items_batch(self, chunk: int = 4096) -> Iterator[tuple[bytes, Any]]:
        """All entries, read `chunk` at a time with BPF_MAP_LOOKUP_BATCH (hash-type maps)."""
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self._value_buffer_size * chunk)
        in_batch, out_batch = None, ctypes.create_string_buffer(max(self.key_size, 8))
        options = _libbpf.opts(_libbpf.MapBatchOpts)
        while True:
            count = _libbpf.u32(chunk)
            result = _libbpf.lib.bpf_map_lookup_batch(self.fd, in_batch, out_batch, keys, values,
                                                      ctypes.byref(count), ctypes.byref(options))
            err = _libbpf.errno_error(result) if result < 0 else 0
            if err not in (0, 2):
                raise BpfError(f"batch lookup in map {self.name}", err)
            for i in range(count.value):
                key = keys.raw[i * self.key_size:(i + 1) * self.key_size]
                stride = self._value_buffer_size
                yield key, self._decode(values.raw[i * stride:(i + 1) * stride])
            if err == 2:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, len(out_batch))

    def typed(self, key_type: type[K] | None, value_type: type[V]) -> TypedMap[K, V]:
        return TypedMap(self, key_type, value_type)


class TypedMap(Generic[K, V]):
    """A view of a Map through ctypes struct declarations, checked against the map's sizes and,
    when the map comes from a loaded object, against its BTF key and value types field by field."""

    def __init__(self, map: Map, key_type, value_type) -> None:
        key_size = ctypes.sizeof(key_type) if key_type is not None else 0
        if key_size != map.key_size or ctypes.sizeof(value_type) != map.value_size:
            raise LayoutError(
                f"map {map.name}: Python declares key {key_size} bytes / value "
                f"{ctypes.sizeof(value_type)} bytes ({getattr(key_type, '__name__', None)}, "
                f"{value_type.__name__}), the map has key {map.key_size} / value {map.value_size}")
        if key_type is not None and map.key_layout is not None:
            check_layout(f"map {map.name} key", key_type, map.key_layout)
        if map.value_layout is not None:
            check_layout(f"map {map.name} value", value_type, map.value_layout)
        self.map, self.key_type, self.value_type = map, key_type, value_type

    def _value(self, raw):
        if isinstance(raw, list):
            return [self.value_type.from_buffer_copy(r) for r in raw]
        return self.value_type.from_buffer_copy(raw)

    def lookup(self, key: K | bytes):
        raw = self.map.lookup(key)
        return None if raw is None else self._value(raw)

    def update(self, key: K | bytes, value, flags: int = 0) -> None:
        self.map.update(key, value, flags)

    def delete(self, key: K | bytes) -> bool:
        return self.map.delete(key)

    def keys(self) -> Iterator[K]:
        for raw in self.map.keys():
            yield self.key_type.from_buffer_copy(raw)

    def items(self) -> Iterator[tuple[K, V]]:
        for raw_key, raw_value in self.map.items():
            yield self.key_type.from_buffer_copy(raw_key), self._value(raw_value)

    def update_batch(self, keys, values, flags: int = 0) -> None:
        self.map.update_batch(keys, values, flags)

    def delete_batch(self, keys) -> None:
        self.map.delete_batch(keys)

