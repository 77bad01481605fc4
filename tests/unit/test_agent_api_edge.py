"""The agent's edge: whatever a client sends, the answer is a 4xx JSON message naming the problem,
and the app's state does not move. The root soak test (tests/e2e/test_api_soak.py) sends thousands
of such requests to the real apps; these are the cases, one by one, on a toy app."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bpfnet.agent.api import MAX_BODY_BYTES, MAX_JSON_DEPTH, create_api
from bpfnet.agent.core import Agent, StateRejected
from bpfnet.agent.store import SQLiteStore
from bpfnet.app.controller import Controller
from bpfnet.app.validation import shorten


class ToyState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "toy"
    ratio: float = Field(1.0, ge=0)


class ToyController(Controller):
    name = "toy"
    state_model = ToyState

    def start(self, state):
        self.applied = [state]

    def apply(self, state):
        self.applied.append(state)

    def stats(self):
        return {"applied": len(self.applied)}

    def query(self, name, params):
        if name == "item":
            items = {"a": 1}
            if params.get("key") not in items:
                raise KeyError(f"item {params.get('key')!r} does not exist")
            return items[params["key"]]
        raise KeyError(name)

    def stop(self, detach):
        pass


@pytest.fixture
def agent(tmp_path):
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [ToyController], pin_root=tmp_path / "pins",
                  tick_interval=3600)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(agent):
    api = TestClient(create_api(agent), raise_server_exceptions=False)
    assert api.put("/v1/apps/toy/state", json={"name": "first"}).status_code == 200
    return api


def unchanged(client: TestClient) -> None:
    response = client.get("/v1/apps/toy/state")
    assert response.json() == {"name": "first", "ratio": 1.0}
    assert response.headers["etag"] == '"1"'


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body, status, message", [
    (b'{"ratio": NaN}', 422, "NaN is not a JSON number"),
    (b'{"ratio": Infinity}', 422, "Infinity is not a JSON number"),
    (b'{"ratio": -Infinity}', 422, "-Infinity is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, 422, f"body nests deeper than {MAX_JSON_DEPTH} levels"),
    (b'{"name": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", 422,
     f"body nests deeper than {MAX_JSON_DEPTH} levels"),
    (b"\xff\xfe\x00garbage", 422, "body is not JSON"),
    (b"", 422, "body is empty"),
    (b"   \n", 422, "body is empty"),
    (b'{"name": "x"', 422, "body is not JSON"),
    (b"x" * (MAX_BODY_BYTES + 1), 413, f"over the limit of {MAX_BODY_BYTES} bytes"),
])
def test_bodies_that_are_not_strict_json_are_refused(client, body, status, message):
    response = client.put("/v1/apps/toy/state", content=body, headers=JSON)
    assert response.status_code == status
    assert message in response.json()["message"]
    assert response.json()["message"].startswith("invalid state for toy: ")
    unchanged(client)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_a_body_that_says_it_is_not_json_is_415(client, content_type):
    response = client.put("/v1/apps/toy/state", content=b'{"name": "second"}',
                          headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["message"] == (f"invalid state for toy: Content-Type must be "
                                          f"application/json, not {content_type!r}")
    unchanged(client)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/merge-patch+json", None])
def test_json_media_types_and_no_content_type_are_accepted(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.put("/v1/apps/toy/state", content=b'{"name": "second"}', headers=headers)
    assert response.status_code == 200, response.text
    assert client.get("/v1/apps/toy/state").json()["name"] == "second"


def test_an_unknown_app_is_404_before_its_body_is_read(client):
    response = client.put("/v1/apps/nope/state", content=b"not json", headers=JSON)
    assert response.status_code == 404
    assert response.json()["message"] == "app 'nope' is not enabled in this agent (enabled: toy)"


def test_huge_inputs_are_echoed_shortened(client):
    response = client.put("/v1/apps/toy/state", json={"name": 5, "ratio": "y" * 1_000_000})
    assert response.status_code == 422
    message = response.json()["message"]
    assert len(message) < 1000
    assert "name: Input should be a valid string (input: 5)" in message
    assert "ratio: Input should be a valid number" in message and "(1000002 chars)" in message
    assert response.json()["errors"] == [
        {"type": "string_type", "loc": ["name"], "msg": "Input should be a valid string"},
        {"type": "float_parsing", "loc": ["ratio"],
         "msg": "Input should be a valid number, unable to parse string as a number"}]
    unchanged(client)


def test_many_errors_are_counted_not_listed(client):
    response = client.put("/v1/apps/toy/state", json={f"extra{i}": i for i in range(50)})
    assert response.status_code == 422
    message = response.json()["message"]
    assert message.count("Extra inputs are not permitted") == 5
    assert message.endswith("and 45 more errors")
    assert len(response.json()["errors"]) == 50


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/v1/nope", 404, "no such endpoint: GET /v1/nope"),
    ("GET", "/", 404, "no such endpoint: GET /"),
    ("POST", "/v1/apps/toy/nope", 404, "no such endpoint: POST /v1/apps/toy/nope"),
    ("DELETE", "/v1/apps/toy/state", 405, "method DELETE is not allowed on /v1/apps/toy/state (allowed: "),
    ("POST", "/v1/apps/toy/state", 405, "method POST is not allowed on /v1/apps/toy/state (allowed: "),
    ("PUT", "/v1/health", 405, "method PUT is not allowed on /v1/health (allowed: GET)"),
    ("GET", "/v1/shutdown", 405, "method GET is not allowed on /v1/shutdown (allowed: POST)"),
    ("GET", "/v1/audit?limit=abc", 400,
     "bad request to GET /v1/audit: query parameter limit: Input should be a valid integer"),
    ("GET", "/v1/audit?limit=0", 400, "query parameter limit: Input should be greater than or equal to 1"),
    ("GET", "/v1/audit?limit=" + "9" * 40, 400, "query parameter limit: Input should be less than or equal"),
    ("POST", "/v1/shutdown?detach=maybe", 400, "query parameter detach: Input should be a valid boolean"),
    ("GET", "/v1/apps/toy/query/nope", 404, "app toy has no query 'nope'"),
    ("GET", "/v1/apps/toy/query/item?key=b", 404, "toy query item: item 'b' does not exist"),
    ("GET", "/v1/apps/toy/query/" + "q" * 5000, 404, "(5002 chars)"),
])
def test_routes_methods_and_parameters_get_a_json_message(client, method, path, status, message):
    response = client.request(method, path)
    assert response.status_code == status
    assert message in response.json()["message"]
    assert len(response.json()["message"]) < 1000
    unchanged(client)


def test_audit_records_refusals_with_short_summaries(client):
    client.put("/v1/apps/toy/state", json={"name": "z" * 100_000})  # valid: applied
    client.put("/v1/apps/toy/state", json={"name": ["z" * 100_000]})
    entries = client.get("/v1/audit?limit=2").json()
    assert [e["outcome"] for e in entries] == ["invalid", "applied"]
    assert len(entries[0]["summary"]) < 1000


@pytest.mark.parametrize("key, shown", [("", "''"), (":", "':'"), ("a.b", "'a.b'"), ("\r", "'\\r'"),
                                        ("x y", "'x y'"), ("ok_key", "ok_key")])
def test_odd_keys_are_quoted_in_the_location(client, key, shown):
    response = client.put("/v1/apps/toy/state", json={key: 1})
    assert response.json()["message"] == f"invalid state for toy: {shown}: Extra inputs are not permitted (input: 1)"


class PickyState(ToyState):
    @model_validator(mode="after")
    def _no_bob(self):
        if self.name == "bob":
            raise ValueError("name 'bob' is taken")
        return self


class PickyController(ToyController):
    name = "picky"
    state_model = PickyState


def test_a_validator_s_message_is_shown_without_pydantic_s_prefix(tmp_path):
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [PickyController], pin_root=tmp_path, tick_interval=3600)
    agent.start()
    try:
        with pytest.raises(StateRejected) as caught:
            agent.put_state("picky", {"name": "bob"}, "test")
        assert str(caught.value) == "invalid state for picky: state: name 'bob' is taken"
    finally:
        agent.stop()


def test_shorten_keeps_both_ends():
    assert shorten("abc") == "abc"
    text = "a" * 500 + "b" * 500
    short = shorten(text, 100)
    assert short.startswith("a" * 40) and short.endswith("b" * 40) and "(1000 chars)" in short
    assert json.dumps(short)  # plain text
