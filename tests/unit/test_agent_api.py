"""The agent's API over FastAPI's TestClient, with an in-test controller instead of a real app."""

from __future__ import annotations

import time
from ipaddress import IPv4Address

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent, AgentStartError
from bpfnet.agent.store import SQLiteStore
from bpfnet.app.controller import ApplyError, Controller


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: IPv4Address
    port: int = Field(ge=1, le=65535)


class DummyState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backends: list[Backend] = []
    limit: int = Field(default=10, ge=1)


class DummyController(Controller):
    """Records every call; refuses port 666 like a data plane refusing a map update."""

    name = "dummy"
    state_model = DummyState
    instances: list[DummyController] = []

    def __init__(self, pin_root):
        super().__init__(pin_root)
        self.started_with: DummyState | None = None
        self.applied: list[DummyState] = []
        self.ticks: list[float] = []
        self.fail_ticks = False
        self.stopped: bool | None = None
        DummyController.instances.append(self)

    def start(self, state):
        self.started_with = state

    def apply(self, state):
        if any(b.port == 666 for b in state.backends):
            raise ApplyError("port 666 is not allowed by the data plane")
        self.applied.append(state)

    def stats(self):
        return {"applied": len(self.applied), "drops": {"no_backend": 3, "ttl": 1}, "up": True}

    def tick(self, now):
        if self.fail_ticks:
            raise RuntimeError("health check exploded")
        self.ticks.append(now)

    def query(self, name, params):
        if name == "backends":
            limit = int(params.get("limit", 100))
            return [str(b.address) for b in (self.applied[-1].backends if self.applied else [])][:limit]
        raise KeyError(name)

    def stop(self, detach):
        self.stopped = detach


ONE_BACKEND = {"backends": [{"address": "10.0.0.1", "port": 80}]}


@pytest.fixture
def agent(tmp_path):
    DummyController.instances.clear()
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [DummyController], pin_root=tmp_path / "pins",
                  tick_interval=3600)  # ticks driven by the tests through tick_once()
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(agent):
    return TestClient(create_api(agent))


def controller() -> DummyController:
    return DummyController.instances[-1]


def test_fresh_app_starts_from_the_model_defaults(client):
    assert controller().started_with == DummyState()
    response = client.get("/v1/apps/dummy/state")
    assert response.status_code == 200
    assert response.json() == {"backends": [], "limit": 10}
    assert response.headers["etag"] == '"0"'
    assert client.get("/v1/apps").json() == [{"name": "dummy", "revision": 0}]


def test_put_applies_then_persists_and_bumps_the_revision(client):
    response = client.put("/v1/apps/dummy/state", json=ONE_BACKEND)
    assert response.status_code == 200
    assert response.json() == {"app": "dummy", "revision": 1, "summary": "+backends[0]"}
    assert controller().applied == [DummyState.model_validate(ONE_BACKEND)]
    got = client.get("/v1/apps/dummy/state")
    assert got.json() == {"backends": [{"address": "10.0.0.1", "port": 80}], "limit": 10}
    assert got.headers["etag"] == '"1"'


@pytest.mark.parametrize("body, message", [
    ({"backends": [{"address": "10.0.0.1", "port": 70000}]},
     "backends.0.port: Input should be less than or equal to 65535 (input: 70000)"),
    ({"backends": [{"address": "10.0.0.300", "port": 80}]}, "backends.0.address: Input is not a valid IPv4 address"),
    ({"limit": 0}, "limit: Input should be greater than or equal to 1 (input: 0)"),
    ({"limitt": 5}, "limitt: Extra inputs are not permitted"),
    ([1, 2], "Input should be a valid dictionary or instance of DummyState"),
])
def test_invalid_state_is_422_with_the_pydantic_message_and_changes_nothing(client, body, message):
    client.put("/v1/apps/dummy/state", json=ONE_BACKEND)
    response = client.put("/v1/apps/dummy/state", json=body)
    assert response.status_code == 422
    assert response.json()["message"].startswith("invalid state for dummy: ")
    assert message in response.json()["message"]
    assert response.json()["errors"][0]["type"]  # pydantic's structured errors for programs
    assert len(controller().applied) == 1  # never reached the data plane
    assert client.get("/v1/apps/dummy/state").json()["backends"][0]["port"] == 80
    assert client.get("/v1/apps/dummy/state").headers["etag"] == '"1"'


