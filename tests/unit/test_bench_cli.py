"""`bench all` calls every benchmark with its options by name and summarises what they return."""

import ast
import inspect
import textwrap

from bpfnet.bench import cli


def test_bench_all_runs_every_benchmark_with_the_options_given(monkeypatch, tmp_path):
    calls = {}

    def fake(name, returns_list=False):
        def run(**options):
            calls[name] = options
            return [name] if returns_list else name
        return run

    for name in ("generator_rate", "baseline", "lb", "ddos", "syn", "detector"):
        monkeypatch.setattr(cli, name, fake(name))
    for name in ("services", "policy"):
        monkeypatch.setattr(cli, name, fake(name, returns_list=True))
    summary = {}
    monkeypatch.setattr(cli, "write_summary", lambda reports: summary.setdefault("reports", reports) and tmp_path)
    cli.all_(rounds=2, frames=20_000, generator="packet")
    assert summary["reports"] == ["generator_rate", "baseline", "lb", "ddos", "syn", "services", "detector",
                                  "policy"]
    for name in ("baseline", "lb", "ddos", "syn", "detector", "policy"):
        assert calls[name]["generator"] == "packet" and calls[name]["rounds"] == 2, name
    assert calls["baseline"]["frames"] == calls["generator_rate"]["frames"] == 20_000


def test_bench_all_gives_every_command_all_its_parameters():
    """Called as Python functions, a command's option left out is typer's OptionInfo rather than
    its default: every call in `bench all` must name every parameter."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cli.all_)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and isinstance(getattr(cli, node.func.id, None), type(cli.all_)) and node.func.id != "write_summary"]
    assert {call.func.id for call in calls} >= {"baseline", "lb", "ddos", "syn", "services", "detector", "policy"}
    for call in calls:
        wanted = set(inspect.signature(getattr(cli, call.func.id)).parameters)
        given = {keyword.arg for keyword in call.keywords}
        assert given == wanted, f"bench all: {call.func.id}() misses {sorted(wanted - given)}"
