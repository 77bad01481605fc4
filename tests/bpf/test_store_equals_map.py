"""Issue 14: at the boundaries of the schema, the map holds exactly what the store holds. A real
agent core (ddos and lb controllers, SQLite store, the API) against the kernel; values are read
back from the maps, not from the controllers' memory."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from bpfnet.agent.api import create_api
from bpfnet.agent.core import Agent
from bpfnet.agent.store import SQLiteStore
from bpfnet.ddos.config import DDOS_OBJECTS
from bpfnet.ddos.controller import DdosController
from bpfnet.ebpf import pins
from bpfnet.lb.config import LB_OBJECTS
from bpfnet.lb.controller import LbController

pytestmark = pytest.mark.root
U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1


@pytest.fixture
def agent(tmp_path):
    root = pins.pin_dir(f"store-map-{uuid.uuid4().hex[:8]}")
    agent = Agent(SQLiteStore(tmp_path / "state.db"), [DdosController, LbController], pin_root=root,
                  tick_interval=3600)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(detach=True)
        pins.unpin(root)


def ddos_map_config(agent: Agent):
    dataplane = agent._slot("ddos").controller.dataplane
    return dataplane.config.lookup((0).to_bytes(4, "little"))


@pytest.mark.parametrize("sample_every", [0, 1, U32_MAX])
def test_sample_every_in_the_map_is_the_stored_value(agent, sample_every):
    client = TestClient(create_api(agent))
    assert client.put("/v1/apps/ddos/state", json={"sample_every": sample_every}).status_code == 200
    stored = agent.store.load("ddos").whole(DDOS_OBJECTS)["sample_every"]
    assert stored == sample_every == ddos_map_config(agent).sample_every


@pytest.mark.parametrize("too_wide", [U32_MAX + 1, U32_MAX + 6, U64_MAX + 1])
def test_a_value_the_map_cannot_hold_is_refused_and_the_map_keeps_the_stored_one(agent, too_wide):
    client = TestClient(create_api(agent))
    assert client.put("/v1/apps/ddos/state", json={"sample_every": U32_MAX}).status_code == 200
    response = client.put("/v1/apps/ddos/state", json={"sample_every": too_wide})
    assert response.status_code == 422 and "sample_every" in response.json()["message"]
    stored = agent.store.load("ddos").whole(DDOS_OBJECTS)["sample_every"]
    assert stored == U32_MAX == ddos_map_config(agent).sample_every


def test_limit_rule_rate_and_burst_at_their_bounds_are_in_the_map(agent):
    client = TestClient(create_api(agent))
    rule = {"id": 4095, "expr": "udp port 9", "action": "limit", "rate": 100_000_000, "burst": 100_000_000}
    assert client.put("/v1/apps/ddos/state", json={"rules": [rule]}).status_code == 200
    [stored] = agent.store.load("ddos").whole(DDOS_OBJECTS)["rules"]
    limit = agent._slot("ddos").controller.dataplane.limits.lookup((4095).to_bytes(4, "little"))
    assert (limit.rate_pps, limit.burst) == (stored["rate"], stored["burst"]) == (100_000_000, 100_000_000)


def test_lb_sizes_and_ports_at_their_bounds_are_what_the_maps_hold(agent):
    client = TestClient(create_api(agent))
    state = {"settings": {"max_vips": 2, "ring_size": 1_000_003, "max_reals": 65536, "conn_table_size": 16,
                          "gue_port": 65535, "max_frame_size": 9216},
             "vips": [{"address": "10.0.0.1", "port": 65535, "reals": [{"address": "10.1.0.1"}]},
                      {"address": "10.0.0.1", "port": 0, "protocol": "udp"}]}
    response = client.put("/v1/apps/lb/state", json=state)
    assert response.status_code == 200, response.text
    stored = agent.store.load("lb").whole(LB_OBJECTS)
    controller = agent._slot("lb").controller
    maps = controller.dataplane
    assert maps.ch_rings.map.max_entries == stored["settings"]["max_vips"] * stored["settings"]["ring_size"]
    assert maps.conn_table.map.max_entries == stored["settings"]["conn_table_size"]
    assert maps.reals.map.max_entries == stored["settings"]["max_reals"]
    assert maps.vip_map.map.max_entries == stored["settings"]["max_vips"]
    ports = sorted(key.key()[1] for key, _ in controller.dataplane.vip_map.items())
    assert ports == sorted(vip["port"] for vip in stored["vips"]) == [0, 65535]
