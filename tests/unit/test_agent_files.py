"""Issue 14, defects 4 and 8: the agent's socket and pid files, and a background start that fails.
A real `bpfnet agent --background` runs here with a stand-in app (no data plane, no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bpfnet.agent import cli as agent_cli
from bpfnet.agent.store import AuditEntry, SQLiteStore
from bpfnet.app.objects import Obj

main = typer.Typer()
main.add_typer(agent_cli.app, name="agent")


@main.command()
def version() -> None:
    print("x")


STANDIN = textwrap.dedent('''
    from pydantic import BaseModel, ConfigDict, Field
    from bpfnet.app.controller import Controller

    class State(BaseModel):
        model_config = ConfigDict(extra="forbid")
        size: int = Field(1, ge=1, le=10)

    class Standin(Controller):
        name = "standin"
        state_model = State
        def start(self, state): pass
        def apply(self, state): pass
        def stats(self): return {}
        def stop(self, detach): pass
''')


@pytest.fixture
def env(tmp_path, monkeypatch):
    (tmp_path / "standin_app.py").write_text(STANDIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def agent(*args: str):
    return CliRunner().invoke(main, ["agent", *args])


def start_args(tmp: Path, sock: Path) -> list[str]:
    return ["--socket", str(sock), "--state-db", str(tmp / "state.db"), "--pin-root", str(tmp / "pins"),
            "--apps", "standin_app:Standin"]


@pytest.fixture
def unrelated():
    """A process that is not an agent, whose pid a stale pid file might hold."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("background", [False, True])
def test_a_regular_file_at_the_socket_path_is_refused_and_kept(env, background):
    victim = env / "precious.txt"
    victim.write_text("keep me\n")
    result = agent(*start_args(env, victim), *(["--background"] if background else []))
    assert result.exit_code == 1
    assert f"{victim} exists and is a regular file, not a unix socket: refusing to replace it" in result.output
    assert victim.read_text() == "keep me\n"


def test_stop_does_not_signal_a_process_that_is_not_the_agent(env, unrelated):
    sock = env / "a.sock"
    agent_cli.pidfile_for(sock).write_text(f"{unrelated.pid}\n")
    result = agent("stop", "--socket", str(sock))
    assert result.exit_code == 1
    assert f"names pid {unrelated.pid}, which is not a bpfnet agent" in result.output
    assert unrelated.poll() is None  # still running


def test_a_stale_pid_file_with_a_reused_pid_does_not_block_start_and_stop_works(env, unrelated):
    sock = env / "a.sock"
    agent_cli.pidfile_for(sock).write_text(f"{unrelated.pid}\n")
    result = agent(*start_args(env, sock), "--background")
    try:
        assert result.exit_code == 0, result.output
        assert "agent started" in result.output
        pid = int(agent_cli.pidfile_for(sock).read_text())
        assert pid != unrelated.pid and agent_cli.is_agent_process(pid, sock)
        assert not agent_cli.is_agent_process(pid, env / "other.sock")
        assert not agent_cli.is_agent_process(unrelated.pid, sock)
        again = agent(*start_args(env, sock), "--background")
        assert again.exit_code == 1 and f"an agent already runs (pid {pid}" in again.output
    finally:
        stopped = agent("stop", "--socket", str(sock))
    assert stopped.exit_code == 0, stopped.output
    assert unrelated.poll() is None


def test_background_start_with_an_invalid_stored_state_prints_the_reason(env):
    store = SQLiteStore(env / "state.db")
    store.commit("standin", {"settings": Obj({"size": 99}, 0.0)}, [], AuditEntry(0.0, "test", "standin", "applied", ""))
    store.close()
    sock = env / "a.sock"
    result = agent(*start_args(env, sock), "--background")
    assert result.exit_code == 1
    assert "Connection reset" not in result.output
    assert "standin: stored state (revision 1) does not validate: size: Input should be less than or " \
           "equal to 10" in " ".join(result.output.split())
    assert not sock.exists()
