"""`bpfnet agent` commands without a running agent, mounted the way the main CLI mounts them."""

import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bpfnet.agent.api import create_api
from bpfnet.agent.cli import app as agent_app
from bpfnet.agent.core import Agent
from bpfnet.agent.store import SQLiteStore

main = typer.Typer()
main.add_typer(agent_app, name="agent")


@main.command()
def version() -> None:  # a second command, so that "agent" stays a sub-command
    print("x")


def test_status_without_an_agent_says_how_to_start_one(tmp_path):
    sock = tmp_path / "a.sock"
    result = CliRunner().invoke(main, ["agent", "status", "--socket", str(sock)])
    assert result.exit_code == 1
    assert f"error: agent not running at {sock}: start it with `bpfnet agent --background`" in result.output


def test_stop_and_audit_without_an_agent_fail_cleanly(tmp_path):
    sock = str(tmp_path / "a.sock")
    for argv in (["agent", "stop", "--socket", sock], ["agent", "audit", "--socket", sock]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1
        assert "agent not running at" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_listen_needs_token_and_tls(tmp_path):
    result = CliRunner().invoke(main, ["agent", "--socket", str(tmp_path / "a.sock"), "--listen", "127.0.0.1:7443"],
                                env={"BPFNET_AGENT_TOKEN": ""})
    assert result.exit_code == 1
    assert "--listen needs --token" in result.output
    result = CliRunner().invoke(main, ["agent", "--socket", str(tmp_path / "a.sock"), "--listen", "7443"])
    assert result.exit_code == 1
    assert "--listen wants HOST:PORT, not '7443'" in result.output


def test_shutdown_endpoint_needs_a_server_and_passes_detach(tmp_path):
    agent = Agent(SQLiteStore(tmp_path / "s.db"), [])
    client = TestClient(create_api(agent))
    assert client.post("/v1/shutdown").status_code == 503
    requests = []
    agent.on_shutdown_request = lambda: requests.append(True)
    response = client.post("/v1/shutdown", params={"detach": "true"})
    assert response.status_code == 202
    assert requests == [True] and agent.detach_on_exit is True
