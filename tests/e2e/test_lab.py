"""`bpfnet lab run` (the README's main job) works end to end and leaves nothing behind."""

import subprocess
import sys

import pytest

from bpfnet.lab import runner
from bpfnet.netns import list_netns

pytestmark = pytest.mark.root


def test_lab_run_shows_every_app_working_and_cleans_up():
    out = subprocess.run([sys.executable, "-m", "bpfnet.cli", "lab", "run"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout[out.stdout.index("Lab summary"):]
    assert "FAILED" not in summary and summary.count("OK") >= 4
    for app in ("lb", "podnet", "ddos"):
        assert f" {app} " in summary
    assert not [ns for ns in list_netns() if ns.startswith(f"{runner.PREFIX}-")]
    assert not runner.PIN_ROOT.exists() and not runner.SOCKET.exists() and not runner.RUN_DIR.exists()
