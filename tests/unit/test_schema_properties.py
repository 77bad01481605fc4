"""Issue 14: a property over the apps' schemas. Any value put into any field of a valid lb, ddos or
podnet state is either refused (pydantic names the field) or accepted; what is accepted is finite,
fits the C field that holds it in a map, and comes back unchanged from the store (SQLite JSON) and
from validating it again (so a later GET or agent restart cannot fail on it)."""

from __future__ import annotations

import ctypes
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from bpfnet.agent.store import AuditEntry, SQLiteStore
from bpfnet.app.objects import split
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState
from bpfnet.lb.config import LB_OBJECTS, LbState
from bpfnet.podnet.config import PODNET_OBJECTS, PodnetState

KINDS = {"lb": LB_OBJECTS, "ddos": DDOS_OBJECTS, "podnet": PODNET_OBJECTS}

LB = {"settings": {"interface": "eth0", "gateway_mac": "02:00:00:00:00:01", "max_vips": 4, "ring_size": 13,
                   "max_reals": 8, "conn_table_size": 64},
      "vips": [{"address": "10.0.0.1", "port": 80, "reals": [{"address": "10.1.0.1", "weight": 1}],
                "health_check": {"kind": "udp", "port": 53, "send": "ping", "expect": "pong"}}]}
DDOS = {"sample_every": 100, "interfaces": ["eth0"],
        "rules": [{"id": 1, "expr": "tcp port 9", "action": "limit", "rate": 10, "burst": 20,
                   "expires": 1.0e9, "comment": "c"}],
        "detector": {"window": 0.25, "seed": 1, "max_destinations": 16}}
PODNET = {"nodes": [{"name": "n1", "pod_cidr": "10.2.0.0/24", "netns": "bpfnet-n1"}],
          "namespaces": [{"name": "a", "labels": {"team": "x"}}],
          "pods": [{"namespace": "a", "name": "p", "node": "n1", "ports": [{"name": "http", "port": 80}]}],
          "services": [{"namespace": "a", "name": "s", "address": "10.96.0.1", "port": 80,
                        "backends": [{"pod": "p", "port": 80}]}],
          "policies": [{"metadata": {"name": "np", "namespace": "a"},
                        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 90}]}]}}]}
APPS: dict[str, tuple[type[BaseModel], dict]] = {"lb": (LbState, LB), "ddos": (DdosState, DDOS),
                                                 "podnet": (PodnetState, PODNET)}

# where each integer that lands in a BPF map (or a .rodata constant) goes, as the C field's ctypes twin
C_FIELDS = {
    ("ddos", "sample_every"): ctypes.c_uint32,
    ("ddos", "rules", "*", "rate"): ctypes.c_uint64,
    ("ddos", "rules", "*", "burst"): ctypes.c_uint64,
    ("ddos", "rules", "*", "id"): ctypes.c_uint16,  # DDOS_WORD_RULE: the low 16 bits of the match word
    ("lb", "vips", "*", "port"): ctypes.c_uint16,
    ("lb", "settings", "gue_port"): ctypes.c_uint16,
    ("lb", "settings", "max_frame_size"): ctypes.c_uint32,
    ("lb", "settings", "ring_size"): ctypes.c_uint32,
    ("lb", "settings", "max_vips"): ctypes.c_uint32,
    ("lb", "settings", "max_reals"): ctypes.c_uint32,
    ("lb", "settings", "conn_table_size"): ctypes.c_uint32,
    ("podnet", "services", "*", "port"): ctypes.c_uint16,
    ("podnet", "pods", "*", "ports", "*", "port"): ctypes.c_uint16,
}


def leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """Every (path, scalar) of a JSON document; list indexes become '*'."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in leaves(item, (*path, key))]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item, (*path, "*"))]
    return [(path, value)]


def places(document: Any, path: tuple = ()) -> list[tuple]:
    """Paths (with real indexes) of every scalar and container of a document, to put values into."""
    found = [path] if path else []
    if isinstance(document, dict):
        for key, item in document.items():
            found += places(item, (*path, key))
    elif isinstance(document, list):
        for index, item in enumerate(document):
            found += places(item, (*path, index))
    return found


def put(document: Any, path: tuple, value: Any) -> Any:
    copy = json.loads(json.dumps(document))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


BOUNDARY_INTS = [0, 1, -1, 2**8 - 1, 2**8, 2**16 - 1, 2**16, 2**32 - 1, 2**32, 2**32 + 5,
                 2**63, 2**64 - 1, 2**64, 10**30]
nasty = st.one_of(
    st.sampled_from(BOUNDARY_INTS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e309, -1e309, 1e10, 5.8e11, 1e300, 0.0, -0.0, 1e-300]),
    st.sampled_from(["", "eth\x000", "[/red] oops", "tcp[tcpflags] & tcp-syn != 0", "../x", "a" * 2000,
                     "10.0.0.1", "http", "TCP", "x" * 16]),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
)


def like(value: Any) -> st.SearchStrategy:
    """Values of the same JSON type as `value`, most of them at or across a boundary."""
    if isinstance(value, bool) or value is None:
        return nasty
    if isinstance(value, int):
        return st.one_of(st.sampled_from(BOUNDARY_INTS), st.integers(0, 2**70))
    if isinstance(value, float):
        return st.one_of(st.floats(), st.sampled_from([1e309, -1e309, 1e10, 5.8e11, 3.15e8, 0.0]))
    if isinstance(value, str):
        return st.one_of(st.sampled_from(["", "eth\x000", "[/red] oops", "a" * 2000, "x" * 16]), st.text(max_size=40))
    return nasty


def get(document: Any, path: tuple) -> Any:
    for step in path:
        document = document[step]
    return document


PLACES = [(app, path) for app, (_, base) in sorted(APPS.items()) for path in places(base)]


def from_json_text(text: str) -> Any:
    """What the agent's API sees: json.loads turns 1e309 into infinity."""
    return json.loads(text)


@pytest.mark.parametrize("app, path", PLACES, ids=[f"{app}:{'.'.join(map(str, path))}" for app, path in PLACES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_what_a_schema_accepts_is_finite_fits_its_c_field_and_round_trips_through_the_store(
        tmp_path_factory, app, path, data):
    model, base = APPS[app]
    document = put(base, path, data.draw(st.one_of(like(get(base, path)), nasty), label="value"))
    if data.draw(st.booleans(), label="a second field too"):
        other = data.draw(st.sampled_from(places(document)), label="second field")
        document = put(document, other, data.draw(nasty, label="second value"))
    try:
        text = json.dumps(document)  # inf/nan travel as Infinity/NaN here: the model must refuse them
    except ValueError:
        return
    try:
        state = model.model_validate(from_json_text(text))
    except ValidationError as err:
        assert err.errors()[0]["loc"] or err.errors()[0]["msg"]  # refused, saying where or why
        event(f"{app}: refused")
        return
    event(f"{app}: accepted")
    dumped = state.model_dump(mode="json")
    for path, value in leaves(dumped):
        if isinstance(value, float):
            assert math.isfinite(value), (path, value)
        kind = C_FIELDS.get((app, *path))
        if kind is not None and value is not None:
            assert kind(value).value == value, f"{app} {'.'.join(path)} = {value} does not fit {kind.__name__}"
    store = SQLiteStore(tmp_path_factory.mktemp("store") / "state.db")
    try:
        # through the objects the store keeps (a state split per object, then put together again)
        store.commit(app, split(state, KINDS[app]), [], AuditEntry(0.0, "test", app, "applied", ""))
        loaded = store.load(app).whole(KINDS[app])
    finally:
        store.close()
    assert loaded == dumped
    assert model.model_validate(loaded).model_dump(mode="json") == dumped


def test_the_base_states_are_valid():
    for model, base in APPS.values():
        model.model_validate(base)
