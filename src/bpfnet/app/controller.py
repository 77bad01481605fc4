"""The interface between the agent and an app (lb, ddos, podnet), and the registry of apps.

A controller owns its app's data plane (programs and maps pinned under `pin_root/<name>/`) and
makes it match a desired state. The agent owns the clock, the store and the API; a controller
never knows which store or transport it is served by.
"""

from __future__ import annotations

import abc
import importlib
import numbers
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel

from bpfnet.app.objects import ObjectKind
from bpfnet.errors import BpfnetError


class ApplyError(BpfnetError):
    """The data plane refused a desired state; the controller left the previous state in place."""


class UnknownAppError(BpfnetError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


StateT = TypeVar("StateT", bound=BaseModel)


class Controller(abc.ABC, Generic[StateT]):
    """One app inside the agent. Sans-IO where possible: the agent passes `now` to `tick`."""

    name: ClassVar[str]
    state_model: ClassVar[type[BaseModel]]  # every field needs a default: an app starts empty
    # the lists of the state that are objects of their own (per-object API, one store key each);
    # the rest of the state is the object `settings`
    object_kinds: ClassVar[tuple[ObjectKind, ...]] = ()

    def __init__(self, pin_root: Path) -> None:
        self.pin_root = pin_root

    @classmethod
    def normalize(cls, state: StateT) -> StateT:
        """Fill in what the app assigns itself (podnet: pod addresses) once, when a state is
        accepted, so that the store keeps it and it never moves; ValueError if it cannot."""
        return state

    @abc.abstractmethod
    def start(self, state: StateT) -> None:
        """Load programs and maps, or adopt pinned ones, then apply `state`."""

    @abc.abstractmethod
    def apply(self, state: StateT) -> None:
        """Make the data plane match `state`; raise ApplyError and keep the old state on failure."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """JSON-able counters, shown by `stats` and exported by /metrics."""

    def members_changed(self, members: set[str] | None) -> None:  # noqa: B027 (optional hook)
        """The fleet's hosts whose agents hold a live lease in the shared store (None: unknown,
        as with one agent). podnet stops routing to the pods of a node that is gone."""

    def tick(self, now: float) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Called about every 0.2 s (health checks, expiry, detection); `now` is monotonic."""

    def query(self, name: str, params: dict) -> Any:
        """Read-only questions such as "flows" or "events"; KeyError for an unknown name."""
        raise KeyError(name)

    def action(self, name: str, params: dict) -> Any:
        """A short-lived data-plane operation outside the desired state (e.g. ddos capture), which
        the controller owns and undoes itself when its lease runs out; KeyError for an unknown
        name, ValueError for bad parameters."""
        raise KeyError(name)

    def metrics(self) -> Iterable[Metric]:
        """Prometheus metrics; by default every number in stats() as a gauge."""
        return stats_metrics(self.name, self.stats())

    @abc.abstractmethod
    def stop(self, detach: bool) -> None:
        """Release resources; detach=False leaves the pinned data plane running (agent restart)."""

    @classmethod
    def pinned_objects(cls, pin_root: Path) -> list[Path]:
        """Pinned programs and maps of this app under `pin_root/<name>/`: a data plane an earlier
        agent left running, which `start` would adopt."""
        root = Path(pin_root) / cls.name
        try:
            return sorted(p for p in root.rglob("*") if not p.is_dir())
        except OSError:
            return []


def _numeric_leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numeric_leaves(item, (*path, str(key)))
    elif isinstance(value, numbers.Real):  # bool included: up/down flags become 1/0
        yield path, float(value)


def _metric_name(*parts: str) -> str:
    return "_".join("".join(c if c.isalnum() else "_" for c in part) for part in parts)


def stats_metrics(app: str, stats: dict) -> list[Metric]:
    """Gauges from a stats dict: {"rx": 5} -> bpfnet_<app>_rx 5, and the last level of a nested
    dict becomes a label: {"drops": {"ttl": 2}} -> bpfnet_<app>_drops{key="ttl"} 2."""
    families: dict[str, GaugeMetricFamily] = {}
    for path, number in _numeric_leaves(stats, ()):
        labelled = len(path) > 1
        name = _metric_name("bpfnet", app, *(path[:-1] if labelled else path))
        if name not in families:
            families[name] = GaugeMetricFamily(name, f"{app} stats: {'.'.join(path[:-1] or path)}",
                                               labels=["key"] if labelled else None)
        families[name].add_metric([path[-1]] if labelled else [], number)
    return list(families.values())


# name -> controller class; filled by register() when an app's controller module is imported
CONTROLLERS: dict[str, type[Controller]] = {}
# apps shipped with bpfnet, imported only when enabled
BUILTIN_APPS = {"lb": "bpfnet.lb.controller", "ddos": "bpfnet.ddos.controller",
                "podnet": "bpfnet.podnet.controller"}


def register(cls: type[Controller]) -> type[Controller]:
    """Class decorator (or plain call) that makes an app available to the agent."""
    if not getattr(cls, "name", None) or not isinstance(getattr(cls, "state_model", None), type):
        raise TypeError(f"{cls.__name__} needs class attributes `name` and `state_model`")
    CONTROLLERS[cls.name] = cls
    return cls


def available_apps() -> list[str]:
    """Built-in apps whose controller module is installed (the default set to enable)."""
    names = []
    for name, module in BUILTIN_APPS.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (module + ".").startswith(err.name + "."):
                continue  # not installed
            # otherwise the module is there but broken: keep it, so loading it says why
        names.append(name)
    return names


def load_controller(spec: str) -> type[Controller]:
    """The controller class for an app name ("lb") or an import path ("package.module:Class")."""
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise UnknownAppError(f"cannot load controller {spec!r}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Controller)):
            raise UnknownAppError(f"{spec!r} is not a Controller subclass")
        return register(cls)
    if spec not in CONTROLLERS:
        if spec not in BUILTIN_APPS:
            known = ", ".join(sorted(set(BUILTIN_APPS) | set(CONTROLLERS)))
            raise UnknownAppError(f"unknown app {spec!r}: known apps are {known}")
        try:
            importlib.import_module(BUILTIN_APPS[spec])
        except ImportError as err:
            raise UnknownAppError(f"app {spec!r} is not available: {err}") from None
        if spec not in CONTROLLERS:
            raise UnknownAppError(f"{BUILTIN_APPS[spec]} did not register a controller named {spec!r}")
    return CONTROLLERS[spec]
