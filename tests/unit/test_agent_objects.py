"""The per-object API: each VIP, real, rule, pod... has its own revision, writers of different objects
never conflict, cross-object rules still hold, and the store keeps objects that put together give
exactly the state the API reports (also after a restart). Controllers record what they are given,
so the data plane's view is checked too."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent
from bpfnet.agent.store import AuditEntry, SQLiteStore
from bpfnet.app.objects import Obj, keep_orders, split
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState
from bpfnet.lb.config import LB_OBJECTS, LbState
from bpfnet.podnet.config import PODNET_OBJECTS, PodnetState
from support.recording import recording

LB = recording("lb", LbState, LB_OBJECTS)
DDOS = recording("ddos", DdosState, DDOS_OBJECTS)
PODNET = recording("podnet", PodnetState, PODNET_OBJECTS)
PODNET.normalize = classmethod(lambda cls, state: state.with_addresses())  # as PodnetController
VIP = "10.0.0.1:80/tcp"


@pytest.fixture
def store(tmp_path):
    return SQLiteStore(tmp_path / "state.db")


def start(store, tmp_path) -> Agent:
    agent = Agent(store, [LB, DDOS, PODNET], pin_root=tmp_path / "pins", tick_interval=3600)
    agent.start()
    return agent


@pytest.fixture
def agent(store, tmp_path):
    agent = start(store, tmp_path)
    yield agent
    agent.stop()


@pytest.fixture
def client(agent):
    return TestClient(create_api(agent))


def put(client, path, body, **headers):
    return client.put(f"/v1/apps/{path}", json=body, headers=headers)


def lb_vip(client):
    assert put(client, f"lb/objects/vips/{VIP}", {"address": "10.0.0.1", "port": 80}).status_code == 200


def test_a_vip_and_its_reals_are_objects_and_the_state_puts_them_together(client, agent, store, tmp_path):
    lb_vip(client)
    first = put(client, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1", "weight": 3})
    second = put(client, f"lb/objects/reals/{VIP}/10.1.0.2", {"address": "10.1.0.2"})
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json() == {"app": "lb", "kind": "reals", "key": f"{VIP}/10.1.0.1", "revision": 2,
                            "summary": f"+reals/{VIP}/10.1.0.1"}
    state = client.get("/v1/apps/lb/state").json()
    assert [(r["address"], r["weight"]) for r in state["vips"][0]["reals"]] == [("10.1.0.1", 3), ("10.1.0.2", 1)]
    assert LB.applied[-1].vips[0].reals[1].address.compressed == "10.1.0.2"  # what the data plane was given
    listed = client.get("/v1/apps/lb/objects/reals").json()
    assert [(row["key"], row["revision"]) for row in listed] == [(f"{VIP}/10.1.0.1", 2), (f"{VIP}/10.1.0.2", 3)]
    vip = client.get(f"/v1/apps/lb/objects/vips/{VIP}")
    assert vip.headers["etag"] == '"1"' and "reals" not in vip.json()
    agent.stop()
    restarted = start(store, tmp_path)
    try:
        again = TestClient(create_api(restarted))
        assert again.get("/v1/apps/lb/state").json() == state
        assert again.get("/v1/apps/lb/objects/reals").json() == listed
    finally:
        restarted.stop()


def test_writers_of_different_objects_never_conflict_but_one_object_is_compare_and_swap(client):
    lb_vip(client)
    for n in (1, 2):
        put(client, f"lb/objects/reals/{VIP}/10.1.0.{n}", {"address": f"10.1.0.{n}"})
    read_1 = int(client.get(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1").headers["etag"].strip('"'))
    # another writer changes real 2 in between: real 1's revision has not moved
    assert put(client, f"lb/objects/reals/{VIP}/10.1.0.2", {"address": "10.1.0.2", "weight": 5}).status_code == 200
    ok = put(client, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1", "weight": 7},
             **{"If-Match": f'"{read_1}"'})
    assert ok.status_code == 200, ok.text
    stale = put(client, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1", "weight": 9},
                **{"If-Match": f'"{read_1}"'})
    assert stale.status_code == 412
    assert stale.json()["message"] == (f"lb object reals/{VIP}/10.1.0.1 is at revision {ok.json()['revision']}, "
                                       f"not {read_1}: read it again")
    exists = put(client, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1"}, **{"If-None-Match": "*"})
    assert exists.status_code == 412 and "already exists" in exists.json()["message"]
    weights = [r["weight"] for r in client.get("/v1/apps/lb/state").json()["vips"][0]["reals"]]
    assert weights == [7, 5]


def test_deleting_a_vip_deletes_its_reals_and_a_real_needs_its_vip(client, store):
    lb_vip(client)
    put(client, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1"})
    orphan = put(client, "lb/objects/reals/10.9.9.9:80/tcp/10.1.0.1", {"address": "10.1.0.1"})
    assert orphan.status_code == 404 and "parent 10.9.9.9:80/tcp does not exist" in orphan.json()["message"]
    gone = client.delete(f"/v1/apps/lb/objects/vips/{VIP}")
    assert gone.status_code == 200 and gone.json()["summary"] == f"-vips/{VIP} and 1 children"
    assert client.get("/v1/apps/lb/state").json()["vips"] == []
    assert set(store.load("lb").objects) == {"settings"}
    again = client.delete(f"/v1/apps/lb/objects/vips/{VIP}")
    assert again.status_code == 404 and again.json()["message"] == f"lb has no object vips/{VIP}"


@pytest.mark.parametrize("path, body, status, words", [
    (f"lb/objects/vips/{VIP}", {"address": "10.0.0.2", "port": 80}, 422,
     f"the body names vips/10.0.0.2:80/tcp but the URL names vips/{VIP}"),
    (f"lb/objects/vips/{VIP}", {"address": "10.0.0.1", "port": 80, "reals": []}, 422,
     "reals are objects of their own"),
    (f"lb/objects/vips/{VIP}", {"address": "10.0.0.1", "port": 70000}, 422, "vips.0.port"),
    (f"lb/objects/vips/{VIP}", [1, 2], 422, "the body must be a JSON object"),
    ("lb/objects/backends/x", {}, 404, "lb has no object kind 'backends' (kinds: vips, reals)"),
    ("lb/settings", {"settings": {"max_vips": 4097}}, 422, "settings.max_vips"),
    ("lb/settings", {"vips": []}, 422, "vips are objects of their own"),
    ("podnet/objects/pods/shop/db", {"namespace": "shop", "name": "db", "node": "n1"}, 422,
     "namespace 'shop' does not exist"),
])
def test_bad_objects_are_refused_naming_the_problem_and_change_nothing(client, path, body, status, words):
    before = {app: client.get(f"/v1/apps/{app}/state").headers["etag"] for app in ("lb", "podnet")}
    response = put(client, path, body)
    assert response.status_code == status, response.text
    assert words in response.json()["message"]
    assert {app: client.get(f"/v1/apps/{app}/state").headers["etag"] for app in ("lb", "podnet")} == before


def test_rules_keep_first_match_order_through_inserts_and_restarts(client, agent, store, tmp_path):
    keys = [client.post("/v1/apps/ddos/objects/rules", json={"expr": f"udp port {n}"}).json()["key"]
            for n in (1, 2, 3)]
    assert keys == ["1", "2", "3"]
    inserted = client.post("/v1/apps/ddos/objects/rules?position=1", json={"expr": "udp port 9"})
    assert inserted.status_code == 201 and inserted.json()["key"] == "4"
    for _ in range(60):  # more inserts at one place than a float halves: the orders stay distinct
        client.post("/v1/apps/ddos/objects/rules?position=1", json={"expr": "tcp port 7"})
    exprs = [r["expr"] for r in client.get("/v1/apps/ddos/state").json()["rules"]]
    assert exprs[0] == "udp port 1" and exprs[-3:] == ["udp port 9", "udp port 2", "udp port 3"]
    assert [r.expr for r in DDOS.applied[-1].rules] == exprs  # the data plane got this order
    duplicate = client.post("/v1/apps/ddos/objects/rules", json={"id": 2, "expr": "icmp"})
    assert duplicate.status_code == 422 and "duplicate id 2" in duplicate.json()["message"]
    agent.stop()
    restarted = start(store, tmp_path)
    try:
        assert [r["expr"] for r in TestClient(create_api(restarted)).get("/v1/apps/ddos/state").json()["rules"]] \
            == exprs
    finally:
        restarted.stop()


def test_a_whole_state_put_rewrites_only_the_objects_it_changes(client):
    for n in (1, 2, 3):
        client.post("/v1/apps/ddos/objects/rules", json={"expr": f"udp port {n}"})
    client.post("/v1/apps/ddos/objects/rules?position=1", json={"expr": "udp port 9"})  # a fractional order
    before = {row["key"]: row["revision"] for row in client.get("/v1/apps/ddos/objects/rules").json()}
    state = client.get("/v1/apps/ddos/state").json()
    state["rules"][2]["comment"] = "changed"
    assert client.put("/v1/apps/ddos/state", json=state).status_code == 200
    after = {row["key"]: row["revision"] for row in client.get("/v1/apps/ddos/objects/rules").json()}
    changed = {key for key in after if after[key] != before[key]}
    assert changed == {str(state["rules"][2]["id"])}


def test_twenty_writers_of_distinct_objects_all_succeed(client):
    lb_vip(client)
    failures: list = []

    def writer(n: int) -> None:
        for step in range(5):
            response = put(client, f"lb/objects/reals/{VIP}/10.1.{n}.{step}", {"address": f"10.1.{n}.{step}"})
            if response.status_code != 200:
                failures.append(response.text)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(client.get("/v1/apps/lb/state").json()["vips"][0]["reals"]) == 100


def test_keep_orders_keeps_stored_places_and_fits_new_objects_between():
    stored = {"rules/1": 0.0, "rules/2": 0.5, "rules/3": 1.0}
    state = DdosState.model_validate({"rules": [{"id": 1, "expr": "icmp"}, {"id": 5, "expr": "udp"},
                                                {"id": 2, "expr": "tcp"}, {"id": 3, "expr": "arp"}]})
    kept = keep_orders(stored, split(state, DDOS_OBJECTS), DDOS_OBJECTS)
    orders = {k: o.order for k, o in kept.items() if k != "settings"}
    assert orders == {"rules/1": 0.0, "rules/5": 0.25, "rules/2": 0.5, "rules/3": 1.0}
    moved = DdosState.model_validate({"rules": [{"id": 3, "expr": "arp"}, {"id": 1, "expr": "icmp"}]})
    assert {k: o.order for k, o in keep_orders(stored, split(moved, DDOS_OBJECTS), DDOS_OBJECTS).items()} == {
        "settings": 0.0, "rules/3": 0.0, "rules/1": 1.0}
    assert split(moved, DDOS_OBJECTS)["rules/3"] == Obj(moved.rules[0].model_dump(mode="json"), 0.0)


def test_a_pod_written_alone_gets_an_address_that_is_stored_and_never_moves(client, store):
    put(client, "podnet/objects/nodes/n1", {"name": "n1", "pod_cidr": "10.2.0.0/24"})
    put(client, "podnet/objects/namespaces/shop", {"name": "shop"})
    for name in ("a", "b"):
        response = put(client, f"podnet/objects/pods/shop/{name}", {"namespace": "shop", "name": name, "node": "n1"})
        assert response.status_code == 200, response.text
    addresses = {p["name"]: p["address"] for p in client.get("/v1/apps/podnet/state").json()["pods"]}
    assert addresses == {"a": "10.2.0.2", "b": "10.2.0.3"}
    assert client.delete("/v1/apps/podnet/objects/pods/shop/a").status_code == 200
    assert client.get("/v1/apps/podnet/objects/pods/shop/b").json()["address"] == "10.2.0.3"
    assert store.load("podnet").objects["pods/shop/b"].value["address"] == "10.2.0.3"
    in_use = client.delete("/v1/apps/podnet/objects/namespaces/shop")
    assert in_use.status_code == 422 and "namespace 'shop' does not exist" in in_use.json()["message"]


def test_two_agents_on_one_store_rebase_writes_on_each_others_and_catch_up(store, tmp_path):
    """Two agents sharing one store (as agents of a fleet share etcd): a write based on a stale view
    is redone on top of the store's state, unless it is the same object that moved."""
    first = start(store, tmp_path / "a")
    second = start(SQLiteStore(store.path), tmp_path / "b")
    try:
        a, b = TestClient(create_api(first)), TestClient(create_api(second))
        lb_vip(a)
        # b has not seen the VIP: its real under it is refused (404), it catches up, then it works
        assert put(b, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1"}).status_code == 404
        second.resync("lb")
        assert put(b, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1"}).status_code == 200
        # a is now stale: its write of another real is rebased, not refused
        response = put(a, f"lb/objects/reals/{VIP}/10.1.0.2", {"address": "10.1.0.2"})
        assert response.status_code == 200, response.text
        assert [r["address"] for r in a.get("/v1/apps/lb/state").json()["vips"][0]["reals"]] == ["10.1.0.1",
                                                                                                 "10.1.0.2"]
        assert [r.address.compressed for r in LB.applied[-1].vips[0].reals] == ["10.1.0.1", "10.1.0.2"]
        # both write the same real, b based on what it read: the one that comes second is a 412
        revision = int(b.get(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1").headers["etag"].strip('"'))
        assert put(a, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1", "weight": 2}).status_code == 200
        stale = put(b, f"lb/objects/reals/{VIP}/10.1.0.1", {"address": "10.1.0.1", "weight": 3},
                    **{"If-Match": f'"{revision}"'})
        assert stale.status_code == 412
        assert "is at revision" in stale.json()["message"]
        # the 412 came after b caught up with the store (to redo its write): it now shows a's weight
        assert b.get("/v1/apps/lb/state").json() == a.get("/v1/apps/lb/state").json()
        assert not second.resync("lb")  # nothing new
    finally:
        first.stop()
        second.stop()


def test_a_stored_state_that_does_not_validate_is_not_applied_and_is_reported(store, tmp_path, agent, client):
    lb_vip(client)
    other = SQLiteStore(store.path)
    other.commit("lb", {f"reals/{VIP}/10.1.0.1": Obj({"address": "10.1.0.1", "weight": -5}, 0.0)}, [],
                 AuditEntry(0.0, "test", "lb", "applied", "bad"))
    applied = len(LB.applied)
    assert not agent.resync("lb")
    assert len(LB.applied) == applied  # the data plane keeps the last good state
    error = client.get("/v1/health").json()["apps"]["lb"]["store_error"]
    assert error.startswith("revision 2 does not validate: vips.0.reals.0.weight")


def test_settings_never_written_are_the_defaults_the_app_runs_with(client):
    response = client.get("/v1/apps/ddos/settings")
    assert response.status_code == 200 and response.headers["etag"] == '"0"'
    assert response.json()["sample_every"] == 100 and "rules" not in response.json()
    created = client.put("/v1/apps/ddos/settings", json={**response.json(), "sample_every": 7},
                         headers={"If-Match": '"0"'})
    assert created.status_code == 200, created.text
    assert client.get("/v1/apps/ddos/state").json()["sample_every"] == 7
