"""Issue 14: what the agent accepts it can keep. The real app schemas behind the real API and
store, with controllers that only record (no data plane): non-finite floats, integers wider than
their C field, sizes a machine cannot hold, NUL bytes and corrupt stores all get a 4xx (or a clear
start error) that names the field or the app, never a 500 or an unreadable app."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent, AgentStartError
from bpfnet.agent.store import AuditEntry, SQLiteStore, StoreError
from bpfnet.app.controller import Controller
from bpfnet.app.objects import Obj
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState
from bpfnet.lb.config import LB_OBJECTS, LbState
from bpfnet.podnet.config import PODNET_OBJECTS, PodnetState
from support.recording import recording

APPS = [recording("lb", LbState, LB_OBJECTS), recording("ddos", DdosState, DDOS_OBJECTS),
        recording("podnet", PodnetState, PODNET_OBJECTS)]


def seed_legacy(store, app, state):
    """A whole state as an agent before per-object writes stored it (revision 1)."""
    store._db.execute("INSERT INTO state VALUES (?, ?, 1, 0.0)", (app, json.dumps(state)))


@pytest.fixture
def store(tmp_path):
    return SQLiteStore(tmp_path / "state.db")


@pytest.fixture
def agent(store, tmp_path):
    agent = Agent(store, APPS, pin_root=tmp_path / "pins", tick_interval=3600)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(agent):
    return TestClient(create_api(agent), raise_server_exceptions=False)


def put_raw(client, app: str, body: str):
    return client.put(f"/v1/apps/{app}/state", content=body.encode(),
                      headers={"content-type": "application/json"})


# --- 1. non-finite floats -----------------------------------------------------------------------

@pytest.mark.parametrize("app, body, field", [
    ("ddos", '{"rules":[{"expr":"tcp port 9","expires":1e309}]}', "rules.0.expires"),
    ("ddos", '{"rules":[{"expr":"tcp port 9","expires":-1e309}]}', "rules.0.expires"),
    ("ddos", '{"detector":{"baseline_time_constant":1e309}}', "detector.baseline_time_constant"),
    ("ddos", '{"detector":{"attack_floor_pps":1e400}}', "detector.attack_floor_pps"),
    ("lb", '{"settings":{"udp_timeout":1e309}}', "settings.udp_timeout"),
    ("lb", '{"vips":[{"address":"10.0.0.1","port":80,"health_check":{"interval":1e309}}]}',
     "vips.0.health_check.interval"),
])
def test_overflowing_float_literals_are_422_naming_the_field_and_get_keeps_working(client, app, body, field):
    response = put_raw(client, app, body)
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]
    assert "finite" in response.json()["message"]
    assert client.get(f"/v1/apps/{app}/state").status_code == 200
    assert client.get(f"/v1/apps/{app}/state").headers["etag"] == '"0"'


def test_a_stored_infinity_stops_the_agent_with_a_message_naming_the_app(store, tmp_path):
    seed_legacy(store, "ddos", {"rules": [{"expr": "tcp port 9", "expires": 1.0}]})
    with sqlite3.connect(store.path) as db:  # what an older agent wrote
        db.execute("UPDATE state SET state = ? WHERE app = 'ddos'",
                   ('{"rules": [{"expr": "tcp port 9", "expires": Infinity}]}',))
    agent = Agent(store, APPS, pin_root=tmp_path / "pins")
    with pytest.raises(AgentStartError, match=r"state of ddos \(revision 1\).*not valid JSON"):
        agent.start()


def test_a_stored_state_that_no_longer_validates_names_app_field_and_revision(store, tmp_path):
    seed_legacy(store, "ddos", {"sample_every": 4294967301})
    agent = Agent(store, APPS, pin_root=tmp_path / "pins")
    with pytest.raises(AgentStartError, match=r"ddos: stored state \(revision 1\) does not validate: "
                                         r"sample_every: Input should be less than or equal to 4294967295"):
        agent.start()


def test_the_store_refuses_to_write_non_finite_numbers(store):
    with pytest.raises(ValueError):
        store.commit("x", {"settings": Obj({"a": float("inf")}, 0.0)}, [], AuditEntry(0.0, "test", "x", "applied", ""))
    assert store.load("x") is None


# --- 2. integers bounded by the C field that holds them -------------------------------------------

@pytest.mark.parametrize("value", [2**32 + 5, 2**64, -1])
def test_sample_every_wider_than_its_u32_is_422(client, value):
    response = client.put("/v1/apps/ddos/state", json={"sample_every": value})
    assert response.status_code == 422
    assert "sample_every" in response.json()["message"]


def test_sample_every_at_the_u32_limit_is_kept_exactly(client, store):
    assert client.put("/v1/apps/ddos/state", json={"sample_every": 2**32 - 1}).status_code == 200
    assert client.get("/v1/apps/ddos/state").json()["sample_every"] == 2**32 - 1
    assert store.load("ddos").objects["settings"].value["sample_every"] == 2**32 - 1


@pytest.mark.parametrize("app, body, field", [
    ("ddos", {"detector": {"sample_every": 2**32}}, "detector.sample_every"),
    ("ddos", {"detector": {"seed": 2**64}}, "detector.seed"),
    ("ddos", {"detector": {"max_rules": 5000}}, "detector.max_rules"),
    ("lb", {"settings": {"gue_port": 65536}}, "settings.gue_port"),
    ("lb", {"settings": {"max_frame_size": 2**32}}, "settings.max_frame_size"),
    ("lb", {"settings": {"conn_table_size": 2**32}}, "settings.conn_table_size"),
    ("podnet", {"namespaces": [{"name": "a"}], "policies": [{"metadata": {"name": "p", "namespace": "a"},
     "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 70000}]}]}}]},
     "endPort"),
])
def test_other_integers_wider_than_their_field_are_422(client, app, body, field):
    response = client.put(f"/v1/apps/{app}/state", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]


# --- 3. sizes bounded by what a machine can hold --------------------------------------------------

def test_a_ring_of_four_billion_slots_is_refused_with_the_size_and_the_limit(client):
    response = client.put("/v1/apps/lb/state", json={"settings": {"max_vips": 4096, "ring_size": 1000003}})
    assert response.status_code == 422
    message = response.json()["message"]
    assert "4,096,012,288 ring slots" in message
    # 4,096,012,288 slots x 4 bytes + the default 4,194,304-flow connection table x 112 bytes + reals
    assert "16,073 MiB" in message and "limit is 1,024 MiB" in message


def test_the_detector_cannot_be_asked_to_hold_unbounded_samples(client):
    response = client.put("/v1/apps/ddos/state", json={"detector": {
        "normal_samples": 1_000_000, "window_samples": 1_000_000, "max_destinations": 1_000_000}})
    assert response.status_code == 422
    assert "samples held in memory" in response.json()["message"]


# --- 8. 4xx, not 500 ----------------------------------------------------------------------------

@pytest.mark.parametrize("app, body, field", [
    ("lb", {"settings": {"interface": "eth\x000"}}, "settings.interface"),
    ("ddos", {"interfaces": ["eth\x000"]}, "interfaces.0"),
    ("ddos", {"interfaces": ["x" * 16]}, "interfaces.0"),
    ("podnet", {"nodes": [{"name": "n", "pod_cidr": "10.1.0.0/24", "netns": "a\x00b"}]}, "nodes.0.netns"),
    ("podnet", {"nodes": [{"name": "n", "pod_cidr": "10.1.0.0/24", "netns": "../../etc"}]}, "nodes.0.netns"),
    ("podnet", {"underlay": {"fabric_netns": "a/b"}}, "underlay.fabric_netns"),
])
def test_a_nul_byte_or_slash_in_an_interface_or_netns_name_is_422_naming_the_field(client, app, body, field):
    response = client.put(f"/v1/apps/{app}/state", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["message"].startswith(f"invalid state for {app}: {field}: ")


@pytest.mark.parametrize("table", ["objects", "state"])
def test_corrupt_state_json_stops_the_start_naming_the_app(store, tmp_path, table):
    if table == "state":
        seed_legacy(store, "lb", {})
        corrupt = "UPDATE state SET state = '{\"settings\": ' WHERE app = 'lb'"
    else:
        store.commit("lb", {"settings": Obj({}, 0.0)}, [], AuditEntry(0.0, "test", "lb", "applied", ""))
        corrupt = "UPDATE objects SET value = '{\"max_vips\": ' WHERE app = 'lb' AND key = 'settings'"
    with sqlite3.connect(store.path) as db:
        db.execute(corrupt)
    with pytest.raises(StoreError, match=r"state of lb \(revision 1\) in .*state.db is not valid JSON"):
        store.load("lb")
    with pytest.raises(AgentStartError, match=r"^state of lb "):
        Agent(store, APPS, pin_root=tmp_path / "pins").start()


def test_an_object_whose_parent_is_missing_stops_the_start_naming_both(store, tmp_path):
    store.commit("lb", {"settings": Obj({}, 0.0), "reals/10.0.0.1:80/tcp/10.1.0.1": Obj({"address": "10.1.0.1"}, 0.0)},
                 [], AuditEntry(0.0, "test", "lb", "applied", ""))
    with pytest.raises(AgentStartError, match=r"lb: stored state \(revision 1\) is inconsistent: "
                                              r"'reals/10.0.0.1:80/tcp/10.1.0.1' has no parent vips/10.0.0.1:80/tcp"):
        Agent(store, APPS, pin_root=tmp_path / "pins").start()


def test_a_corrupt_database_file_is_a_store_error_naming_the_app(tmp_path):
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    store.commit("lb", {"settings": Obj({}, 0.0)}, [], AuditEntry(0.0, "test", "lb", "applied", ""))
    store.close()
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # keep the header, ruin the pages
    path.write_bytes(bytes(data))
    try:
        store = SQLiteStore(path)
    except sqlite3.DatabaseError:
        return  # refused at open: `bpfnet agent` says "cannot open state store PATH: ..."
    with pytest.raises(StoreError, match="state of lb cannot be read from"):
        store.load("lb")


def test_an_unreadable_audit_log_is_503_naming_the_store(client, store):
    store._db.execute("DROP TABLE audit")
    response = client.get("/v1/audit")
    assert response.status_code == 503
    assert "audit log cannot be read" in response.json()["message"]


def test_a_state_that_is_not_an_object_in_the_store_is_named(store):
    store.commit("ddos", {"settings": Obj({}, 0.0)}, [], AuditEntry(0.0, "test", "ddos", "applied", ""))
    store._db.execute("UPDATE objects SET value = '[1, 2]' WHERE app = 'ddos'")
    with pytest.raises(StoreError, match="state of ddos .* is a list, not a JSON object"):
        store.load("ddos")


def test_agent_refuses_non_finite_output_of_a_lax_third_party_model(store, tmp_path):
    from pydantic import BaseModel

    class Lax(BaseModel):
        x: float = 0.0

    agent = Agent(store, [recording("lax", Lax, ())], pin_root=tmp_path / "pins")
    agent.start()
    try:
        client = TestClient(create_api(agent), raise_server_exceptions=False)
        response = put_raw(client, "lax", '{"x": 1e309}')
        assert response.status_code == 422
        assert "x: inf is not a finite number" in response.json()["message"]
        assert client.get("/v1/apps/lax/state").status_code == 200
        assert json.loads(client.get("/v1/apps/lax/state").text) == {"x": 0.0}
    finally:
        agent.stop()


# --- 5. an empty or missing state DB does not wipe an adopted data plane ---------------------------

class Pinning(Controller):
    """Pins a file under pin_root/pinning/ on start, like an app pinning its maps."""

    name = "pinning"
    state_model = DdosState
    started: list = []

    def start(self, state):
        (self.pin_root / self.name).mkdir(parents=True, exist_ok=True)
        (self.pin_root / self.name / "map").write_text("pinned")
        Pinning.started.append(state)

    def apply(self, state):
        pass

    def stats(self):
        return {}

    def stop(self, detach):
        pass


def test_pins_with_no_stored_state_refuse_the_start_unless_adopt_empty(tmp_path):
    pins = tmp_path / "pins"
    (pins / "pinning").mkdir(parents=True)
    (pins / "pinning" / "map").write_text("an earlier agent's data plane")
    fresh = SQLiteStore(tmp_path / "new.db")
    Pinning.started.clear()
    with pytest.raises(AgentStartError, match=r"pinning: the store has no state for pinning, but 1 pinned objects .* "
                                         r"--adopt-empty"):
        Agent(fresh, [Pinning], pin_root=pins).start()
    assert Pinning.started == []  # the data plane was not touched
    agent = Agent(fresh, [Pinning], pin_root=pins, adopt_empty=True)
    agent.start()
    agent.stop()
    assert len(Pinning.started) == 1
    [entry] = fresh.audit(app="pinning")
    assert entry.outcome == "started" and "adopted 1 pinned objects (--adopt-empty)" in entry.summary
    # the same store ran the app from its defaults: a restart adopts its own pins without the flag
    again = Agent(fresh, [Pinning], pin_root=pins)
    again.start()
    again.stop()
    assert len(Pinning.started) == 2


def test_a_first_start_on_no_pins_records_that_this_store_owns_the_new_data_plane(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    agent = Agent(store, [Pinning], pin_root=tmp_path / "pins")
    agent.start()
    agent.stop()
    assert [e.summary for e in store.audit(app="pinning")] == ["new data plane: default state applied"]
    restarted = Agent(store, [Pinning], pin_root=tmp_path / "pins")
    restarted.start()
    restarted.stop()
    assert len(store.audit(app="pinning")) == 1
    with pytest.raises(AgentStartError, match="no state for pinning"):  # another, empty DB: refused
        Agent(SQLiteStore(tmp_path / "other.db"), [Pinning], pin_root=tmp_path / "pins").start()


# --- 9. unbounded inputs ------------------------------------------------------------------------

def test_a_huge_rule_comment_is_refused(client):
    response = client.put("/v1/apps/ddos/state", json={"rules": [{"expr": "tcp port 9", "comment": "x" * 15_000_000}]})
    assert response.status_code == 422
    assert "rules.0.comment: String should have at most 1024 characters" in response.json()["message"]


def test_the_audit_log_keeps_a_bounded_number_of_entries(tmp_path):
    store = SQLiteStore(tmp_path / "s.db", audit_retention=3)
    for i in range(5):
        store.record(AuditEntry(float(i), "test", "x", "invalid", f"entry {i}"))
    assert [e.summary for e in store.audit()] == ["entry 4", "entry 3", "entry 2"]


def test_a_health_check_path_cannot_inject_into_the_probe_request(client):
    vip = {"address": "10.0.0.1", "port": 80, "health_check": {"kind": "http", "path": "/h HTTP/1.0\r\nX: y"}}
    response = client.put("/v1/apps/lb/state", json={"vips": [vip]})
    assert response.status_code == 422
    assert "vips.0.health_check.path: path must not contain spaces or control characters" in response.json()["message"]


def test_a_nul_byte_in_a_rule_expression_is_refused_not_truncated_by_libpcap(client):
    response = client.put("/v1/apps/ddos/state", json={"rules": [{"expr": "tcp port 9\u0000 and udp"}]})
    assert response.status_code == 422
    assert "rules.0.expr: expression 'tcp port 9\\x00 and udp' contains a NUL" in response.json()["message"]
