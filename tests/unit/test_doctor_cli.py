"""`bpfnet doctor` prints its checks through the app kit (table, json, yaml) and exits 1 when a
required check fails; the probes themselves are replaced here (they need root and BPF)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from bpfnet import doctor
from bpfnet.cli import app

runner = CliRunner()


def checks(*failing: str) -> list[doctor.Check]:
    return [doctor.Check("kernel", "kernel" not in failing, "6.18 [bold]"),
            doctor.Check("trafficgen", "trafficgen" not in failing, "xdp", required=False)]


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_doctor_data(monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda: checks("trafficgen"))
    result = runner.invoke(app, ["doctor", "-o", output])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output) if output == "json" else yaml.safe_load(result.output)
    assert data == [{"name": "kernel", "ok": True, "detail": "6.18 [bold]", "required": True},
                    {"name": "trafficgen", "ok": False, "detail": "xdp", "required": False}]


def test_doctor_table_and_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda: checks("kernel"))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert "bpfnet doctor" in result.output
    assert "FAIL" in result.output and "6.18 [bold]" in result.output  # details are text, not markup
