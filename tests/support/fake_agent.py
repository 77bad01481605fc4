"""A stand-in for the agent behind `bpfnet.app.client.AgentClient`, for CLI tests without root.

`FakeAgent` is an `AgentClient` talking to a real in-process `Agent` (SQLite store in a temporary
directory, the real API through Starlette's test client), whose apps are controllers that only
record what they are told to apply, so every write a command makes goes through the agent's real
validation, per-object revisions and store. Stats and queries are answered from what the test
gives it. `install(monkeypatch, fake)` makes every command that goes through
`bpfnet.app.cli.call_agent` talk to it."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from pydantic import BaseModel

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent
from bpfnet.agent.store import SQLiteStore
from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.app.controller import Controller, load_controller
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState
from bpfnet.lb.config import LB_OBJECTS, LbState
from bpfnet.podnet.config import PODNET_OBJECTS, PodnetState

APPS: dict[str, tuple[type[BaseModel], tuple]] = {
    "lb": (LbState, LB_OBJECTS), "ddos": (DdosState, DDOS_OBJECTS), "podnet": (PodnetState, PODNET_OBJECTS)}


class FakeAgent(AgentClient):
    def __init__(self, states: dict[str, dict] | None = None, *, models: dict[str, type[BaseModel]] | None = None,
                 stats: dict[str, Any] | None = None,
                 queries: dict[str, Any | Callable[..., Any]] | None = None) -> None:
        """`states`: each app's state to start from; `queries`: name -> answer, or a function of
        the query's parameters that returns it."""
        self.stats_answers = stats or {}
        self.query_answers = queries or {}
        self.puts: list[dict] = []  # every state an app was told to apply, after the seeding
        self.queries: list[tuple[str, dict]] = []
        self.where = "a stand-in agent"
        directory = Path(tempfile.mkdtemp(prefix="bpfnet-fake-agent-"))
        apps = [self._recording(app, (models or {}).get(app)) for app in states or {}]
        self.agent = Agent(SQLiteStore(directory / "state.db"), apps, pin_root=directory / "pins",
                           tick_interval=3600)
        self.agent.start()
        weakref.finalize(self, _shut_down, self.agent, directory)
        for app, state in (states or {}).items():
            self.agent.put_state(app, state, "test seed")
        self.puts.clear()
        self._http = TestClient(create_api(self.agent), base_url="http://agent")

    def _recording(self, app: str, model: type[BaseModel] | None) -> type[Controller]:
        fake = self
        known_model, kinds = APPS[app]

        class Recording(Controller):
            name = app
            state_model = model or known_model
            object_kinds = kinds

            @classmethod
            def normalize(cls, state: BaseModel) -> BaseModel:
                return load_controller(app).normalize(state)  # what the real app fills in

            def start(self, state: BaseModel) -> None:
                pass

            def apply(self, state: BaseModel) -> None:
                fake.puts.append(state.model_dump(mode="json"))

            def stats(self) -> dict:
                return {}

            def stop(self, detach: bool) -> None:
                pass

        return Recording

    @property
    def states(self) -> dict[str, dict]:
        """Each app's state as the agent holds it."""
        return {app: self.agent.get_state(app)[0].model_dump(mode="json") for app in self.agent.apps}

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc) -> None:
        pass  # one client for every command of a test

    def stats(self, app: str) -> Any:
        return self.stats_answers[app]

    def query(self, app: str, name: str, **params: Any) -> Any:
        self.queries.append((name, params))
        if name not in self.query_answers:
            raise AgentRequestError(f"app {app} has no query {name!r}", 404)
        answer = self.query_answers[name]
        return answer(**params) if callable(answer) else answer


def _shut_down(agent: Agent, directory: Path) -> None:
    agent.stop()
    shutil.rmtree(directory, ignore_errors=True)


def install(monkeypatch, fake: Any) -> Any:
    """Every `AgentClient(...)` the CLI kit opens is `fake`; returns it."""
    monkeypatch.setattr("bpfnet.app.cli.AgentClient", lambda *args, **kwargs: fake)
    return fake


def podnet_agent(monkeypatch, **answers: Any) -> FakeAgent:
    """An installed FakeAgent holding an empty podnet state, validated on every write."""
    from bpfnet.podnet.config import PodnetState

    fake = FakeAgent({"podnet": PodnetState().model_dump(mode="json")}, models={"podnet": PodnetState}, **answers)
    return install(monkeypatch, fake)
