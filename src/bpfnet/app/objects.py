"""An app's state as separate objects, each with its own key: what the store keeps and the per-object
API writes (a VIP, a real, a rule, a pod...), like Kubernetes objects or etcd keys.

An app declares its object kinds; everything in the state that no kind holds is one object named
`settings`. Each object carries an `order` so that lists whose order matters (ddos rules: the first
match decides) come back in the order they were written, without a list object that every writer
would have to rewrite.

    vips/10.0.0.1:80/tcp                       a VIP without its reals
    reals/10.0.0.1:80/tcp/10.1.0.2             a real of that VIP (child key = parent key + "/" + own)
    rules/7                                    a ddos rule
    pods/shop/db                               a pod
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bpfnet.errors import BpfnetError

SETTINGS = "settings"


class ObjectKeyError(BpfnetError, ValueError):
    """A key that names no kind, or a child whose own key would be ambiguous."""


@dataclass(frozen=True)
class ObjectKind:
    """One kind of object: the items of the list `field` in the state (or in a parent object)."""

    name: str  # in keys and URLs: "vips", "reals"
    field: str  # the list that holds the items: LbState.vips, Vip.reals
    key_of: Callable[[Any], str]  # an item (the validated model) -> its key within its parent
    children: tuple[ObjectKind, ...] = ()


@dataclass(frozen=True)
class Obj:
    """One object: its JSON without its children, and its place among its siblings."""

    value: dict
    order: float


def all_kinds(kinds: tuple[ObjectKind, ...]) -> Iterator[tuple[ObjectKind, ObjectKind | None]]:
    """Every kind with its parent kind (None at the top), parents first."""
    stack: list[tuple[ObjectKind, ObjectKind | None]] = [(kind, None) for kind in reversed(kinds)]
    while stack:
        kind, parent = stack.pop()
        yield kind, parent
        stack.extend((child, kind) for child in reversed(kind.children))


def kind_of(kinds: tuple[ObjectKind, ...], key: str) -> ObjectKind | None:
    """The kind a key belongs to; None for `settings`; ObjectKeyError for anything else."""
    if key == SETTINGS:
        return None
    prefix, _, rest = key.partition("/")
    for kind, _parent in all_kinds(kinds):
        if kind.name == prefix and rest:
            return kind
    known = ", ".join([SETTINGS] + [kind.name for kind, _ in all_kinds(kinds)])
    raise ObjectKeyError(f"no object kind for key {key[:200]!r} (kinds: {known})")


def parent_key(key: str) -> str:
    """`reals/10.0.0.1:80/tcp/10.1.0.2` -> `10.0.0.1:80/tcp`: the parent's key without its kind
    (for a key of a child kind: a top-level key's own part may contain '/', as pods/shop/db)."""
    return key.partition("/")[2].rpartition("/")[0]


def sibling_group(kinds: tuple[ObjectKind, ...], key: str) -> tuple[str, str | None]:
    """(kind, parent key or None at the top): the objects among which `key` has its order."""
    kind = kind_of(kinds, key)
    if kind is None:
        return SETTINGS, None
    is_child = any(kind in parent.children for parent, _ in all_kinds(kinds))
    return kind.name, parent_key(key) if is_child else None


def split(state: BaseModel, kinds: tuple[ObjectKind, ...]) -> dict[str, Obj]:
    """The objects of a validated state; `order` is each item's index in its list."""
    top_fields = {kind.field for kind in kinds}
    objects = {SETTINGS: Obj(state.model_dump(mode="json", exclude=top_fields), 0.0)}

    def walk(kind: ObjectKind, items: list, prefix: str) -> None:
        for index, item in enumerate(items):
            own = kind.key_of(item)
            if prefix and "/" in own:
                raise ObjectKeyError(f"{kind.name}: a child's own key may not contain '/': {own!r}")
            key = f"{kind.name}/{prefix}{own}"
            if key in objects:
                raise ObjectKeyError(f"two {kind.name} have the key {key!r}")
            child_fields = {child.field for child in kind.children}
            objects[key] = Obj(item.model_dump(mode="json", exclude=child_fields), float(index))
            for child in kind.children:
                walk(child, getattr(item, child.field), f"{prefix}{own}/")

    for kind in kinds:
        walk(kind, getattr(state, kind.field), "")
    return objects


def assemble(objects: Mapping[str, Obj], kinds: tuple[ObjectKind, ...]) -> dict:
    """The state's JSON from its objects: items in (order, key) order, children under their parent.
    A child whose parent is missing is an ObjectKeyError (the store would be inconsistent)."""
    by_kind: dict[str, list[tuple[float, str, dict]]] = {}
    for key, obj in objects.items():
        kind = kind_of(kinds, key)
        if kind is not None:
            by_kind.setdefault(kind.name, []).append((obj.order, key, obj.value))
    state = dict(objects[SETTINGS].value) if SETTINGS in objects else {}

    def items_of(kind: ObjectKind, parent: str | None) -> list[dict]:
        out = []
        for _order, key, value in sorted(by_kind.get(kind.name, []), key=lambda row: row[:2]):
            if parent is not None and parent_key(key) != parent:
                continue
            item = dict(value)
            for child in kind.children:
                item[child.field] = items_of(child, key.partition("/")[2])
            out.append(item)
        return out

    for kind in kinds:
        state[kind.field] = items_of(kind, None)
    parents = {key.partition("/")[2] for key in objects if key != SETTINGS}
    for kind, parent in all_kinds(kinds):
        if parent is None:
            continue
        for _order, key, _value in by_kind.get(kind.name, []):
            if parent_key(key) not in parents:
                raise ObjectKeyError(f"{key!r} has no parent {parent.name}/{parent_key(key)}")
    return state


def changes(old: Mapping[str, Obj], new: Mapping[str, Obj]) -> tuple[dict[str, Obj], list[str]]:
    """What to write and what to delete to go from `old` to `new`."""
    puts = {key: obj for key, obj in new.items() if old.get(key) != obj}
    deletes = sorted(key for key in old if key not in new)
    return puts, deletes


def order_for_insert(siblings: list[float], position: int | None) -> float:
    """An order that puts a new object at `position` among siblings' orders (sorted); last by default."""
    if not siblings:
        return 0.0
    if position is None or position >= len(siblings):
        return siblings[-1] + 1.0
    if position <= 0:
        return siblings[0] - 1.0
    return (siblings[position - 1] + siblings[position]) / 2


def keep_orders(stored: Mapping[str, float], objects: Mapping[str, Obj],
                kinds: tuple[ObjectKind, ...]) -> dict[str, Obj]:
    """`objects` from `split` (orders = list indices) with the orders already stored kept where the
    new lists keep the stored sequence, so a whole-state write that moves nothing rewrites nothing;
    new objects get orders between their neighbours."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for key, _obj in sorted(objects.items(), key=lambda item: item[1].order):
        if key != SETTINGS:
            groups.setdefault(sibling_group(kinds, key), []).append(key)
    out = dict(objects)
    for keys in groups.values():
        known = [stored[k] for k in keys if k in stored]
        if any(a >= b for a, b in zip(known, known[1:], strict=False)):
            continue  # reordered: the indices it has
        index = 0
        while index < len(keys):
            if keys[index] in stored:
                out[keys[index]] = Obj(objects[keys[index]].value, stored[keys[index]])
                index += 1
                continue
            end = index  # a run of new keys between two stored ones (or an end)
            while end < len(keys) and keys[end] not in stored:
                end += 1
            low = stored[keys[index - 1]] if index else None
            high = stored[keys[end]] if end < len(keys) else None
            count = end - index
            for n, key in enumerate(keys[index:end], start=1):
                if low is None and high is None:
                    order = float(n - 1)
                elif low is None:
                    order = high - (count - n + 1)  # type: ignore[operator]
                elif high is None:
                    order = low + n
                else:
                    order = low + (high - low) * n / (count + 1)
                out[key] = Obj(objects[key].value, order)
            index = end
    return out
