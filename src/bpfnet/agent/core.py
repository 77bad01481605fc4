"""The agent: the enabled apps' controllers, their desired state in a store, and the tick clock.

Every change follows one path: validate with the app's model, apply to the data plane, and only
then persist (state and audit entry together). A refused change leaves data plane, memory and
store as they were. Calls into one controller are serialized by its lock; apps run side by side.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, ValidationError

from bpfnet import __version__
from bpfnet.agent.audit import diff_summary
from bpfnet.agent.store import (
    AuditEntry,
    Membership,
    RevisionConflict,
    Store,
    StoredObject,
    StoredState,
    StoreError,
    Watch,
    WatchEvent,
    object_conflict,
)
from bpfnet.app.controller import ApplyError, Controller, UnknownAppError, load_controller
from bpfnet.app.objects import (
    SETTINGS,
    Obj,
    ObjectKeyError,
    ObjectKind,
    all_kinds,
    assemble,
    changes,
    keep_orders,
    kind_of,
    order_for_insert,
    sibling_group,
    split,
)
from bpfnet.app.paths import DEFAULT_PIN_ROOT
from bpfnet.app.validation import shorten, structured_errors, validation_message
from bpfnet.configfile import first_non_finite
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)

TICK_INTERVAL = 0.2
MEMBER_TTL = 10.0  # seconds a host's agent stays a member of the fleet without reaching the store
REBASE_ATTEMPTS = 5  # a write redone this often on a store other agents keep changing gives up (503)
T = TypeVar("T")


class AgentStartError(BpfnetError, RuntimeError):
    """The agent could not start, or a stored state no longer fits its app."""


class _Stale(BpfnetError):
    """The store moved on (another agent wrote): redo the write on top of the store's state."""


