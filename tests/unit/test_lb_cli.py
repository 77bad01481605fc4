"""`bpfnet lb ...` against a stand-in agent: state edits, local validation, one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bpfnet.lb import cli
from support.fake_agent import FakeAgent, install

runner = CliRunner()


LB_STATS = {"packets": {"rx": 3, "tx": 2}, "bytes": {"rx": 300, "tx": 240},
            "vip_packets": {"10.200.0.1:80/tcp": 2}, "vip_bytes": {"10.200.0.1:80/tcp": 240},
            "real_packets": {"10.0.0.1": 2}, "real_bytes": {"10.0.0.1": 240}}
LB_QUERIES = {"flow": {"verdict": "tx", "real": "10.0.0.1", "drop_reason": None, "established_real": None},
              "ring": [{"real": "10.0.0.1", "weight": 1, "healthy": True, "slots": 65537, "share": 1.0}],
              "health": []}


@pytest.fixture
def agent(monkeypatch):
    """Holds the lb state like the agent's store; query/stats answers are canned."""
    return install(monkeypatch, FakeAgent({"lb": {"settings": {}, "vips": []}}, stats={"lb": LB_STATS},
                                          queries=LB_QUERIES))


def run(*args):
    return runner.invoke(cli.app, list(args))


def test_vip_and_real_lifecycle(agent):
    assert run("vip", "add", "10.200.0.1:80/tcp", "--flag", "lru_bypass", "--health", "http").exit_code == 0
    assert run("real", "add", "10.200.0.1:80/tcp", "10.0.0.1", "--weight", "3").exit_code == 0
    assert run("real", "add", "10.200.0.1:80/tcp", "10.0.0.2").exit_code == 0
    [vip] = agent.states["lb"]["vips"]
    assert vip["flags"] == ["lru_bypass"] and vip["health_check"]["kind"] == "http"
    assert [(r["address"], r["weight"]) for r in vip["reals"]] == [("10.0.0.1", 3), ("10.0.0.2", 1)]
    assert run("real", "weight", "10.200.0.1:80/tcp", "10.0.0.2", "5").exit_code == 0
    assert run("real", "drain", "10.200.0.1:80/tcp", "10.0.0.1").exit_code == 0
    assert [r["weight"] for r in agent.states["lb"]["vips"][0]["reals"]] == [0, 5]
    assert run("real", "del", "10.200.0.1:80/tcp", "10.0.0.1").exit_code == 0
    assert [r["address"] for r in agent.states["lb"]["vips"][0]["reals"]] == ["10.0.0.2"]
    assert run("vip", "del", "10.200.0.1:80").exit_code == 0  # /tcp is the default
    assert agent.states["lb"]["vips"] == []


def test_ipv6_vip_names(agent):
    assert run("vip", "add", "[fc00::1]:443/udp").exit_code == 0
    assert run("real", "add", "[FC00::1]:443/udp", "fc00::2").exit_code == 0
    assert agent.states["lb"]["vips"][0]["reals"] == [{"address": "fc00::2", "weight": 1}]
    # brackets are shown, not taken for rich markup
    assert "[fc00::1]:443/udp" in runner.invoke(cli.app, ["vip", "list"], terminal_width=200).output


