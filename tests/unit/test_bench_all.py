"""`bpfnet bench all` calls the other bench commands as Python functions, where an option left out
is typer's OptionInfo rather than its default: every call must name every parameter."""

import ast
import inspect
import textwrap

from bpfnet.bench import cli


def test_bench_all_gives_every_command_all_its_parameters():
    tree = ast.parse(textwrap.dedent(inspect.getsource(cli.all_)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and isinstance(getattr(cli, node.func.id, None), type(cli.all_))
             and node.func.id not in ("write_summary",)]
    assert {call.func.id for call in calls} >= {"baseline", "lb", "ddos", "syn", "services", "detector", "policy"}
    for call in calls:
        wanted = set(inspect.signature(getattr(cli, call.func.id)).parameters)
        given = {keyword.arg for keyword in call.keywords}
        assert given == wanted, f"bench all: {call.func.id}() misses {sorted(wanted - given)}"
