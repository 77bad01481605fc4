"""Issue 14, defect 3: capture is an agent-owned lease, not a side door into the config map."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent
from bpfnet.agent.store import SQLiteStore
from bpfnet.ddos.controller import MAX_CAPTURE_LEASE, DdosController
from bpfnet.ddos.dataplane import CAPTURE_DROP, CAPTURE_PASS


class FakeDataplane:
    def __init__(self) -> None:
        self.capture = 0
        self.writes: list[int] = []

    def set_config(self, sample_every=None, capture=None):
        if capture is not None:
            self.capture = capture
            self.writes.append(capture)

    def close(self):
        pass


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def controller(tmp_path):
    clock = Clock()
    controller = DdosController(tmp_path, monotonic=clock)
    controller.dataplane = FakeDataplane()
    controller.clock = clock
    return controller


def test_a_lease_not_renewed_is_cleared_by_the_agent(controller):
    granted = controller.capture("drop", lease_s=3)
    assert granted["capture"] == CAPTURE_DROP and controller.dataplane.capture == CAPTURE_DROP
    controller.clock.now += 2
    controller.capture("drop", lease_s=3, lease=granted["lease"])  # renewed
    controller.clock.now += 2.5
    controller._expire_captures()
    assert controller.dataplane.capture == CAPTURE_DROP
    controller.clock.now += 1  # the client was killed: no renewal
    controller._expire_captures()
    assert controller.dataplane.capture == 0 and controller.captures == {}
    with pytest.raises(ValueError, match="unknown or expired lease"):
        controller.capture("drop", lease_s=3, lease=granted["lease"])


def test_two_captures_union_and_ending_one_keeps_the_other(controller):
    drops = controller.capture("drop")["lease"]
    passes = controller.capture("pass")["lease"]
    assert controller.dataplane.capture == CAPTURE_DROP | CAPTURE_PASS
    controller.capture("off", lease=drops)
    assert controller.dataplane.capture == CAPTURE_PASS
    controller.capture("off", lease=passes)
    assert controller.dataplane.capture == 0


@pytest.mark.parametrize("verdict, lease_s", [("everything", 3), ("drop", 0), ("drop", MAX_CAPTURE_LEASE + 1),
                                              ("drop", float("inf")), ("drop", "3"), ("drop", True)])
def test_bad_capture_parameters_are_refused(controller, verdict, lease_s):
    with pytest.raises(ValueError):
        controller.capture(verdict, lease_s=lease_s)
    assert controller.dataplane.capture == 0


def test_stopping_the_agent_clears_the_flag(controller):
    dataplane = controller.dataplane
    controller.capture("all")
    controller.stop(detach=False)
    assert dataplane.capture == 0


def test_the_action_route(tmp_path):
    from pydantic import BaseModel

    from bpfnet.app.controller import Controller

    class State(BaseModel):
        pass

    class WithAction(Controller):
        name = "acting"
        state_model = State

        def start(self, state): pass
        def apply(self, state): pass
        def stats(self): return {}
        def stop(self, detach): pass

        def action(self, name, params):
            if name != "poke":
                raise KeyError(name)
            if params.get("n", 0) < 0:
                raise ValueError("n must be >= 0")
            return {"poked": params.get("n", 0)}

    agent = Agent(SQLiteStore(tmp_path / "s.db"), [WithAction], pin_root=tmp_path / "pins")
    agent.start()
    try:
        client = TestClient(create_api(agent))
        assert client.post("/v1/apps/acting/actions/poke", json={"n": 2}).json() == {"poked": 2}
        response = client.post("/v1/apps/acting/actions/nope", json={})
        assert response.status_code == 404 and "app acting has no action 'nope'" in response.json()["message"]
        response = client.post("/v1/apps/acting/actions/poke", json={"n": -1})
        assert response.status_code == 400 and "n must be >= 0" in response.json()["message"]
        assert client.post("/v1/apps/acting/actions/poke", json=[1]).status_code == 422
        assert client.post("/v1/apps/other/actions/poke", json={}).status_code == 404
    finally:
        agent.stop()