class StateRejected(BpfnetError):
    """A desired state was not applied; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, errors: list | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors


@dataclass
class AppSlot:
    """One enabled app: its controller and what the agent knows about it."""

    controller: Controller
    state: BaseModel
    revision: int
    objects: dict[str, StoredObject]  # the state as the store holds it, with each object's revision
    lock: threading.Lock = field(default_factory=threading.Lock)
    tick_errors: int = 0
    last_tick_error: str | None = None
    store_error: str | None = None  # why the store's latest state is not the one applied
    metric_errors: int = 0


class Agent:
    def __init__(self, store: Store, apps: Sequence[str | type[Controller]], *,
                 pin_root: Path = DEFAULT_PIN_ROOT, tick_interval: float = TICK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, adopt_empty: bool = False,
                 app_options: dict[str, dict[str, Any]] | None = None, member: str | None = None,
                 member_ttl: float = MEMBER_TTL) -> None:
        """`app_options`: keyword arguments of each app's controller (podnet: `nodes`). `member`:
        this host's name in a fleet sharing the store (registered with a lease of `member_ttl` s).
        `adopt_empty`: an app with no stored state may take over (and empty) a pinned data plane
        left by an earlier agent; without it the start is refused (a lost or new state DB must not
        silently wipe VIPs and rules that are forwarding)."""
        self.store = store
        self.adopt_empty = adopt_empty
        self.app_options = app_options or {}
        self.member = member
        self.member_ttl = member_ttl
        self.membership: Membership | None = None
        self._watches: list[Watch] = []
        self._follow_queue: queue.SimpleQueue = queue.SimpleQueue()  # what the store's watches report
        self._follower: threading.Thread | None = None
        self.pin_root = pin_root
        self.tick_interval = tick_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._classes = [app if isinstance(app, type) else load_controller(app) for app in apps]
        names = [cls.name for cls in self._classes]
        if len(set(names)) != len(names):
            raise AgentStartError(f"an app is enabled twice: {', '.join(names)}")
        self._slots: dict[str, AppSlot] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.ticks = 0
        self.detach_on_exit = False  # set by a shutdown request that asks to remove the data plane
        self.on_shutdown_request: Callable[[], None] | None = None  # installed by the server
        self.started_at: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_AgentCollector(self))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every app from its stored state (or its model's defaults), then the ticks."""
        try:
            for cls in self._classes:
                self._start_app(cls)
        except BaseException:
            self._stop_apps(detach=False)
            raise
        self.started_at = self._wall_clock()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="bpfnet-agent-tick", daemon=True)
        self._ticker.start()
        self._follow_store()

    def _follow_store(self) -> None:
        """Follow what other agents write to a shared store (its watch, not polling), and, for a
        host of a fleet, register as a member and tell the apps which hosts are alive."""
        self._follower = threading.Thread(target=self._follow_loop, name="bpfnet-agent-follow", daemon=True)
        self._follower.start()
        for name, slot in self._slots.items():
            self._watches.append(self.store.watch(name, slot.revision, functools.partial(self._changed, name)))
        if self.member is not None:
            self.membership = self.store.join(self.member, self.member_ttl, self._members_changed)

    def _changed(self, app: str, event: WatchEvent) -> None:
        # called in the store's watch thread (which may run an event loop of its own): the work of
        # applying goes to the agent's follower thread
        if app in self._slots and event.revision > self._slots[app].revision:  # not this agent's own commit
            self._follow_queue.put(("resync", app))

    def _follow_loop(self) -> None:
        while True:
            item = self._follow_queue.get()
            if item is None:
                return
            what, argument = item
            try:
                if what == "resync":
                    self.resync(argument)
                else:
                    self._tell_members(argument)
            except Exception:
                log.exception("following the store (%s) failed", what)

    def _members_changed(self, members: set[str]) -> None:
        self._follow_queue.put(("members", members))

    def _tell_members(self, members: set[str]) -> None:
        for name, slot in list(self._slots.items()):
            with slot.lock:
                try:
                    slot.controller.members_changed(members)
                except Exception as err:
                    slot.store_error = f"members {sorted(members)} not applied: {type(err).__name__}: {err}"
                    log.exception("%s: members change failed", name)

    def _start_app(self, cls: type[Controller]) -> None:
        try:
            stored = self.store.load(cls.name)
        except StoreError as err:
            raise AgentStartError(str(err)) from None
        # With no stored state the app starts from its defaults, which empties a pinned data plane.
        # That is only safe when this store already ran the app from its defaults (an audit entry
        # says so) or the operator asked for it: a lost or new state DB must not wipe VIPs and rules.
        pinned = cls.pinned_objects(self.pin_root) if stored is None else []
        if pinned and not self.adopt_empty and not self._audited(cls.name):
            raise AgentStartError(
                f"{cls.name}: the store has no state for {cls.name}, but {len(pinned)} pinned objects "
                f"of a running data plane are under {self.pin_root / cls.name} (e.g. {pinned[0].name}); "
                "starting from the default state would remove what they hold. Restore the state DB "
                "(--state-db), or start with --adopt-empty to replace them with the default state")
        try:
            state = cls.state_model.model_validate(self._stored_json(cls, stored))
        except ValidationError as err:
            where = f"stored state (revision {stored.revision})" if stored else "default state"
            raise AgentStartError(f"{cls.name}: {where} does not validate: {validation_message(err)}") from None
        objects, revision = (dict(stored.objects), stored.revision) if stored else ({}, 0)
        if stored is not None and stored.legacy_state is not None:
            objects, revision = self._migrate(cls, state, stored.revision)
        log.info("starting %s at revision %d", cls.name, stored.revision if stored else 0)
        try:
            controller = cls(self.pin_root, **self.app_options.get(cls.name, {}))
            controller.start(state)
        except Exception as err:
            log.exception("starting %s failed", cls.name)
            raise AgentStartError(f"{cls.name} failed to start: {type(err).__name__}: {err}") from err
        self._slots[cls.name] = AppSlot(controller, state, revision, objects)
        if stored is None and cls.pinned_objects(self.pin_root) and not self._audited(cls.name):
            how = f"adopted {len(pinned)} pinned objects (--adopt-empty)" if pinned else "new data plane"
            self._record(cls.name, f"agent pid={os.getpid()}", "started", f"{how}: default state applied")

    @staticmethod
    def _stored_json(cls: type[Controller], stored: StoredState | None) -> dict:
        if stored is None:
            return {}
        try:
            return stored.whole(cls.object_kinds)
        except ObjectKeyError as err:
            raise AgentStartError(f"{cls.name}: stored state (revision {stored.revision}) is inconsistent: "
                                  f"{err}") from None

    def _migrate(self, cls: type[Controller], state: BaseModel,
                 revision: int) -> tuple[dict[str, StoredObject], int]:
        """A whole state written by an older agent, stored again as objects."""
        objects = split(state, cls.object_kinds)
        entry = AuditEntry(self._wall_clock(), f"agent pid={os.getpid()}", cls.name, "migrated",
                           f"whole state of revision {revision} stored as {len(objects)} objects")
        try:
            new_revision = self.store.commit(cls.name, objects, [], entry, expected_revision=revision)
        except Exception as err:
            raise AgentStartError(f"{cls.name}: migrating the stored state failed: {err}") from None
        return {key: StoredObject(o.value, o.order, new_revision) for key, o in objects.items()}, new_revision

    def _audited(self, app: str) -> bool:
        try:
            return bool(self.store.audit(limit=1, app=app))
        except StoreError as err:
            raise AgentStartError(str(err)) from None

    def request_shutdown(self, detach: bool) -> bool:
        """Ask the server to exit; False when nothing serves this agent."""
        if self.on_shutdown_request is None:
            return False
        self.detach_on_exit = self.detach_on_exit or detach
        self.on_shutdown_request()
        return True

    def stop(self, detach: bool = False) -> None:
        """Stop ticks and controllers; detach=False leaves pinned data planes forwarding."""
        if self.membership is not None:
            self.membership.leave()
            self.membership = None
        for watch in self._watches:
            watch.stop()
        self._watches.clear()
        if self._follower is not None:
            self._follow_queue.put(None)
            self._follower.join()
            self._follower = None
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        self._stop_apps(detach)

    def _stop_apps(self, detach: bool) -> None:
        for name in reversed(list(self._slots)):
            slot = self._slots.pop(name)
            with slot.lock:
                try:
                    slot.controller.stop(detach)
                except Exception:
                    log.exception("stopping %s failed", name)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_interval):
            self.tick_once()

    def tick_once(self) -> None:
        """One round of ticks; a controller's exception is logged and counted, never fatal."""
        now = self._clock()
        for name, slot in list(self._slots.items()):
            with slot.lock:
                try:
                    slot.controller.tick(now)
                except Exception as err:
                    slot.tick_errors += 1
                    slot.last_tick_error = f"{type(err).__name__}: {err}"
                    log.exception("tick of %s failed", name)
        self.ticks += 1

    # -- state ---------------------------------------------------------------------------------

    def _slot(self, app: str) -> AppSlot:
        try:
            return self._slots[app]
        except KeyError:
            raise UnknownAppError(f"app {shorten(repr(app), 80)} is not enabled in this agent "
                                  f"(enabled: {', '.join(self._slots) or 'none'})") from None

    @property
    def apps(self) -> list[str]:
        return list(self._slots)

    def get_state(self, app: str) -> tuple[BaseModel, int]:
        slot = self._slot(app)
        return slot.state, slot.revision

    def put_state(self, app: str, data: Any, who: str, if_revision: int | None = None) -> tuple[int, str]:
        """Validate, apply, persist the whole state; returns (revision, change summary) or raises
        StateRejected."""
        return self._rebasing(app, lambda: self._put_state(app, data, who, if_revision))

    def _put_state(self, app: str, data: Any, who: str, if_revision: int | None) -> tuple[int, str]:
        slot = self._slot(app)
        state, objects = self._validate(app, slot, data, who, f"invalid state for {app}")
        with slot.lock:
            if if_revision is not None and if_revision != slot.revision:
                message = f"state of {app} is at revision {slot.revision}, not {if_revision}: read it again"
                self._record(app, who, "conflict", message)
                raise StateRejected(412, message)
            summary = diff_summary(slot.state.model_dump(mode="json"), state.model_dump(mode="json"))
            objects = keep_orders({k: o.order for k, o in slot.objects.items()}, objects, self._kinds(slot))
            return self._commit(app, slot, who, state, objects, summary,
                                expected_revision=slot.revision), summary

    # -- objects -------------------------------------------------------------------------------

    def _kinds(self, slot: AppSlot) -> tuple[ObjectKind, ...]:
        return type(slot.controller).object_kinds

    def _kind(self, app: str, slot: AppSlot, kind: str) -> ObjectKind:
        for candidate, _parent in all_kinds(self._kinds(slot)):
            if candidate.name == kind:
                return candidate
        known = ", ".join(k.name for k, _ in all_kinds(self._kinds(slot))) or "none"
        raise StateRejected(404, f"{app} has no object kind {shorten(repr(kind), 80)} (kinds: {known})")

    def list_objects(self, app: str, kind: str) -> tuple[list[dict], int]:
        """[{key, revision, object}] of one kind in their order, and the app revision."""
        slot = self._slot(app)
        self._kind(app, slot, kind)
        with slot.lock:
            rows = sorted((o.order, key, o) for key, o in slot.objects.items()
                          if key.partition("/")[0] == kind and key != SETTINGS)
            return ([{"key": key.partition("/")[2], "revision": o.revision, "object": o.value}
                     for _order, key, o in rows], slot.revision)

    def get_object(self, app: str, kind: str, key: str) -> tuple[dict, int]:
        slot = self._slot(app)
        full = self._full_key(app, slot, kind, key)
        with slot.lock:
            stored = slot.objects.get(full)
            if stored is None and full == SETTINGS:  # never written: the defaults the app runs with
                return split(slot.state, self._kinds(slot))[SETTINGS].value, 0
        if stored is None:
            raise StateRejected(404, f"{app} has no object {shorten(full, 200)}")
        return stored.value, stored.revision

    def _full_key(self, app: str, slot: AppSlot, kind: str, key: str) -> str:
        if kind == SETTINGS and not key:
            return SETTINGS
        self._kind(app, slot, kind)
        if not key:
            raise StateRejected(404, f"{app} object of kind {kind} needs a key")
        return f"{kind}/{key}"

    def put_object(self, app: str, kind: str, key: str, data: Any, who: str, *,
                   if_revision: int | None = None, create_only: bool = False,
                   position: int | None = None) -> tuple[int, str]:
        """Create or replace one object (If-Match: `if_revision`; If-None-Match *: `create_only`);
        writers of other objects never conflict with it. Returns (object revision, summary)."""
        return self._rebasing(app, lambda: self._put_object(app, kind, key, data, who, if_revision, create_only,
                                                            position))

    def _put_object(self, app: str, kind: str, key: str, data: Any, who: str, if_revision: int | None,
                    create_only: bool, position: int | None) -> tuple[int, str]:
        slot = self._slot(app)
        full = self._full_key(app, slot, kind, key)
        if not isinstance(data, dict):
            raise StateRejected(422, f"invalid {full}: the body must be a JSON object")
        object_kind = kind_of(self._kinds(slot), full)
        inside = [k.field for k in (object_kind.children if object_kind else self._kinds(slot)) if k.field in data]
        if inside:
            raise StateRejected(422, f"invalid {full}: {inside[0]} are objects of their own: write each "
                                     f"at /v1/apps/{app}/objects/..., or the whole state at /v1/apps/{app}/state")
        with slot.lock:
            current = slot.objects.get(full)
            self._check_precondition(app, who, full, current, if_revision, create_only)
            candidate = {k: o.obj for k, o in slot.objects.items()}
            _kind_name, parent = sibling_group(self._kinds(slot), full)
            if parent is not None and not any(k.partition("/")[2] == parent for k in candidate if k != SETTINGS):
                raise StateRejected(404, f"invalid {full}: its parent {parent} does not exist")
            order = current.order if current else self._new_order(slot, candidate, full, position)
            candidate[full] = Obj(data, order)
            state, objects = self._candidate_state(app, slot, who, candidate, full)
            if full not in objects:
                named = sorted(set(objects) - set(candidate) - {SETTINGS})
                message = (f"the body names {named[0]} but the URL names {full}" if named
                           else f"{full} is not kept in the state it would make")
                self._record(app, who, "invalid", message)
                raise StateRejected(422, f"invalid {full}: {message}")
            verb = "~" if current else "+"
            self._commit(app, slot, who, state, objects, f"{verb}{full}",
                         expected={full: current.revision if current else 0}, expected_revision=slot.revision)
            return slot.objects[full].revision, f"{verb}{full}"

    def create_object(self, app: str, kind: str, data: Any, who: str, *,
                      position: int | None = None) -> tuple[str, int, str]:
        """Create an object whose key the app assigns (a ddos rule without an id); returns
        (key, revision, summary)."""
        return self._rebasing(app, lambda: self._create_object(app, kind, data, who, position))

    def _create_object(self, app: str, kind: str, data: Any, who: str,
                       position: int | None) -> tuple[str, int, str]:
        slot = self._slot(app)
        object_kind = self._kind(app, slot, kind)
        if not isinstance(data, dict):
            raise StateRejected(422, f"invalid new {kind}: the body must be a JSON object")
        if object_kind not in self._kinds(slot):
            raise StateRejected(405, f"{kind} are created with PUT at their key, under their parent")
        placeholder = f"{kind}/\0new"  # a key no object can have: it is replaced by the real one
        with slot.lock:
            candidate = {k: o.obj for k, o in slot.objects.items()}
            candidate[placeholder] = Obj(data, self._new_order(slot, candidate, placeholder, position))
            state, objects = self._candidate_state(app, slot, who, candidate, f"new {kind}")
            new_keys = sorted(k for k in objects if k not in candidate and k != SETTINGS)
            if len(new_keys) != 1 or not new_keys[0].startswith(f"{kind}/"):
                message = f"new {kind} is the same object as an existing one"
                self._record(app, who, "invalid", message)
                raise StateRejected(409, message)
            [full] = new_keys
            objects[full] = Obj(objects[full].value, candidate[placeholder].order)
            self._commit(app, slot, who, state, objects, f"+{full}", expected={full: 0},
                         expected_revision=slot.revision)
            return full.partition("/")[2], slot.objects[full].revision, f"+{full}"

    def delete_object(self, app: str, kind: str, key: str, who: str, *,
                      if_revision: int | None = None) -> tuple[int, str]:
        """Delete one object and its children; returns (app revision, summary)."""
        return self._rebasing(app, lambda: self._delete_object(app, kind, key, who, if_revision))

    def _delete_object(self, app: str, kind: str, key: str, who: str,
                       if_revision: int | None) -> tuple[int, str]:
        slot = self._slot(app)
        full = self._full_key(app, slot, kind, key)
        if full == SETTINGS:
            raise StateRejected(405, f"{app} settings cannot be deleted, only replaced")
        object_kind = kind_of(self._kinds(slot), full)
        with slot.lock:
            current = slot.objects.get(full)
            if current is None:
                raise StateRejected(404, f"{app} has no object {shorten(full, 200)}")
            self._check_precondition(app, who, full, current, if_revision, False)
            gone = {full} | self._descendants(slot, object_kind, full.partition("/")[2])
            candidate = {k: o.obj for k, o in slot.objects.items() if k not in gone}
            state, objects = self._candidate_state(app, slot, who, candidate, full)
            summary = f"-{full}" + (f" and {len(gone) - 1} children" if len(gone) > 1 else "")
            revision = self._commit(app, slot, who, state, objects, summary, expected={full: current.revision},
                                    expected_revision=slot.revision)
            return revision, summary

    def _descendants(self, slot: AppSlot, kind: ObjectKind | None, key: str) -> set[str]:
        out: set[str] = set()
        for child in kind.children if kind else ():
            for k in slot.objects:
                if k.startswith(f"{child.name}/{key}/"):
                    out.add(k)
                    out |= self._descendants(slot, child, k.partition("/")[2])
        return out

    def _check_precondition(self, app: str, who: str, full: str, current: StoredObject | None,
                            if_revision: int | None, create_only: bool) -> None:
        have = current.revision if current else 0
        if (create_only and current) or (if_revision is not None and if_revision != have):
            message = object_conflict(app, full, have, 0 if create_only else if_revision or 0)
            self._record(app, who, "conflict", message)
            raise StateRejected(412, message)

    def _new_order(self, slot: AppSlot, candidate: dict[str, Obj], full: str, position: int | None) -> float:
        group = sibling_group(self._kinds(slot), full)
        keys = sorted((o.order, k) for k, o in candidate.items() if sibling_group(self._kinds(slot), k) == group)
        order = order_for_insert([o for o, _ in keys], position)
        if any(o == order for o, _ in keys):  # no float left between two neighbours: renumber them
            for index, (_, key) in enumerate(keys):
                candidate[key] = Obj(candidate[key].value, float(index))
            order = order_for_insert([float(i) for i in range(len(keys))], position)
        return order

    def _candidate_state(self, app: str, slot: AppSlot, who: str, candidate: dict[str, Obj],
                         what: str) -> tuple[BaseModel, dict[str, Obj]]:
        """The whole state the objects make, validated (StateRejected 422 if not), and its objects
        with the orders they had (validation may rename: a rule without id gets one)."""
        try:
            data = assemble(candidate, self._kinds(slot))
        except ObjectKeyError as err:
            self._record(app, who, "invalid", str(err))
            raise StateRejected(422, f"invalid {what}: {err}") from None
        state, objects = self._validate(app, slot, data, who, f"invalid {what}")
        return state, {k: Obj(o.value, candidate[k].order if k in candidate else o.order)
                       for k, o in objects.items()}

    # -- the one path every change takes --------------------------------------------------------

    def _validate(self, app: str, slot: AppSlot, data: Any, who: str,
                  what: str) -> tuple[BaseModel, dict[str, Obj]]:
        """The validated, normalized state and its objects (orders = list indices), or StateRejected."""
        cls = type(slot.controller)
        try:
            state = cls.state_model.model_validate(data)
        except ValidationError as err:
            message = validation_message(err)
            self._record(app, who, "invalid", message)
            raise StateRejected(422, f"{what}: {message}", errors=structured_errors(err)) from None
        try:
            state = cls.normalize(state)
        except ValueError as err:
            self._record(app, who, "invalid", str(err))
            raise StateRejected(422, f"{what}: {err}") from None
        not_finite = first_non_finite(state.model_dump(mode="json"))
        if not_finite is not None:  # a model without allow_inf_nan=False: JSON could not carry it
            where, value = not_finite
            message = f"{where}: {value} is not a finite number"
            self._record(app, who, "invalid", message)
            raise StateRejected(422, f"{what}: {message}") from None
        try:
            objects = split(state, self._kinds(slot))
        except ObjectKeyError as err:  # two objects with one key: a state the store cannot hold
            self._record(app, who, "invalid", str(err))
            raise StateRejected(422, f"{what}: {err}") from None
        return state, objects

    def _commit(self, app: str, slot: AppSlot, who: str, state: BaseModel, objects: dict[str, Obj],
                summary: str, *, expected_revision: int | None = None,
                expected: dict[str, int] | None = None) -> int:
        """Apply `state` to the data plane, then store the objects that changed; on a failure
        the data plane gets the previous state back. Called with the slot's lock held."""
        current = {k: o.obj for k, o in slot.objects.items()}
        puts, deletes = changes(current, objects)
        if not puts and not deletes:
            return slot.revision
        old_state = slot.state
        try:
            slot.controller.apply(state)
        except ApplyError as err:
            self._record(app, who, "refused", f"{summary} -- {err}")
            raise StateRejected(409, f"{app} refused the state: {err}") from None
        except Exception as err:
            log.exception("apply of %s failed unexpectedly", app)
            self._record(app, who, "failed", f"{summary} -- {type(err).__name__}: {err}")
            raise StateRejected(500, f"{app} failed to apply the state: {type(err).__name__}: {err}") from None
        entry = AuditEntry(self._wall_clock(), who, app, "applied", summary)
        try:
            revision = self.store.commit(app, puts, deletes, entry,
                                         expected_revision=expected_revision, expected=expected)
        except RevisionConflict as err:
            # another agent wrote to the store since this one last read it: the data plane goes back
            # to what this agent knew; the write is then based again on the store's state (_rebasing)
            self._reapply(app, slot, old_state)
            if err.key is None:
                raise _Stale(str(err)) from None
            self._record(app, who, "conflict", str(err))
            raise StateRejected(412, str(err)) from None
        except Exception as err:
            # the data plane runs the new state but the store has the old: put the old one back
            log.exception("saving the state of %s failed; re-applying the previous state", app)
            self._reapply(app, slot, old_state)
            raise StateRejected(503 if isinstance(err, StoreError) else 500,
                                f"could not save the state of {app}: {err}") from None
        for key in deletes:
            del slot.objects[key]
        for key, obj in puts.items():
            slot.objects[key] = StoredObject(obj.value, obj.order, revision)
        slot.state, slot.revision = state, revision
        return revision

    def _reapply(self, app: str, slot: AppSlot, state: BaseModel) -> None:
        try:
            slot.controller.apply(state)
        except Exception:
            log.exception("re-applying the previous state of %s failed", app)

    def _rebasing(self, app: str, write: Callable[[], T]) -> T:
        """Run `write`; when another agent wrote to the shared store since this agent last read it,
        read the store again and redo the write on top (the writer's own object checks still
        hold: only a change of that object is a 412)."""
        for _attempt in range(REBASE_ATTEMPTS - 1):
            try:
                return write()
            except _Stale:
                self.resync(app)
        try:
            return write()
        except _Stale as err:
            raise StateRejected(503, f"{app}: the store kept changing under this write ({err}); "
                                     "try again") from None

    def resync(self, app: str) -> bool:
        """Catch up with the store: load the app's objects and, if they moved on, apply them.
        A stored state that does not validate is not applied (the data plane keeps the last good
        one) and is reported by health(). Returns whether anything changed."""
        slot = self._slot(app)
        cls = type(slot.controller)
        with slot.lock:
            stored = self.store.load(app)
            if stored is None or stored.revision == slot.revision:
                return False
            try:
                state = cls.normalize(cls.state_model.model_validate(stored.whole(cls.object_kinds)))
            except (ValidationError, ValueError) as err:
                message = validation_message(err) if isinstance(err, ValidationError) else str(err)
                slot.store_error = f"revision {stored.revision} does not validate: {message}"
                log.error("%s: stored state %s", app, slot.store_error)
                return False
            try:
                slot.controller.apply(state)
            except Exception as err:
                slot.store_error = f"revision {stored.revision} not applied: {type(err).__name__}: {err}"
                log.exception("%s: applying stored revision %d failed", app, stored.revision)
                return False
            slot.state, slot.revision, slot.objects = state, stored.revision, dict(stored.objects)
            slot.store_error = None
            return True

    def _record(self, app: str, who: str, outcome: str, summary: str) -> None:
        try:
            self.store.record(AuditEntry(self._wall_clock(), who, app, outcome, summary))
        except Exception:
            log.exception("writing the audit log failed")

    # -- reading -------------------------------------------------------------------------------

    def stats(self, app: str) -> dict:
        slot = self._slot(app)
        with slot.lock:
            return slot.controller.stats()

    def query(self, app: str, name: str, params: dict) -> Any:
        """KeyError (with a message) when the app has no such query."""
        slot = self._slot(app)
        with slot.lock:
            try:
                return slot.controller.query(name, params)
            except KeyError as err:
                if err.args and err.args[0] != name:  # something the query looked up is missing
                    raise KeyError(f"{app} query {name}: {err.args[0]}") from None
                raise KeyError(f"app {app} has no query {shorten(repr(name), 80)}") from None

    def action(self, app: str, name: str, params: dict) -> Any:
        """KeyError (with a message) for an unknown action, ValueError for bad parameters."""
        slot = self._slot(app)
        with slot.lock:
            try:
                return slot.controller.action(name, params)
            except KeyError as err:
                if err.args and err.args[0] != name:
                    raise KeyError(f"{app} action {name}: {err.args[0]}") from None
                raise KeyError(f"app {app} has no action {shorten(repr(name), 80)}") from None

    def health(self) -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self._wall_clock() - self.started_at, 3) if self.started_at else 0.0,
            "ticks": self.ticks,
            "apps": {name: {"revision": slot.revision, "tick_errors": slot.tick_errors,
                            "last_tick_error": slot.last_tick_error, "metric_errors": slot.metric_errors,
                            "store_error": slot.store_error,
                            "watch_error": next((w.error for w in self._watches if w.app == name), None)}
                     for name, slot in self._slots.items()},
            **({"fleet": {"member": self.member, "members": sorted(self.membership.members),
                          "error": self.membership.error}} if self.membership is not None else {}),
        }

    def collect_app_metrics(self) -> Iterable[Metric]:
        for name, slot in list(self._slots.items()):
            with slot.lock:
                try:
                    metrics = list(slot.controller.metrics())
                except Exception:
                    slot.metric_errors += 1
                    log.exception("metrics of %s failed", name)
                    continue
            yield from metrics


class _AgentCollector(Collector):
    """Agent health gauges followed by every controller's own metrics."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        agent = self.agent
        yield GaugeMetricFamily("bpfnet_agent_up", "1 while the agent runs", value=1)
        health = agent.health()
        yield GaugeMetricFamily("bpfnet_agent_uptime_seconds", "Seconds since the agent started",
                                value=health["uptime_s"])
        yield CounterMetricFamily("bpfnet_agent_ticks", "Tick rounds run", value=agent.ticks)
        revision = GaugeMetricFamily("bpfnet_agent_state_revision", "Revision of each app's state",
                                     labels=["app"])
        tick_errors = CounterMetricFamily("bpfnet_agent_tick_errors", "Ticks that raised",
                                          labels=["app"])
        for name, app in health["apps"].items():
            revision.add_metric([name], app["revision"])
            tick_errors.add_metric([name], app["tick_errors"])
        yield revision
        yield tick_errors
        yield from agent.collect_app_metrics()
