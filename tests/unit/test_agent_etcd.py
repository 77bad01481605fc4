"""The agent on etcd: per-object writes through the real API land in etcd as objects with etcd's
revisions, a restarted agent (a new store object) gets the same state back, and when no etcd member
answers the agent says so and its data plane keeps the last state it applied."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent, AgentStartError
from bpfnet.agent.store_etcd import EtcdStore
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState
from bpfnet.lb.config import LB_OBJECTS, LbState
from bpfnet.podnet.config import PODNET_OBJECTS, PodnetState
from bpfnet.testing.etcd import EtcdCluster
from support.recording import recording

LB = recording("lb", LbState, LB_OBJECTS)
DDOS = recording("ddos", DdosState, DDOS_OBJECTS)
PODNET = recording("podnet", PodnetState, PODNET_OBJECTS)
VIP = "10.0.0.1:80/tcp"


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def prefix():
    return f"/test/{uuid.uuid4().hex}"


def start(etcd, prefix, tmp_path) -> Agent:
    agent = Agent(EtcdStore(etcd.endpoints, prefix=prefix, timeout=2.0, retry_for=1.0), [LB, DDOS, PODNET],
                  pin_root=tmp_path / "pins", tick_interval=3600)
    agent.start()
    return agent


def stop(agent: Agent) -> None:
    agent.stop()
    agent.store.close()


def test_per_object_writes_land_in_etcd_and_a_restarted_agent_reads_them_back(etcd, prefix, tmp_path):
    agent = start(etcd, prefix, tmp_path)
    try:
        api = TestClient(create_api(agent))
        assert api.get("/v1/health").json()["store"] == f"etcd://{etcd.endpoints[0]}{prefix}"
        vip = api.put(f"/v1/apps/lb/objects/vips/{VIP}", json={"address": "10.0.0.1", "port": 80})
        assert vip.status_code == 200, vip.text
        for n in (1, 2):
            real = api.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.{n}", json={"address": f"10.1.0.{n}"})
            assert real.status_code == 200, real.text
        rules = [api.post("/v1/apps/ddos/objects/rules", json={"expr": f"udp port {n}"}) for n in (1, 2)]
        assert [r.status_code for r in rules] == [201, 201]
        api.post("/v1/apps/ddos/objects/rules?position=0", json={"expr": "tcp port 7"})
        # revisions are etcd's: an object's ETag is its mod_revision, and If-Match compares it
        etag = api.get(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1").headers["etag"]
        stored = agent.store.load("lb")
        assert etag == f'"{stored.objects[f"reals/{VIP}/10.1.0.1"].revision}"'
        changed = api.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1", "weight": 4},
                          headers={"If-Match": etag})
        assert changed.status_code == 200, changed.text
        stale = api.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1", "weight": 5},
                        headers={"If-Match": etag})
        assert stale.status_code == 412 and "read it again" in stale.json()["message"]
        assert LB.applied[-1].vips[0].reals[0].weight == 4  # the data plane got the write, not the stale one
        lb_state = api.get("/v1/apps/lb/state").json()
        ddos_state = api.get("/v1/apps/ddos/state").json()
        assert [r["expr"] for r in ddos_state["rules"]] == ["tcp port 7", "udp port 1", "udp port 2"]
        listed = api.get("/v1/apps/lb/objects/reals").json()
        assert sorted(agent.store.load("lb").objects) == [f"reals/{VIP}/10.1.0.1", f"reals/{VIP}/10.1.0.2",
                                                          "settings", f"vips/{VIP}"]
        summaries = [e["summary"] for e in api.get("/v1/audit?app=lb").json()]
        assert summaries[:2] == [stale.json()["message"], f"~reals/{VIP}/10.1.0.1"]  # newest first, the 412 too
    finally:
        stop(agent)
    restarted = start(etcd, prefix, tmp_path)  # a new agent with a new store object: all from etcd
    try:
        again = TestClient(create_api(restarted))
        assert again.get("/v1/apps/lb/state").json() == lb_state
        assert again.get("/v1/apps/ddos/state").json() == ddos_state
        assert again.get("/v1/apps/lb/objects/reals").json() == listed
        assert LB.applied[0].model_dump(mode="json") == lb_state  # the controller started from it
    finally:
        stop(restarted)


def test_with_etcd_away_writes_fail_clearly_and_the_data_plane_keeps_its_state(tmp_path, prefix):
    cluster = EtcdCluster(1).start()
    try:
        agent = start(cluster, prefix, tmp_path)
        try:
            api = TestClient(create_api(agent))
            assert api.put(f"/v1/apps/lb/objects/vips/{VIP}", json={"address": "10.0.0.1", "port": 80}).status_code \
                == 200
            before = api.get("/v1/apps/lb/state").json()
            cluster.stop(0)
            failed = api.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.9", json={"address": "10.1.0.9"})
            assert failed.status_code == 503  # the store is unavailable, not the agent broken
            assert f"the store at etcd://{cluster.endpoints[0]}{prefix} is unreachable" in failed.json()["message"]
            assert LB.applied[-1].model_dump(mode="json") == before  # the previous state was put back
            assert api.get("/v1/apps/lb/state").json() == before
            audit = api.get("/v1/audit")
            assert audit.status_code == 503 and "is unreachable" in audit.json()["message"]
            cluster.start_member(0)
            again = api.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.9", json={"address": "10.1.0.9"})
            assert again.status_code == 200, again.text  # the same agent and store, once etcd is back
        finally:
            stop(agent)
        cluster.stop(0)
        with pytest.raises(AgentStartError, match="is unreachable"):
            start(cluster, prefix, tmp_path)
    finally:
        cluster.close()


def fleet_agent(etcd, prefix, tmp_path, member: str):
    """An agent of a fleet host: its own recording lb (applied states, members it was told)."""
    lb = recording("lb", LbState, LB_OBJECTS)
    lb.members = []
    lb.members_changed = lambda self, members: type(self).members.append(sorted(members))
    agent = Agent(EtcdStore(etcd.endpoints, prefix=prefix, timeout=2.0, retry_for=1.0), [lb],
                  pin_root=tmp_path / member, tick_interval=3600, member=member, member_ttl=2)
    agent.start()
    return agent, lb


def wait_for(predicate, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_agents_of_a_fleet_follow_each_others_writes_and_membership(etcd, prefix, tmp_path):
    first, first_lb = fleet_agent(etcd, prefix, tmp_path, "h0")
    second, second_lb = fleet_agent(etcd, prefix, tmp_path, "h1")
    try:
        a, b = TestClient(create_api(first)), TestClient(create_api(second))
        assert a.put(f"/v1/apps/lb/objects/vips/{VIP}", json={"address": "10.0.0.1", "port": 80}).status_code == 200
        # the other agent applies it from etcd's watch, with no request of its own
        assert wait_for(lambda: second_lb.applied and second_lb.applied[-1].vips
                        and second_lb.applied[-1].vips[0].name == VIP)
        assert b.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1"}).status_code == 200
        assert wait_for(lambda: first_lb.applied[-1].vips and len(first_lb.applied[-1].vips[0].reals) == 1)
        assert a.get("/v1/apps/lb/state").json() == b.get("/v1/apps/lb/state").json()
        assert wait_for(lambda: first_lb.members and first_lb.members[-1] == ["h0", "h1"])
        assert a.get("/v1/health").json()["fleet"] == {"member": "h0", "members": ["h0", "h1"], "error": None}
        second.stop()  # leaves: its registration goes at once
        assert wait_for(lambda: first_lb.members[-1] == ["h0"])
    finally:
        first.stop()
        second.stop()
        first.store.close()
        second.store.close()


def test_a_member_whose_lease_runs_out_is_dropped_and_comes_back(etcd, prefix, tmp_path):
    first, first_lb = fleet_agent(etcd, prefix, tmp_path, "h0")
    second, _ = fleet_agent(etcd, prefix, tmp_path, "h1")
    try:
        assert wait_for(lambda: first_lb.members and first_lb.members[-1] == ["h0", "h1"])
        membership = second.membership
        reachable = membership.store
        # cut off: its keepalives go to an address where no etcd answers
        membership.store = EtcdStore(["127.0.0.1:9"], prefix=prefix, timeout=0.5, retry_for=0.2)
        assert wait_for(lambda: first_lb.members[-1] == ["h0"], timeout=8)  # the 2 s lease ran out
        assert "unreachable" in (membership.error or "")
        membership.store = reachable  # back: its old lease is gone, so it registers anew
        assert wait_for(lambda: first_lb.members[-1] == ["h0", "h1"], timeout=8)
    finally:
        first.stop()
        second.stop()
        first.store.close()
        second.store.close()


def test_two_agents_on_one_etcd_rebase_writes_on_each_others_and_catch_up(etcd, prefix, tmp_path):
    """As agents of a fleet: a write based on a stale view is redone on top of what etcd holds,
    unless the same object moved (412); either agent restarted reads everything back."""
    first, second = start(etcd, prefix, tmp_path / "a"), start(etcd, prefix, tmp_path / "b")
    try:
        a, b = TestClient(create_api(first)), TestClient(create_api(second))
        assert a.put(f"/v1/apps/lb/objects/vips/{VIP}", json={"address": "10.0.0.1", "port": 80}).status_code == 200
        assert wait_for(lambda: b.get(f"/v1/apps/lb/objects/vips/{VIP}").status_code == 200)  # b follows etcd
        assert b.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1"}).status_code == 200
        rebased = a.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.2", json={"address": "10.1.0.2"})
        assert rebased.status_code == 200, rebased.text  # stale or not yet, a's write lands on top of b's
        etag = b.get(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1").headers["etag"]
        assert a.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1", "weight": 2}) \
            .status_code == 200
        stale = b.put(f"/v1/apps/lb/objects/reals/{VIP}/10.1.0.1", json={"address": "10.1.0.1", "weight": 3},
                      headers={"If-Match": etag})
        assert stale.status_code == 412 and "is at revision" in stale.json()["message"]
        assert wait_for(lambda: b.get("/v1/apps/lb/state").json() == a.get("/v1/apps/lb/state").json())
        assert [(r["address"], r["weight"]) for r in a.get("/v1/apps/lb/state").json()["vips"][0]["reals"]] == \
            [("10.1.0.1", 2), ("10.1.0.2", 1)]
    finally:
        stop(first)
        stop(second)