def test_body_that_is_not_json_is_422(client):
    response = client.put("/v1/apps/dummy/state", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "body is not JSON" in response.json()["message"]


def test_apply_error_is_409_and_leaves_state_and_store_unchanged(client, agent):
    client.put("/v1/apps/dummy/state", json=ONE_BACKEND)
    refused = {"backends": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.2", "port": 666}]}
    response = client.put("/v1/apps/dummy/state", json=refused)
    assert response.status_code == 409
    assert response.json() == {"message": "dummy refused the state: port 666 is not allowed by the data plane"}
    assert client.get("/v1/apps/dummy/state").json() == {"backends": [{"address": "10.0.0.1", "port": 80}],
                                                         "limit": 10}
    assert agent.store.load("dummy").revision == 1
    assert agent.store.load("dummy").whole()["backends"] == [{"address": "10.0.0.1", "port": 80}]


def test_if_match_guards_read_modify_write(client):
    first = client.put("/v1/apps/dummy/state", json=ONE_BACKEND, headers={"If-Match": '"0"'})
    assert first.status_code == 200
    stale = client.put("/v1/apps/dummy/state", json={"limit": 3}, headers={"If-Match": '"0"'})
    assert stale.status_code == 412
    assert stale.json()["message"] == "state of dummy is at revision 1, not 0: read it again"
    assert client.get("/v1/apps/dummy/state").json()["limit"] == 10
    bad = client.put("/v1/apps/dummy/state", json={"limit": 3}, headers={"If-Match": "latest"})
    assert bad.status_code == 400


def test_unknown_app_and_unknown_query_are_404(client):
    response = client.get("/v1/apps/nope/state")
    assert response.status_code == 404
    assert response.json()["message"] == "app 'nope' is not enabled in this agent (enabled: dummy)"
    assert client.put("/v1/apps/nope/state", json={}).status_code == 404
    response = client.get("/v1/apps/dummy/query/flows")
    assert response.status_code == 404
    assert response.json()["message"] == "app dummy has no query 'flows'"


def test_stats_query_and_schema(client):
    client.put("/v1/apps/dummy/state", json={"backends": [{"address": "10.0.0.1", "port": 80},
                                                          {"address": "10.0.0.2", "port": 81}]})
    assert client.get("/v1/apps/dummy/stats").json() == {"applied": 1, "drops": {"no_backend": 3, "ttl": 1},
                                                          "up": True}
    assert client.get("/v1/apps/dummy/query/backends").json() == ["10.0.0.1", "10.0.0.2"]
    assert client.get("/v1/apps/dummy/query/backends", params={"limit": 1}).json() == ["10.0.0.1"]
    assert client.get("/v1/apps/dummy/query/backends", params={"limit": "x"}).status_code == 400
    assert "backends" in client.get("/v1/apps/dummy/schema").json()["properties"]


def test_metrics_has_agent_health_and_controller_stats(client, agent):
    client.put("/v1/apps/dummy/state", json=ONE_BACKEND)
    agent.tick_once()
    text = client.get("/metrics").text
    assert "bpfnet_agent_up 1.0" in text
    assert "bpfnet_agent_ticks_total 1.0" in text
    assert 'bpfnet_agent_state_revision{app="dummy"} 1.0' in text
    assert 'bpfnet_agent_tick_errors_total{app="dummy"} 0.0' in text
    assert "bpfnet_dummy_applied 1.0" in text
    assert 'bpfnet_dummy_drops{key="no_backend"} 3.0' in text
    assert "bpfnet_dummy_up 1.0" in text


def test_every_put_is_audited_with_who_what_and_outcome(client):
    client.put("/v1/apps/dummy/state", json=ONE_BACKEND)
    client.put("/v1/apps/dummy/state", json={"backends": [{"address": "10.0.0.1", "port": 8080}]})
    client.put("/v1/apps/dummy/state", json={"limit": -1})
    client.put("/v1/apps/dummy/state", json={"backends": [{"address": "10.0.0.1", "port": 666}]})
    entries = client.get("/v1/audit").json()
    assert [(e["outcome"], e["revision"]) for e in entries] == [
        ("refused", None), ("invalid", None), ("applied", 2), ("applied", 1)]
    assert entries[3]["summary"] == "+backends[0]"
    assert entries[2]["summary"] == "~backends[0].port: 80 -> 8080"
    assert entries[1]["summary"].startswith("limit: Input should be greater than or equal to 1")
    assert entries[0]["summary"] == "~backends[0].port: 8080 -> 666 -- port 666 is not allowed by the data plane"
    assert all(e["who"] == "testclient" and e["app"] == "dummy" for e in entries)
    assert entries[0]["time"] >= entries[3]["time"] > time.time() - 3600
    assert len(client.get("/v1/audit", params={"limit": 2}).json()) == 2
    assert client.get("/v1/audit", params={"app": "other"}).json() == []


def test_state_survives_a_restart(tmp_path):
    DummyController.instances.clear()
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [DummyController], pin_root=tmp_path, tick_interval=3600)
    agent.start()
    TestClient(create_api(agent)).put("/v1/apps/dummy/state", json=ONE_BACKEND)
    agent.stop(detach=False)
    assert controller().stopped is False  # the pinned data plane keeps running

    restarted = Agent(SQLiteStore(tmp_path / "state.db"), [DummyController], pin_root=tmp_path,
                      tick_interval=3600)
    restarted.start()
    try:
        assert controller().started_with == DummyState.model_validate(ONE_BACKEND)
        response = TestClient(create_api(restarted)).get("/v1/apps/dummy/state")
        assert response.json()["backends"] == [{"address": "10.0.0.1", "port": 80}]
        assert response.headers["etag"] == '"1"'
    finally:
        restarted.stop()


def test_a_stored_state_that_no_longer_validates_stops_the_start(tmp_path):
    from bpfnet.agent.store import AuditEntry
    from bpfnet.app.objects import Obj

    store = SQLiteStore(tmp_path / "state.db")
    store.commit("dummy", {"settings": Obj({"limit": "many"}, 0.0)}, [],
                 AuditEntry(0.0, "test", "dummy", "applied", "x"))
    agent = Agent(store, [DummyController], pin_root=tmp_path)
    with pytest.raises(AgentStartError, match=r"dummy: stored state \(revision 1\) does not validate: limit: "):
        agent.start()


def test_tick_errors_are_counted_not_fatal(client, agent):
    controller().fail_ticks = True
    agent.tick_once()
    agent.tick_once()
    controller().fail_ticks = False
    agent.tick_once()
    health = client.get("/v1/health").json()
    assert health["ticks"] == 3
    assert health["apps"]["dummy"]["tick_errors"] == 2
    assert health["apps"]["dummy"]["last_tick_error"] == "RuntimeError: health check exploded"
    assert len(controller().ticks) == 1


def test_the_tick_thread_runs_ticks_with_the_agent_clock(tmp_path):
    DummyController.instances.clear()
    clock = iter(range(1, 10**6))
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [DummyController], pin_root=tmp_path,
                  tick_interval=0.001, clock=lambda: float(next(clock)))
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while len(controller().ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        agent.stop()
    assert controller().ticks[:3] == [1.0, 2.0, 3.0]


def test_a_controller_that_fails_to_start_stops_the_agent_start(tmp_path):
    class Broken(DummyController):
        name = "broken"

        def start(self, state):
            raise OSError("bpffs is not mounted")

    agent = Agent(SQLiteStore(tmp_path / "state.db"), [DummyController, Broken], pin_root=tmp_path)
    with pytest.raises(AgentStartError, match="broken failed to start: OSError: bpffs is not mounted"):
        agent.start()
    assert DummyController.instances[-2].stopped is False  # the app started before it was stopped again
    assert agent.apps == []


def test_enabling_an_app_twice_is_refused(tmp_path):
    with pytest.raises(AgentStartError, match="an app is enabled twice"):
        Agent(SQLiteStore(tmp_path / "state.db"), [DummyController, DummyController])
