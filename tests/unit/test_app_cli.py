"""The CLI kit: output formats, tables that print text as text, one way to call the agent."""

import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bpfnet.app import cli as kit
from bpfnet.app.cli import Output, OutputOption, call_agent, plain_table, render
from bpfnet.app.client import AgentRequestError

runner = CliRunner()
TRICKY = ["[fc00::1]:80/tcp", "tcp[13] & 2 != 0", "[bold red]not bold[/]", "[/]"]


def _command(data, tables=None):
    app = typer.Typer()

    @app.command()
    def show(output: Output = OutputOption) -> None:
        render(data, output, tables)

    return app


def test_tables_print_markup_as_text():
    rows = [{"name": text, "value": i} for i, text in enumerate(TRICKY)]
    app = _command(rows, lambda: plain_table(["name [x]", "value"], [(r["name"], r["value"]) for r in rows],
                                             title="[title]"))
    result = runner.invoke(app, [], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in [*TRICKY, "name [x]", "[title]"]:
        assert text in result.output


@pytest.mark.parametrize("output, parse", [("json", json.loads), ("yaml", yaml.safe_load), ("YAML", yaml.safe_load)])
def test_json_and_yaml_give_the_data_back(output, parse):
    data = {"vips": [{"name": TRICKY[0], "packets": 3}], "none": None}
    result = runner.invoke(_command(data, lambda: plain_table(["x"], [])), ["-o", output])
    assert result.exit_code == 0 and parse(result.output) == data


def test_without_tables_a_table_is_yaml_and_unknown_formats_are_refused():
    assert yaml.safe_load(runner.invoke(_command({"a": [1]}), []).output) == {"a": [1]}
    result = runner.invoke(_command({"a": 1}), ["-o", "xml"])
    assert result.exit_code == 2 and "xml" in result.output


def test_cells_none_print_as_a_dash():
    table = plain_table(["a", "b"], [(None, 0)])
    assert [list(c.cells) for c in table.columns] == [["-"], ["0"]]


def test_call_agent_turns_refusals_into_one_line(monkeypatch, capsys):
    class Refusing:
        def __init__(self, socket):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def get_state(self, app):
            raise AgentRequestError("invalid state for lb: vips.0.port: too big", 422)

    monkeypatch.setattr(kit, "AgentClient", Refusing)
    with pytest.raises(typer.Exit) as exited:
        call_agent("/nowhere", lambda client: client.get_state("lb"))
    assert exited.value.exit_code == 1
    assert capsys.readouterr().err == "error: invalid state for lb: vips.0.port: too big\n"
