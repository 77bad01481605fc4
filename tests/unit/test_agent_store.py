"""The agent's pure parts: SQLite store, change summaries, stats -> metrics, the app registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from bpfnet.agent.audit import diff_summary
from bpfnet.agent.store import AuditEntry, RevisionConflict, SQLiteStore
from bpfnet.app.controller import (
    CONTROLLERS,
    Controller,
    UnknownAppError,
    load_controller,
    register,
    stats_metrics,
)


def entry(app="lb", outcome="applied", summary="s"):
    return AuditEntry(time=100.0, who="uid=0 pid=1", app=app, outcome=outcome, summary=summary)


def test_store_saves_with_increasing_revisions_and_reloads(tmp_path):
    store = SQLiteStore(tmp_path / "sub" / "state.db")
    assert store.load("lb") is None
    assert store.save("lb", {"vips": [1]}, entry(), expected_revision=0) == 1
    assert store.save("lb", {"vips": [1, 2]}, entry(), expected_revision=1) == 2
    store.close()
    reopened = SQLiteStore(tmp_path / "sub" / "state.db")
    loaded = reopened.load("lb")
    assert (loaded.state, loaded.revision, loaded.updated_at) == ({"vips": [1, 2]}, 2, 100.0)
    assert (tmp_path / "sub" / "state.db").stat().st_mode & 0o777 == 0o600


def test_store_save_is_a_compare_and_swap(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.save("lb", {"a": 1}, entry(), expected_revision=0)
    with pytest.raises(RevisionConflict, match="state of lb is at revision 1, not 0"):
        store.save("lb", {"a": 2}, entry(), expected_revision=0)
    assert store.load("lb").state == {"a": 1}
    assert [e.revision for e in store.audit()] == [1]  # the refused save left no audit entry


def test_audit_is_newest_first_filtered_and_limited(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.save("lb", {}, entry(summary="first"), expected_revision=0)
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