@pytest.mark.parametrize("args, message", [
    (("vip", "add", "10.200.0.1"), "VIP must look like 10.0.0.1:80/tcp"),
    (("vip", "add", "10.200.0.1:80/tcp", "--flag", "turbo"), "flags.0: Input should be"),
    (("vip", "del", "10.9.9.9:80/tcp"), "no VIP 10.9.9.9:80/tcp (VIPs: none)"),
    (("real", "add", "10.9.9.9:80/tcp", "10.0.0.1"), "no VIP 10.9.9.9:80/tcp"),
])
def test_errors_are_one_line_and_change_nothing(agent, args, message):
    result = run(*args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert agent.puts == []


def test_real_errors(agent):
    run("vip", "add", "[fc00::1]:80/tcp")
    agent.puts.clear()
    for args, message in [
        (("real", "add", "[fc00::1]:80/tcp", "10.0.0.1"), "an IPv6 VIP needs IPv6 reals"),
        (("real", "add", "[fc00::1]:80/tcp", "nope"), "'nope' is not an IP address"),
        (("real", "add", "[fc00::1]:80/tcp", "fc00::2", "-w", "-1"),
         "weight: Input should be greater than or equal to 0"),
        (("real", "del", "[fc00::1]:80/tcp", "fc00::9"), "has no real fc00::9"),
        (("real", "weight", "[fc00::1]:80/tcp", "fc00::9", "2"), "has no real fc00::9"),
    ]:
        result = run(*args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    run("real", "add", "[fc00::1]:80/tcp", "fc00::2")
    result = run("real", "add", "[fc00::1]:80/tcp", "fc00::2")
    assert result.exit_code == 1 and "has real fc00::2 already" in result.output
    result = run("vip", "add", "[fc00::1]:80/tcp")
    assert result.exit_code == 1 and "exists already" in result.output


def test_apply_file(agent, tmp_path):
    good = tmp_path / "lb.yaml"
    good.write_text("settings: {gateway_mac: '02:00:00:00:00:01'}\n"
                    "vips:\n  - {address: 10.200.0.1, port: 80, reals: [{address: 10.0.0.1}]}\n")
    result = run("apply", "-f", str(good))
    assert result.exit_code == 0 and "1 VIPs" in result.output
    assert agent.states["lb"]["settings"]["gateway_mac"] == "02:00:00:00:00:01"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vips:\n  - {address: 10.200.0.1, port: 80, reals: [{address: 10.0.0.1, weight: lots}]}\n")
    result = run("apply", "-f", str(bad))
    assert result.exit_code == 1 and "vips.0.reals.0.weight" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("vips: [\n")
    assert run("apply", "-f", str(broken)).exit_code == 1
    assert len(agent.puts) == 1


def test_reading_commands(agent):
    run("vip", "add", "10.200.0.1:80/tcp")
    run("real", "add", "10.200.0.1:80/tcp", "10.0.0.1")
    result = run("flow", "192.168.1.1:31337", "10.200.0.1:80/tcp")
    assert result.exit_code == 0 and "real 10.0.0.1" in result.output
    assert agent.queries[-1] == ("flow", {"src": "192.168.1.1", "sport": 31337, "dst": "10.200.0.1",
                                          "dport": 80, "protocol": "tcp"})
    assert '"share": 1.0' in run("ring", "10.200.0.1:80/tcp", "-o", "json").output
    assert "10.0.0.1" in run("real", "list", "10.200.0.1:80/tcp").output
    assert '"tx": 2' in run("stats", "-o", "json").output
    assert run("stats").exit_code == 0 and run("vip", "list").exit_code == 0 and run("health").exit_code == 0
    agent.stats_answers["lb"] = {**LB_STATS, "conn_table_size": 4194304, "map_bytes": 490 * 2**20}
    shown = runner.invoke(cli.app, ["stats"], terminal_width=200).output
    assert "4,194,304 flows" in shown and "490 MiB" in shown
    assert "10.200.0.1" in run("show").output


def test_down_reals_and_server_ids(agent):
    run("vip", "add", "10.200.0.5:53/udp", "--flag", "udp_flow_migration", "--flag", "udp_stable_routing")
    run("real", "add", "10.200.0.5:53/udp", "10.0.0.1")
    assert run("real", "down", "10.200.0.5:53", "10.0.0.1").exit_code == 1  # /tcp by default: no such VIP
    assert run("real", "down", "10.200.0.5:53/udp", "10.0.0.1").exit_code == 0
    assert agent.states["lb"]["down_reals"] == [{"vip": "10.200.0.5:53/udp", "address": "10.0.0.1"}]
    result = run("real", "del", "10.200.0.5:53/udp", "10.0.0.1")
    assert result.exit_code != 0 and agent.states["lb"]["vips"][0]["reals"]  # marked down: refused
    assert run("real", "up", "10.200.0.5:53/udp", "10.0.0.1").exit_code == 0
    assert agent.states["lb"]["down_reals"] == []
    result = run("real", "down", "10.200.0.5:53/udp", "10.0.0.9")
    assert result.exit_code == 1 and "VIP 10.200.0.5:53/udp has no real 10.0.0.9" in result.output

    assert run("server-id", "add", "1024", "10.0.0.1").exit_code == 0
    assert run("server-id", "add", "1024", "10.0.0.2").exit_code == 0  # replaces
    assert agent.states["lb"]["server_ids"] == [{"id": 1024, "address": "10.0.0.2"}]
    assert "10.0.0.2" in run("server-id", "list").output
    for args, message in [(("server-id", "add", "0", "10.0.0.1"), "server id must be 1..4294967295"),
                          (("server-id", "add", "5", "nope"), "'nope' is not an IP address"),
                          (("server-id", "del", "77"), "no server id 77")]:
        result = run(*args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert run("server-id", "del", "1024").exit_code == 0
    assert agent.states["lb"]["server_ids"] == []
    result = run("vip", "add", "10.200.0.6:80/tcp", "--flag", "udp_flow_migration")
    assert result.exit_code == 1 and "applies to UDP VIPs only" in result.output


def test_source_routes(agent):
    assert run("src-route", "add", "192.168.0.0/16", "10.0.0.1").exit_code == 0
    assert run("src-route", "add", "fc00:2::/32", "fc00::2").exit_code == 0
    assert run("src-route", "add", "192.168.0.0/16", "10.0.0.3").exit_code == 0  # replaces
    assert agent.states["lb"]["source_routes"] == [{"prefix": "fc00:2::/32", "address": "fc00::2"},
                                                   {"prefix": "192.168.0.0/16", "address": "10.0.0.3"}]
    assert "192.168.0.0/16" in run("src-route", "list").output
    for args, message in [(("src-route", "add", "192.168.1.1/16", "10.0.0.1"), "has host bits set"),
                          (("src-route", "add", "fc00:3::/32", "10.0.0.1"), "IPv6 clients need an IPv6 real"),
                          (("src-route", "del", "10.9.0.0/16"), "no source route 10.9.0.0/16")]:
        result = run(*args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert run("src-route", "del", "192.168.0.0/16").exit_code == 0
    assert [r["prefix"] for r in agent.states["lb"]["source_routes"]] == ["fc00:2::/32"]
