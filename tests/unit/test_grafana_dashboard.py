"""docs/grafana-dashboard.json: a well-formed Grafana dashboard whose every expression asks for
metrics the agent really exports.

The structural checks need nothing; the metric check (root) starts an agent with every available
app, gives each a state and some traffic, reads its /metrics, and requires every metric name, and
every `key` label an expression selects, to be there.
Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/unit/test_grafana_dashboard.py
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpfnet.app.controller import BUILTIN_APPS
from support.apps import importable_apps

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bbpfnet_[a-z0-9_]+\b")
# a selector: metric{matchers}; matchers are label="v", label=~"re", label!="v", label!~"re"
SELECTOR = re.compile(r"\b(bpfnet_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in data_panels(dashboard) for t in p["targets"]]


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable():
    dashboard = load()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["definition"] == "label_values(bpfnet_agent_up, instance)"
    for panel in data_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip() and target["refId"]


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = load()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_app_has_a_row_and_every_selector_is_scoped_to_the_chosen_agents():
    dashboard = load()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Agent", "Load balancer (lb)", "DDoS rules (ddos)", "Pod network (podnet)"]
    for expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = METRIC.findall(expr)
        selectors = SELECTOR.findall(expr)
        assert names and len(selectors) == len(names), expr  # every metric has a {...} selector
        for _, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, expr


def test_the_dashboard_covers_every_app_and_the_issue_s_metrics():
    used = {name for expr in expressions(load()) for name in METRIC.findall(expr)}
    for prefix in ("bpfnet_agent_", "bpfnet_lb_", "bpfnet_ddos_", "bpfnet_podnet_"):
        assert any(name.startswith(prefix) for name in used), prefix
    # per-VIP and per-real traffic, drops by reason, rule hits, detector state, policy verdicts,
    # lost events, agent health
    assert {"bpfnet_lb_vip_packets", "bpfnet_lb_real_packets", "bpfnet_lb_packets", "bpfnet_ddos_rule_packets",
            "bpfnet_ddos_packets", "bpfnet_ddos_detector", "bpfnet_podnet_packets", "bpfnet_podnet_flows_by_verdict",
            "bpfnet_podnet_flow_events", "bpfnet_agent_up", "bpfnet_agent_tick_errors_total"} <= used


# --- against a real agent ----------------------------------------------------------------------

def _states(netns: str) -> dict[str, dict]:
    """A small state per app: a VIP with reals, a rule and the detector, two pods and a policy."""
    return {
        "lb": {"settings": {"ring_size": 13, "max_vips": 2, "max_reals": 4, "conn_table_size": 64},
               "vips": [{"address": "10.94.0.1", "port": 80, "reals": [{"address": "10.94.1.1"},
                                                                         {"address": "10.94.1.2"}]}]},
        "ddos": {"rules": [{"expr": "udp port 53"}], "detector": {}},
        "podnet": {
            "nodes": [{"name": "n1", "pod_cidr": "10.94.64.0/24", "netns": netns}],
            "namespaces": [{"name": "prod"}, {"name": "dev"}],
            "pods": [{"namespace": "prod", "name": "web", "labels": {"app": "web"}, "node": "n1"},
                     {"namespace": "dev", "name": "client", "node": "n1"}],
            "policies": [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": "deny-all", "namespace": "prod"},
                          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}],
        },
    }


def _podnet_traffic(netns: str, endpoints: list[dict]) -> None:
    """UDP each way between the two pods: client -> web is denied by the policy, web -> client is
    forwarded and delivered (a few datagrams: the first ones may wait for ARP)."""
    import socket

    from bpfnet.netns import inside

    address = {f"{e['namespace']}/{e['name']}": e["address"] for e in endpoints}
    for source, target in (("dev.client", "prod/web"), ("prod.web", "dev/client")):
        with inside(f"{netns}.{source}"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for _ in range(3):
                sock.sendto(b"bpfnet", (address[target], 9))
                time.sleep(0.05)  # pacing only; what is checked below is what the counters hold


def _podnet_counted(stats: dict) -> bool:
    """Both a drop and a delivery are in the packet counters and in the flow-event counters."""
    keys = stats["packets"]
    flows = stats.get("flows", {})
    return (any(k.startswith("drop_") for k in keys) and any(not k.startswith("drop_") for k in keys)
            and bool(flows.get("by_verdict")) and bool(flows.get("drops_by_reason")))


def _matches(op: str, pattern: str, value: str) -> bool:
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    hit = re.fullmatch(pattern, value) is not None  # Prometheus regexes are anchored
    return hit if op == "=~" else not hit


@pytest.mark.root
def test_every_metric_and_key_in_the_dashboard_is_exported_by_the_agent(tmp_path):
    from fastapi.testclient import TestClient

    from bpfnet.agent.api import create_api
    from bpfnet.agent.core import Agent
    from bpfnet.agent.store import SQLiteStore
    from bpfnet.ebpf import pins

    apps = importable_apps()
    tag = "skg-" + secrets.token_hex(3)
    pin_root = pins.PIN_ROOT / tag
    agent = Agent(SQLiteStore(tmp_path / "state.db"), apps, pin_root=pin_root)
    try:
        agent.start()
        api = TestClient(create_api(agent))
        for app, state in _states(tag).items():
            if app in apps:
                assert api.put(f"/v1/apps/{app}/state", json=state).status_code == 200, app
        if "podnet" in apps:
            _podnet_traffic(tag, api.get("/v1/apps/podnet/query/endpoints").json())
            # counted as the veths deliver the datagrams; flow events as the agent's ticks read them
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not _podnet_counted(api.get("/v1/apps/podnet/stats").json()):
                time.sleep(0.1)
        exposition = api.get("/metrics").text
    finally:
        agent.stop(detach=True)
        shutil.rmtree(pin_root, ignore_errors=True)
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if ns.startswith(tag):
                subprocess.run(["ip", "netns", "delete", ns], check=False)

    series: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample.labels)
    problems = []
    for expr in expressions(load()):
        for name, matchers in SELECTOR.findall(expr):
            app = name.split("_")[1]
            if app in BUILTIN_APPS and app not in apps:
                continue  # that app's controller is not installed here
            if name not in series:
                problems.append(f"{name} is not exported (in {expr})")
                continue
            for label, op, pattern in MATCHER.findall(matchers):
                if label == "instance" or op in ("!=", "!~"):
                    continue
                if not any(_matches(op, pattern, labels.get(label, "")) for labels in series[name]):
                    problems.append(f'{name}{{{label}{op}"{pattern}"}} matches no exported series')
    assert not problems, "\n".join(problems)
