"""Declarative bindings: one class per BPF object, whose annotated attributes name its maps and
programs, filled and checked when the object is bound (as cilium/ebpf's LoadAndAssign fills the
fields of a struct).

    class LbObjects(Objects):
        source = "lb"                                   # src/bpfnet/bpf/lb.bpf.c
        vip_map: TypedMap[VipKey, VipMeta]              # key and value checked against BTF
        lb_stats: TypedMap[ctypes.c_uint32, Counter]
        flows: Annotated[Map, "pod_flows"]              # an attribute named apart from its map
        xdp_lb: Program

A map or program the object lacks is an error naming every one missing; a TypedMap's ctypes key
and value must match the map's BTF types field by field (bpfnet.ebpf.btf).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from .errors import LayoutError
from .map import Map, TypedMap
from .object import Object, ObjectSpec
from .program import Program


class _Binding(typing.NamedTuple):
    kind: type                      # Map, TypedMap or Program
    name: str                       # of the map or program in the object
    key: Any = None                 # TypedMap key and value ctypes types
    value: Any = None


def _binding(attribute: str, hint: Any) -> _Binding | None:
    name = attribute
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        name = next((e for e in extras if isinstance(e, str)), attribute)
    if hint is Map or hint is Program:
        return _Binding(hint, name)
    if typing.get_origin(hint) is TypedMap:
        key, value = typing.get_args(hint)
        return _Binding(TypedMap, name, key, value)
    return None


class Objects:
    """Base of the bindings. Subclasses set `source` (the built-in object, bpf/<source>.bpf.c)
    and annotate one attribute per map or program they use."""

    source: ClassVar[str]
    obj: Object

    def __init__(self, obj: Object) -> None:
        self.obj = obj
        bindings = self.bindings()
        missing = [f"{'program' if b.kind is Program else 'map'} {b.name!r}" for b in bindings.values()
                   if b.name not in (obj.programs if b.kind is Program else obj.maps)]
        if missing:
            raise LayoutError(
                f"object {obj.name} has no {', '.join(missing)} (bound by {type(self).__name__}); it has "
                f"maps {', '.join(sorted(obj.maps))} and programs {', '.join(sorted(obj.programs))}")
        for attribute, b in bindings.items():
            if b.kind is Program:
                setattr(self, attribute, obj.programs[b.name])
            elif b.kind is Map:
                setattr(self, attribute, obj.maps[b.name])
            else:
                setattr(self, attribute, obj.maps[b.name].typed(b.key, b.value))

    @classmethod
    def bindings(cls) -> dict[str, _Binding]:
        """Attribute -> what it binds, from the class annotations (cached per class)."""
        cached = cls.__dict__.get("_bindings")
        if cached is None:
            hints = typing.get_type_hints(cls, include_extras=True)
            cached = {attribute: b for attribute, hint in hints.items()
                      if (b := _binding(attribute, hint)) is not None}
            cls._bindings = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def map_names(cls) -> list[str]:
        """The names of the maps this class binds, as the object calls them."""
        return [b.name for b in cls.bindings().values() if b.kind is not Program]

    def maps(self) -> dict[str, Map]:
        """The bound maps by their names in the object."""
        return {name: self.obj.maps[name] for name in self.map_names()}

    @classmethod
    def spec(cls) -> ObjectSpec:
        return ObjectSpec.builtin(cls.source)

    @classmethod
    def load(cls, spec: ObjectSpec | None = None, pin_dir: Path | None = None, **kwargs: Any) -> Self:
        """Load `spec` (by default the built-in object `source`) and bind it; extra keyword
        arguments go to the subclass's constructor."""
        obj = (spec or cls.spec()).load(pin_dir=pin_dir)
        try:
            return cls(obj, **kwargs)
        except BaseException:
            obj.close()
            raise

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
