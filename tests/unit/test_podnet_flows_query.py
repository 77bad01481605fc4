"""The controller's side of flows without a kernel: the "flows" query (filters, --last, follow by
`since_seen`), its parameter errors, flow metrics in stats(), and that every drop reason the data
plane counts has a name in flows.DropReason."""

import json

import pytest

from bpfnet.agent.controller import stats_metrics
from bpfnet.podnet.controller import PodnetController
from bpfnet.podnet.dataplane import Outcome
from bpfnet.podnet.flows import DropReason, Endpoint, Flow


def flow(src, dst, verdict="FORWARDED", reason="", port=80, t=1.0):
    def ep(name, p):
        ns, _, pod = name.partition("/")
        return Endpoint("10.0.0.1", p, 300, ns, pod, (f"pod={pod}",))
    return Flow(t, "n1", ep(src, 40000), ep(dst, port), "TCP", "egress", verdict, reason, ("SYN",))


@pytest.fixture
def controller(tmp_path):
    c = PodnetController(tmp_path)
    for i, f in enumerate([flow("x/a", "y/a"), flow("x/b", "y/a", "DROPPED", "POLICY_DENIED"),
                           flow("x/a", "y/b", port=81), flow("z/a", "y/a", "DROPPED", "POLICY_DENIED")]):
        c._record(f)
    return c


def names(answer):
    return [(f["source"]["pod"], f["destination"]["pod"], f["verdict"]) for f in answer["flows"]]


def test_flows_query_filters_and_last(controller):
    dropped = controller.query("flows", {"filters": json.dumps(["--verdict", "dropped"]), "last": "5"})
    assert names(dropped) == [("b", "a", "DROPPED"), ("a", "a", "DROPPED")]
    assert dropped["seen"] == 4 and dropped["lost_events"] == 0
    assert names(controller.query("flows", {"filters": ["--not", "--verdict", "dropped"], "last": 1})) == [
        ("a", "b", "FORWARDED")]
    assert len(controller.query("flows", {})["flows"]) == 4


def test_follow_by_since_seen(controller):
    seen = controller.query("flows", {"last": 1})["seen"]
    controller._record(flow("x/c", "y/c"))
    controller._record(flow("x/c", "y/c", "DROPPED", "POLICY_DENIED"))
    answer = controller.query("flows", {"since_seen": str(seen), "filters": '["--verdict", "forwarded"]'})
    assert names(answer) == [("c", "c", "FORWARDED")] and answer["seen"] == 6
    assert controller.query("flows", {"since_seen": 6})["flows"] == []


@pytest.mark.parametrize("params, message", [
    ({"filters": "not json"}, "filters: expected a JSON list"),
    ({"filters": '{"a": 1}'}, "filters: expected a list"),
    ({"filters": '["--verdict", "maybe"]'}, "--verdict 'maybe'"),
    ({"last": "many"}, "last: 'many' is not a number"),
    ({"since_seen": "-1"}, "since_seen: -1 is negative"),
])
def test_bad_parameters_are_value_errors_naming_them(controller, params, message):
    with pytest.raises(ValueError, match=message):
        controller.query("flows", params)


def test_stats_count_flows_by_verdict_and_drops_by_reason(controller):
    stats = controller.stats()
    assert stats["flows"] == {"by_verdict": {"FORWARDED": 2, "DROPPED": 2},
                              "drops_by_reason": {"POLICY_DENIED": 2}}
    assert stats["flow_events"] == {"seen": 4, "buffered": 4, "lost": 0}
    metrics = {m.name: {tuple(s.labels.values()): s.value for s in m.samples}
               for m in stats_metrics("podnet", stats)}
    assert metrics["bpfnet_podnet_flows_by_verdict"] == {("FORWARDED",): 2, ("DROPPED",): 2}
    assert metrics["bpfnet_podnet_flows_drops_by_reason"] == {("POLICY_DENIED",): 2}
    assert metrics["bpfnet_podnet_flow_events"][("lost",)] == 0


def test_every_counted_drop_has_a_drop_reason_name():
    drops = {o.value for o in Outcome if o.name.startswith("DROP_")}
    assert drops <= {r.value for r in DropReason}


def test_observe_prints_json_lines_and_warns_about_lost_events(monkeypatch):
    from dataclasses import asdict

    from typer.testing import CliRunner

    from bpfnet.podnet import cli

    asked = []

    class FakeAgent:
        def __init__(self, socket):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def query(self, app, name, **params):
            asked.append((app, name, params))
            return {"flows": [asdict(flow("x/a", "y/a", "DROPPED", "POLICY_DENIED"))], "seen": 7,
                    "lost_events": 5}

    monkeypatch.setattr(cli, "AgentClient", FakeAgent)
    result = CliRunner().invoke(cli.app, ["observe", "--verdict", "dropped", "--not", "--pod", "z/",
                                          "--last", "5", "-o", "json"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert json.loads(lines[0])["drop_reason"] == "POLICY_DENIED"
    assert lines[1] == "warning: 5 flow events lost in the data plane (ring buffer full)"
    assert asked == [("podnet", "flows", {"filters": '["--verdict", "dropped", "--not", "--pod", "z/"]',
                                          "last": 5})]
    bad = CliRunner().invoke(cli.app, ["observe", "--verdict", "maybe"])
    assert (bad.exit_code, bad.output.strip()) == (
        1, "error: --verdict 'maybe': use one of forwarded, dropped, translated")
