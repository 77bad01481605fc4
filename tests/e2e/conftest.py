"""Shared end-to-end fixtures."""

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bpfnet.ebpf import pins


@pytest.fixture(scope="session")
def background_agent():
    """`with background_agent(apps, pin_name) as socket:` a real agent started with `bpfnet agent
    --background` (its own socket, store and pin root), stopped with --detach and its pins and
    files removed afterwards, also when the test fails."""
    @contextlib.contextmanager
    def run(apps: str, pin_name: str):
        workdir = Path(tempfile.mkdtemp(prefix=f"{pin_name}-"))
        sock = workdir / "agent.sock"
        pin_root = pins.pin_dir(pin_name)

        def agent_cli(*args):
            return subprocess.run([sys.executable, "-m", "bpfnet.agent", *args], capture_output=True,
                                  text=True, timeout=120)
        started = agent_cli("--socket", str(sock), "--state-db", str(workdir / "state.db"),
                            "--apps", apps, "--pin-root", str(pin_root), "--background")
        assert started.returncode == 0, started.stderr
        try:
            yield sock
        finally:
            agent_cli("stop", "--socket", str(sock), "--detach")
            pins.unpin(pin_root)
            shutil.rmtree(workdir, ignore_errors=True)
    return run
