"""Every call bpfnet-cni makes to the local agent, in one place.

Writes are a read-modify-write of the whole podnet state (GET with its ETag, PUT with If-Match),
started over with a growing pause when another writer got in between (412): the per-object API
(PUT/DELETE /v1/apps/podnet/objects/pod/{key}) will replace `change_pods` here alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from bpfnet.app.client import AgentClient, AgentNotRunning, AgentRequestError
from bpfnet.cni.spec import AGENT_REFUSED, AGENT_UNAVAILABLE, TRY_AGAIN_LATER, CniError
from bpfnet.podnet.config import ConfigError, PodnetState

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
            raw, revision = _read(client)
            try:
                new = change(PodnetState.model_validate(raw))
            except ConfigError as err:
                raise CniError(AGENT_REFUSED, str(err)) from None
            if new is None:
                return
            try:
                client.put_state(APP, new.dump(), revision=revision)
                return
            except AgentNotRunning as err:
                raise CniError(AGENT_UNAVAILABLE, str(err)) from None
            except AgentRequestError as err:
                if err.status != 412:
                    raise CniError(AGENT_REFUSED, f"the agent refused the change: {err}") from None
            time.sleep(pause * (1 + random.random()))
            pause *= 2
    raise CniError(TRY_AGAIN_LATER, f"the podnet state kept changing under {ATTEMPTS} attempts to write it")


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
