"""The controller's side of flows without a kernel: the "flows" query (filters, --last, follow by
`since_seen`), its parameter errors, flow metrics in stats(), and that every drop reason the data
plane counts has a name in flows.DropReason."""

import json
import socket

import numpy as np
import pytest

from bpfnet.app.controller import stats_metrics
from bpfnet.podnet.controller import PodnetController
from bpfnet.podnet.dataplane import Outcome
from bpfnet.podnet.flows import FLOW_DTYPE, DropReason, Endpoint, Flow, FlowEvent, Verdict


def flow(src, dst, verdict, reason):
    """A Flow as the agent answers it (for the CLI side)."""
    def ep(name, p):
        ns, _, pod = name.partition("/")
        return Endpoint(PODS[name], p, 300, ns, pod, (f"pod={pod}",))
    return Flow(1.0, "n1", ep(src, 40000), ep(dst, 80), "TCP", "egress", verdict, reason, ("SYN",))


PODS = {"x/a": "10.0.0.1", "x/b": "10.0.0.2", "x/c": "10.0.0.3", "z/a": "10.0.0.4",
        "y/a": "10.0.1.1", "y/b": "10.0.1.2", "y/c": "10.0.1.3"}


def record(controller, src, dst, verdict="FORWARDED", reason="", port=80):
    """One event from the kernel's side into the controller's flow store."""
    event = FlowEvent(family=4, protocol=6, verdict=Verdict[verdict], drop_reason=DropReason[reason] if reason else 0,
                      tcp_flags=0x02, src_identity=300, dst_identity=301, packets=1,
                      src_port=socket.htons(40000), dst_port=socket.htons(port))
    event.src_addr[:4] = list(socket.inet_aton(PODS[src]))
    event.dst_addr[:4] = list(socket.inet_aton(PODS[dst]))
    controller.flows.add(np.frombuffer(bytes(event), FLOW_DTYPE), "n1")


@pytest.fixture
def controller(tmp_path):
    c = PodnetController(tmp_path)
    c._pods_by_address = {address: (*key.split("/"), (f"pod={key.split('/')[1]}",)) for key, address in PODS.items()}
    for args in [("x/a", "y/a"), ("x/b", "y/a", "DROPPED", "POLICY_DENIED"), ("x/a", "y/b", "FORWARDED", "", 81),
                 ("z/a", "y/a", "DROPPED", "POLICY_DENIED")]:
        record(c, *args)
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
    record(controller, "x/c", "y/c")
    record(controller, "x/c", "y/c", "DROPPED", "POLICY_DENIED")
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
                              "by_type": {"trace": 2, "drop": 2, "sock": 0},
                              "drops_by_reason": {"POLICY_DENIED": 2}}
    assert stats["flow_events"] == {"seen": 4, "buffered": 4, "lost": 0}
    metrics = {m.name: {tuple(s.labels.values()): s.value for s in m.samples}
               for m in stats_metrics("podnet", stats)}
    assert metrics["bpfnet_podnet_flows_by_verdict"] == {("FORWARDED",): 2, ("DROPPED",): 2}
    assert metrics["bpfnet_podnet_flows_drops_by_reason"] == {("POLICY_DENIED",): 2}
    assert metrics["bpfnet_podnet_flows_by_type"] == {("trace",): 2, ("drop",): 2, ("sock",): 0}
    assert metrics["bpfnet_podnet_flow_events"][("lost",)] == 0


def test_socket_lb_events_count_as_their_own_type(controller):
    event = FlowEvent(family=4, protocol=6, verdict=Verdict.TRANSLATED, packets=1)
    controller.flows.add(np.frombuffer(bytes(event) * 3, FLOW_DTYPE), "n1", "sock")
    assert controller.stats()["flows"]["by_type"] == {"trace": 2, "drop": 2, "sock": 3}
    assert controller.stats()["flows"]["by_verdict"]["TRANSLATED"] == 3


def test_every_counted_drop_has_a_drop_reason_name():
    drops = {o.value for o in Outcome if o.name.startswith("DROP_")}
    assert drops <= {r.value for r in DropReason}


def test_observe_prints_json_lines_and_warns_about_lost_events(monkeypatch):
    from dataclasses import asdict

    from typer.testing import CliRunner

    from bpfnet.podnet import cli
    from support.fake_agent import FakeAgent, install

    answer = {"flows": [asdict(flow("x/a", "y/a", "DROPPED", "POLICY_DENIED"))], "seen": 7, "lost_events": 5}
    agent = install(monkeypatch, FakeAgent(queries={"flows": answer}))
    result = CliRunner().invoke(cli.app, ["observe", "--verdict", "dropped", "--not", "--pod", "z/",
                                          "--last", "5", "-o", "json"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert json.loads(lines[0])["drop_reason"] == "POLICY_DENIED"
    assert lines[1] == "warning: 5 flow events lost in the data plane (ring buffer full)"
    assert agent.queries == [("flows", {"filters": '["--verdict", "dropped", "--not", "--pod", "z/"]',
                                          "last": 5})]
    bad = CliRunner().invoke(cli.app, ["observe", "--verdict", "maybe"])
    assert (bad.exit_code, bad.output.strip()) == (
        1, "error: --verdict 'maybe': use one of forwarded, dropped, translated")
