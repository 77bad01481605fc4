"""Controllers that only record what the agent tells them, for agent tests without a data plane."""

from __future__ import annotations

from pydantic import BaseModel

from bpfnet.app.controller import Controller


def recording(name: str, model: type[BaseModel], kinds: tuple) -> type[Controller]:
    """A controller class for app `name`: `applied` holds the state it started with, then each
    state it was told to apply."""

    class Recording(Controller):
        state_model = model
        object_kinds = kinds
        applied: list = []

        def start(self, state):
            type(self).applied = [state]

        def apply(self, state):
            type(self).applied.append(state)

        def stats(self):
            return {}

        def stop(self, detach):
            pass

    Recording.name = name
    return Recording
