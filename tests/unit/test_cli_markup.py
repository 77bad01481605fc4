"""Issue 14, defect 7: stored strings (rule comments, expressions, audit summaries, tick errors) are
printed as text. Rich markup in them neither crashes a listing for everyone nor vanishes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bpfnet.agent import cli as agent_cli
from bpfnet.ddos import cli as ddos_cli
from bpfnet.podnet import cli as podnet_cli
from support.fake_agent import FakeAgent, install

runner = CliRunner()
COMMENT = "[/red] oops"
EXPR = "tcp[tcpflags] & tcp-syn != 0"


class MarkupAgent(FakeAgent):
    """Stored strings with Rich markup in every answer."""

    def health(self):
        return {"status": "ok", "pid": 1, "version": "0", "uptime_s": 1.0, "ticks": 1,
                "apps": {"ddos": {"revision": 1, "tick_errors": 1, "last_tick_error": f"ValueError: {COMMENT}"}}}

    def audit(self, limit, app):
        return [{"time": 0.0, "who": "uid=0 pid=1", "app": "ddos", "outcome": "applied", "revision": 1,
                 "summary": f"+rules[0] {COMMENT} {EXPR}"}]


QUERIES = {
    "rules": [{"id": 1, "expr": EXPR, "action": "drop", "rate": None, "per_source": False, "packets": 0, "bytes": 0,
               "last_match_s_ago": None, "expires": None, "in_force": True, "comment": COMMENT}],
    "detector": {"enabled": True, "dry_run": False, "destinations": 1, "events": 0, "counters": {"samples": 0},
                 "attacks": [], "rules": [{"name": "[bold]x", "expression": EXPR, "destination": "10.0.0.1:80"}]},
    "services": [{"namespace": "x", "name": "s", "vip": EXPR, "backends": [COMMENT], "affinity": "none",
                  "connects": 0, "datagrams": 0, "refused": 0, "fallback_flows": 0, "fallback_packets": 0}],
}


@pytest.fixture(autouse=True)
def fake_agent(monkeypatch):
    agent = install(monkeypatch, MarkupAgent(queries=QUERIES))  # the CLI kit's call_agent
    monkeypatch.setattr(agent_cli, "AgentClient", lambda *args, **kwargs: agent)


@pytest.mark.parametrize("app, args", [
    (ddos_cli.app, ["rule", "list"]),
    (ddos_cli.app, ["auto", "status"]),
    (agent_cli.app, ["status"]),
    (agent_cli.app, ["audit"]),
])
def test_markup_in_stored_strings_is_printed_as_text(app, args):
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "MarkupError" not in result.output
    text = " ".join(result.output.split())
    assert COMMENT in text or EXPR in text
    if "rule" in args or "audit" in args:
        assert COMMENT in text and EXPR in text


def test_podnet_tables_print_cells_as_text():
    result = runner.invoke(podnet_cli.service_app, ["list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert COMMENT in out and EXPR in out
