"""Issue 14, defect 9: `-f FILE` reads only regular files of bounded size, and an error about a
file that is not a config does not echo its lines."""

from __future__ import annotations

import os
import threading

import pytest
from typer.testing import CliRunner

from bpfnet.configfile import MAX_CONFIG_BYTES, ConfigFileError, read_config_text
from bpfnet.ddos import cli as ddos_cli
from bpfnet.lb import cli as lb_cli
from bpfnet.podnet import cli as podnet_cli

SHADOW = "root:$y$j9T$secrethash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def test_device_files_are_refused_without_reading_them():
    with pytest.raises(ConfigFileError, match="/dev/zero: not a regular file"):
        read_config_text("/dev/zero")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(_error(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    assert result == [f"{fifo}: not a regular file"]


def _error(path) -> str:
    try:
        read_config_text(path)
    except ConfigFileError as err:
        return str(err)
    return "read"


def test_a_file_over_the_limit_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as out:
        out.truncate(MAX_CONFIG_BYTES + 1)
    assert _error(big) == f"{big}: larger than 16 MiB, the limit of a config"


@pytest.mark.parametrize("cli, args", [
    (lb_cli.app, ["apply"]),
    (ddos_cli.app, ["apply"]),
    (podnet_cli.app, ["policy", "apply"]),
])
def test_errors_about_a_file_that_is_not_a_config_do_not_echo_its_lines(tmp_path, cli, args):
    secret = tmp_path / "shadow"
    secret.write_text(SHADOW)
    result = CliRunner().invoke(cli, [*args, "-f", str(secret), "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert "secrethash" not in result.output and "daemon" not in result.output
