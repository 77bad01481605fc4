"""The agent's pure parts: SQLite store, change summaries, stats -> metrics, the app registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from bpfnet.agent.audit import diff_summary
from bpfnet.agent.store import AuditEntry, RevisionConflict, SQLiteStore, StoredObject
from bpfnet.app.controller import (
    CONTROLLERS,
    Controller,
    UnknownAppError,
    load_controller,
    register,
    stats_metrics,
)
from bpfnet.app.objects import Obj


def entry(app="lb", outcome="applied", summary="s"):
    return AuditEntry(time=100.0, who="uid=0 pid=1", app=app, outcome=outcome, summary=summary)


def settings(value):
    return {"settings": Obj(value, 0.0)}


def test_store_commits_with_increasing_revisions_and_reloads(tmp_path):
    store = SQLiteStore(tmp_path / "sub" / "state.db")
    assert store.load("lb") is None
    assert store.commit("lb", {**settings({"a": 1}), "vips/x": Obj({"port": 1}, 0.0)}, [], entry(),
                        expected_revision=0) == 1
    assert store.commit("lb", {"vips/y": Obj({"port": 2}, 1.5)}, [], entry(), expected_revision=1) == 2
    assert store.commit("lb", {}, ["vips/x"], entry(), expected_revision=2) == 3
    store.close()
    reopened = SQLiteStore(tmp_path / "sub" / "state.db")
    loaded = reopened.load("lb")
    assert (loaded.revision, loaded.updated_at) == (3, 100.0)
    assert loaded.objects == {"settings": StoredObject({"a": 1}, 0.0, 1), "vips/y": StoredObject({"port": 2}, 1.5, 2)}
    assert (tmp_path / "sub" / "state.db").stat().st_mode & 0o777 == 0o600


def test_store_commit_is_a_compare_and_swap_on_the_app_revision(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.commit("lb", settings({"a": 1}), [], entry(), expected_revision=0)
    with pytest.raises(RevisionConflict, match="state of lb is at revision 1, not 0"):
        store.commit("lb", settings({"a": 2}), [], entry(), expected_revision=0)
    assert store.load("lb").objects["settings"].value == {"a": 1}
    assert [e.revision for e in store.audit()] == [1]  # the refused commit left no audit entry


def test_store_commit_compares_each_expected_object_revision(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.commit("lb", {"vips/a": Obj({"n": 1}, 0.0)}, [], entry(), expected={"vips/a": 0})
    store.commit("lb", {"vips/b": Obj({"n": 1}, 1.0)}, [], entry(), expected={"vips/b": 0})
    # a writer of vips/a based on its revision 1 is not disturbed by the write of vips/b (revision 2)
    assert store.commit("lb", {"vips/a": Obj({"n": 2}, 0.0)}, [], entry(), expected={"vips/a": 1}) == 3
    with pytest.raises(RevisionConflict, match="lb object vips/a is at revision 3, not 1"):
        store.commit("lb", {"vips/a": Obj({"n": 3}, 0.0)}, [], entry(), expected={"vips/a": 1})
    with pytest.raises(RevisionConflict, match=r"lb object vips/b already exists \(revision 2\)"):
        store.commit("lb", {"vips/b": Obj({"n": 3}, 0.0)}, [], entry(), expected={"vips/b": 0})
    with pytest.raises(RevisionConflict, match="lb has no object vips/c"):
        store.commit("lb", {}, ["vips/c"], entry(), expected={"vips/c": 4})
    loaded = store.load("lb")
    assert loaded.revision == 3
    assert {k: (o.value, o.revision) for k, o in loaded.objects.items()} == {"vips/a": ({"n": 2}, 3),
                                                                         "vips/b": ({"n": 1}, 2)}


def test_a_whole_state_of_an_older_agent_is_read_as_legacy(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store._db.execute("INSERT INTO state VALUES ('lb', '{\"vips\": []}', 7, 5.0)")
    loaded = store.load("lb")
    assert (loaded.legacy_state, loaded.revision, loaded.objects) == ({"vips": []}, 7, {})
    assert store.commit("lb", settings({}), [], entry(), expected_revision=7) == 8
    assert store.load("lb").legacy_state is None


def test_audit_is_newest_first_filtered_and_limited(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.commit("lb", settings({}), [], entry(summary="first"), expected_revision=0)
    store.record(entry(outcome="invalid", summary="second"))
    store.record(entry(app="ddos", outcome="refused", summary="third"))
    assert [e.summary for e in store.audit()] == ["third", "second", "first"]
    assert [e.summary for e in store.audit(app="lb")] == ["second", "first"]
    assert [e.summary for e in store.audit(limit=1)] == ["third"]
    assert store.audit(app="lb")[1].revision == 1


@pytest.mark.parametrize("old, new, summary", [
    ({"a": 1}, {"a": 1}, "no change"),
    ({"a": 1}, {"a": 2}, "~a: 1 -> 2"),
    ({}, {"vips": []}, "+vips"),
    ({"vips": [{"port": 80}]}, {"vips": [{"port": 80}, {"port": 81}]}, "+vips[1]"),
    ({"vips": [{"port": 80}, {"port": 81}]}, {"vips": [{"port": 8080}]}, "~vips[0].port: 80 -> 8080; -vips[1]"),
    ({"x": {"y": "a"}}, {}, "-x"),
    ({"n": "a" * 100}, {"n": "b"}, "~n: '" + "a" * 36 + "... -> 'b'"),
])
def test_diff_summary(old, new, summary):
    assert diff_summary(old, new) == summary


def test_diff_summary_counts_what_it_does_not_list():
    summary = diff_summary({}, {f"k{i:02}": i for i in range(20)})
    assert summary.endswith("; and 12 more")
    assert summary.startswith("+k00; +k01")


def test_stats_become_gauges_with_the_last_level_as_label():
    registry = CollectorRegistry()

    class Stats:
        def collect(self):
            return stats_metrics("lb", {"packets": 7, "up": True, "name": "skip me",
                                        "drops": {"no-vip": 2, "ttl": 1}, "vips": {"a": {"bytes": 9}}})

    registry.register(Stats())
    text = generate_latest(registry).decode()
    assert "bpfnet_lb_packets 7.0" in text
    assert "bpfnet_lb_up 1.0" in text
    assert 'bpfnet_lb_drops{key="no-vip"} 2.0' in text
    assert 'bpfnet_lb_drops{key="ttl"} 1.0' in text
    assert 'bpfnet_lb_vips_a{key="bytes"} 9.0' in text
    assert "skip" not in text


class EmptyState(BaseModel):
    pass


class NoopController(Controller):
    name = "noop"
    state_model = EmptyState

    def start(self, state): ...
    def apply(self, state): ...
    def stats(self): return {}
    def stop(self, detach): ...


def test_registry_by_name_and_by_import_path():
    assert load_controller(f"{__name__}:NoopController") is NoopController
    assert CONTROLLERS["noop"] is NoopController
    assert load_controller("noop") is NoopController


@pytest.mark.parametrize("spec, message", [
    ("nosuchapp", "unknown app 'nosuchapp': known apps are "),
    ("no.such.module:Thing", "cannot load controller 'no.such.module:Thing': No module named 'no'"),
    (f"{__name__}:EmptyState", f"'{__name__}:EmptyState' is not a Controller subclass"),
])
def test_registry_errors_name_the_problem(spec, message):
    with pytest.raises(UnknownAppError) as info:
        load_controller(spec)
    assert str(info.value).startswith(message)


def test_register_needs_name_and_model():
    class Nameless(NoopController):
        name = ""

    with pytest.raises(TypeError, match="needs class attributes `name` and `state_model`"):
        register(Nameless)
