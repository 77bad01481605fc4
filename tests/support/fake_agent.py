"""A stand-in for the agent behind `bpfnet.app.client.AgentClient`, for CLI tests without root.

`FakeAgent` holds each app's state as the agent's store does (a deep copy out, the whole state in;
with a model for the app, a state that does not validate is refused as the agent's PUT refuses it)
and answers stats and queries from what the test gives it. `install(monkeypatch, fake)` makes every
command that goes through `bpfnet.app.cli.call_agent` talk to it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from bpfnet.app.client import AgentRequestError


class FakeAgent:
    def __init__(self, states: dict[str, dict] | None = None, *, models: dict[str, type[BaseModel]] | None = None,
                 stats: dict[str, Any] | None = None,
                 queries: dict[str, Any | Callable[..., Any]] | None = None) -> None:
        """`queries`: name -> answer, or a function of the query's parameters that returns it."""
        self.states: dict[str, dict] = states or {}
        self.models = models or {}
        self.stats_answers = stats or {}
        self.query_answers = queries or {}
        self.puts: list[dict] = []
        self.queries: list[tuple[str, dict]] = []

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def get_state(self, app: str) -> dict:
        return copy.deepcopy(self.states[app])

    def put_state(self, app: str, state: dict, revision: int | None = None) -> dict:
        if app in self.models:
            self.models[app].model_validate(state)  # what the agent's PUT validates
        self.states[app] = state
        self.puts.append(state)
        return {"app": app, "revision": len(self.puts)}

    def update_state(self, app: str, change: Callable[[dict], dict]) -> dict:
        return self.put_state(app, change(self.get_state(app)))

    def stats(self, app: str) -> Any:
        return self.stats_answers[app]

    def query(self, app: str, name: str, **params: Any) -> Any:
        self.queries.append((name, params))
        if name not in self.query_answers:
            raise AgentRequestError(f"app {app} has no query {name!r}", 404)
        answer = self.query_answers[name]
        return answer(**params) if callable(answer) else answer


def install(monkeypatch, fake: Any) -> Any:
    """Every `AgentClient(...)` the CLI kit opens is `fake`; returns it."""
    monkeypatch.setattr("bpfnet.app.cli.AgentClient", lambda *args, **kwargs: fake)
    return fake


def podnet_agent(monkeypatch, **answers: Any) -> FakeAgent:
    """An installed FakeAgent holding an empty podnet state, validated on every write."""
    from bpfnet.podnet.config import PodnetState

    fake = FakeAgent({"podnet": PodnetState().model_dump(mode="json")}, models={"podnet": PodnetState}, **answers)
    return install(monkeypatch, fake)
