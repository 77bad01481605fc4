"""The agent: the enabled apps' controllers, their desired state in a store, and the tick clock.

Every change follows one path: validate with the app's model, apply to the data plane, and only
then persist (state and audit entry together). A refused change leaves data plane, memory and
store as they were. Calls into one controller are serialized by its lock; apps run side by side.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, ValidationError

from bpfnet import __version__
from bpfnet.agent.audit import diff_summary
from bpfnet.agent.store import AuditEntry, Store, StoreError
from bpfnet.app.controller import ApplyError, Controller, UnknownAppError, load_controller
from bpfnet.app.paths import DEFAULT_PIN_ROOT
from bpfnet.app.validation import shorten, structured_errors, validation_message
from bpfnet.configfile import first_non_finite
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)

TICK_INTERVAL = 0.2


class AgentStartError(BpfnetError, RuntimeError):
    """The agent could not start, or a stored state no longer fits its app."""


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
    lock: threading.Lock = field(default_factory=threading.Lock)
    tick_errors: int = 0
    last_tick_error: str | None = None
    metric_errors: int = 0


class Agent:
    def __init__(self, store: Store, apps: Sequence[str | type[Controller]], *,
                 pin_root: Path = DEFAULT_PIN_ROOT, tick_interval: float = TICK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, adopt_empty: bool = False) -> None:
        """`adopt_empty`: an app with no stored state may take over (and empty) a pinned data plane
        left by an earlier agent; without it the start is refused (a lost or new state DB must not
        silently wipe VIPs and rules that are forwarding)."""
        self.store = store
        self.adopt_empty = adopt_empty
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
            state = cls.state_model.model_validate(stored.state if stored else {})
        except ValidationError as err:
            where = f"stored state (revision {stored.revision})" if stored else "default state"
            raise AgentStartError(f"{cls.name}: {where} does not validate: {validation_message(err)}") from None
        log.info("starting %s at revision %d", cls.name, stored.revision if stored else 0)
        try:
            controller = cls(self.pin_root)
            controller.start(state)
        except Exception as err:
            log.exception("starting %s failed", cls.name)
            raise AgentStartError(f"{cls.name} failed to start: {type(err).__name__}: {err}") from err
        self._slots[cls.name] = AppSlot(controller, state, stored.revision if stored else 0)
        if stored is None and cls.pinned_objects(self.pin_root) and not self._audited(cls.name):
            how = f"adopted {len(pinned)} pinned objects (--adopt-empty)" if pinned else "new data plane"
            self._record(cls.name, f"agent pid={os.getpid()}", "started", f"{how}: default state applied")

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
        """Validate, apply, persist; returns (revision, change summary) or raises StateRejected."""
        slot = self._slot(app)
        cls = type(slot.controller)
        try:
            state = cls.state_model.model_validate(data)
        except ValidationError as err:
            message = validation_message(err)
            self._record(app, who, "invalid", message)
            raise StateRejected(422, f"invalid state for {app}: {message}", errors=structured_errors(err)) from None
        new_json = state.model_dump(mode="json")
        not_finite = first_non_finite(new_json)
        if not_finite is not None:  # a model without allow_inf_nan=False: JSON could not carry it
            where, value = not_finite
            message = f"{where}: {value} is not a finite number"
            self._record(app, who, "invalid", message)
            raise StateRejected(422, f"invalid state for {app}: {message}") from None
        with slot.lock:
            if if_revision is not None and if_revision != slot.revision:
                message = f"state of {app} is at revision {slot.revision}, not {if_revision}: read it again"
                self._record(app, who, "conflict", message)
                raise StateRejected(412, message)
            old_state = slot.state
            summary = diff_summary(old_state.model_dump(mode="json"), new_json)
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
                revision = self.store.save(app, new_json, entry, expected_revision=slot.revision)
            except Exception as err:
                # the data plane runs the new state but the store has the old: put the old one back
                log.exception("saving the state of %s failed; re-applying the previous state", app)
                try:
                    slot.controller.apply(old_state)
                except Exception:
                    log.exception("re-applying the previous state of %s failed", app)
                raise StateRejected(500, f"could not save the state of {app}: {err}") from None
            slot.state, slot.revision = state, revision
        return revision, summary

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
                            "last_tick_error": slot.last_tick_error, "metric_errors": slot.metric_errors}
                     for name, slot in self._slots.items()},
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
