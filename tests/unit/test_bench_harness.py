import itertools
import json

from bpfnet.bench.harness import Scenario, render_table, run_scenarios, write_outputs


def test_rounds_interleave_and_ratios_use_the_reference(tmp_path):
    order = []
    values = {"a": itertools.cycle([1.0, 3.0, 2.0]), "b": itertools.cycle([4.0])}

    def measure(name):
        def run():
            order.append(name)
            return next(values[name])
        return run

    results = run_scenarios([Scenario("a", measure("a")), Scenario("b", measure("b"))], rounds=3)
    assert order == ["a", "b"] * 3
    assert [r.median for r in results] == [2.0, 4.0]
    paths = write_outputs("t", "Test", results, reference="b", directory=tmp_path)
    data = json.loads(paths[0].read_text())
    assert [r["ratio"] for r in data["results"]] == [0.5, 1.0]
    assert "| a | 2.000 Mpps | 1.000–3.000 | 0.50 |" in paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert render_table("Test", results, "b").row_count == 2
