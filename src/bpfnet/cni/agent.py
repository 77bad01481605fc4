"""Every call bpfnet-cni makes to the local agent, in one place.

A change is computed on the whole podnet state, then written object by object through the
per-object API (a pod, a namespace: PUT with If-None-Match: * to create, If-Match to replace,
DELETE), so parallel ADDs and DELs of different containers never conflict; a new pod's address is
left to the agent, which assigns it when it accepts the pod. A 412 on the same object (another
writer got in between) starts the change over with a growing pause.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from bpfnet.app.client import AgentClient, AgentNotRunning, AgentRequestError
from bpfnet.app.objects import SETTINGS, Obj, split
from bpfnet.cni.spec import AGENT_REFUSED, AGENT_UNAVAILABLE, TRY_AGAIN_LATER, CniError
from bpfnet.podnet.config import PODNET_OBJECTS, ConfigError, PodnetState

APP = "podnet"
ATTEMPTS = 8
FIRST_PAUSE = 0.02   # seconds; doubled after each conflict, with jitter
TIMEOUT = 60.0       # seconds for one request: applying a state makes veths and attaches programs


def change_pods(socket: Path, change: Callable[[PodnetState], PodnetState | None]) -> None:
    """Apply `change` to the agent's podnet state (None from it: nothing to do); errors as the
    spec's: 100 no agent, 101 refused (with the agent's message), 11 still conflicting."""
    pause = FIRST_PAUSE
    with _client(socket) as client:
        for _ in range(ATTEMPTS):
            raw, _revision = _read(client)
            current = PodnetState.model_validate(raw)
            try:
                new = change(current)
            except ConfigError as err:
                raise CniError(AGENT_REFUSED, str(err)) from None
            if new is None:
                return
            try:
                _write_objects(client, current, new)
                return
            except AgentNotRunning as err:
                raise CniError(AGENT_UNAVAILABLE, str(err)) from None
            except AgentRequestError as err:
                if err.status != 412:
                    raise CniError(AGENT_REFUSED, f"the agent refused the change: {err}") from None
            time.sleep(pause * (1 + random.random()))
            pause *= 2
    raise CniError(TRY_AGAIN_LATER, f"the podnet state kept changing under {ATTEMPTS} attempts to write it")


def _write_objects(client: AgentClient, current: PodnetState, new: PodnetState) -> None:
    """The objects that differ between `current` and `new`: namespaces, then pods, then deletions."""
    before, after = split(current, PODNET_OBJECTS), split(new, PODNET_OBJECTS)
    for key in sorted((k for k in after if k != SETTINGS and before.get(k, Obj({}, 0)).value != after[k].value),
                      key=lambda k: not k.startswith("namespaces/")):
        kind, _, name = key.partition("/")
        value = dict(after[key].value)
        if key not in before:
            if kind == "pods":
                value["address"] = None  # the agent assigns it, serialized with every other writer
            try:
                client.put_object(APP, kind, name, value, create_only=True)
            except AgentRequestError as err:
                if not (err.status == 412 and kind == "namespaces"):  # created by another ADD meanwhile
                    raise
            continue
        _value, revision = client.get_object(APP, kind, name)
        client.put_object(APP, kind, name, value, revision=revision)
    for key in sorted(k for k in before if k not in after):
        kind, _, name = key.partition("/")
        try:
            client.delete_object(APP, kind, name)
        except AgentRequestError as err:
            if err.status != 404:  # gone already: what was asked
                raise


def query(socket: Path, name: str, pod: str) -> dict | None:
    """The podnet query `name` ('sandbox', 'check') about pod `pod`; None when the agent knows no
    such pod (or it has no interface)."""
    with _client(socket) as client:
        try:
            return client.query(APP, name, pod=pod)
        except AgentNotRunning as err:
            raise CniError(AGENT_UNAVAILABLE, str(err)) from None
        except AgentRequestError as err:
            if err.status == 404:
                return None
            raise CniError(AGENT_REFUSED, f"the agent answered: {err}") from None


def attached(socket: Path, container_id: str, ifname: str) -> str | None:
    """The key of the pod attached to `container_id` as `ifname`, if any."""
    with _client(socket) as client:
        pod = PodnetState.model_validate(_read(client)[0]).attached(container_id, ifname)
    return pod.key if pod is not None else None


def _client(socket: Path) -> AgentClient:
    return AgentClient(socket, timeout=TIMEOUT)


def _read(client: AgentClient) -> tuple[dict, int]:
    try:
        return client.get_state_and_revision(APP)
    except AgentNotRunning as err:
        raise CniError(AGENT_UNAVAILABLE, str(err)) from None
    except AgentRequestError as err:
        raise CniError(AGENT_REFUSED, f"the agent answered: {err}") from None
