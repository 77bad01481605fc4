"""Run benchmark scenarios interleaved (round-robin, so machine noise hits them alike) and report
medians and ratios against a reference measured in the same run."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

RESULTS_DIR = Path("bench/results")


@dataclass
class Scenario:
    """One thing to measure. `measure()` runs one round and returns its rate in `unit`."""

    name: str
    measure: Callable[[], float]
    unit: str = "Mpps"
    note: str = ""


@dataclass
class Result:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (0.0, 0.0)


def run_scenarios(scenarios: list[Scenario], rounds: int = 5,
                  progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every scenario `rounds` times, alternating between them each round."""
    results = [Result(s.name, s.unit, note=s.note) for s in scenarios]
    for round_ in range(rounds):
        for scenario, result in zip(scenarios, results, strict=False):
            if progress:
                progress(f"round {round_ + 1}/{rounds}: {scenario.name}")
            result.samples.append(scenario.measure())
    return results


@dataclass
class Report:
    """One benchmark's results, as `bench all` collects them."""

    name: str
    title: str
    results: list[Result]
    reference: str


def ratio(result: Result, reference: Result) -> float:
    return result.median / reference.median if reference.median else 0.0


def render_table(title: str, results: list[Result], reference: str) -> Table:
    ref = next(r for r in results if r.name == reference)
    table = Table(title=title)
    for column in ("scenario", "median", "min–max", f"× {reference}", "note"):
        table.add_column(column, justify="left" if column in ("scenario", "note") else "right")
    for r in results:
        low, high = r.spread
        table.add_row(r.name, f"{r.median:.3f} {r.unit}", f"{low:.3f}–{high:.3f}",
                      f"{ratio(r, ref):.2f}", r.note)
    return table


def machine_description() -> dict:
    import os

    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "processor": _cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_outputs(name: str, title: str, results: list[Result], reference: str,
                  directory: Path = RESULTS_DIR) -> list[Path]:
    """Write <name>.json, <name>.md and <name>.png (bar chart of medians with ranges)."""
    directory.mkdir(parents=True, exist_ok=True)
    ref = next(r for r in results if r.name == reference)
    machine = machine_description()
    data = {"title": title, "reference": reference, "machine": machine,
            "results": [{**asdict(r), "median": r.median, "ratio": ratio(r, ref)} for r in results]}
    paths = [directory / f"{name}.json", directory / f"{name}.md", directory / f"{name}.png"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# {title}", "", f"Machine: {machine['processor']}, {machine['cpus']} CPUs, Linux "
             f"{machine['kernel']}, measured {machine['date']}. Medians of {len(ref.samples)} "
             "interleaved rounds; ratios are against the reference measured in the same run.", "",
             f"| scenario | median | min–max | × {reference} | note |", "|---|---:|---:|---:|---|"]
    for r in results:
        low, high = r.spread
        lines.append(f"| {r.name} | {r.median:.3f} {r.unit} | {low:.3f}–{high:.3f} | "
                     f"{ratio(r, ref):.2f} | {r.note} |")
    lines += ["", f"![{title}]({name}.png)", ""]
    paths[1].write_text("\n".join(lines))
    _chart(paths[2], title, results)
    return paths


def _chart(path: Path, title: str, results: list[Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(results) + 1.5))
    names = [r.name for r in results][::-1]
    medians = [r.median for r in results][::-1]
    errors = [[r.median - r.spread[0] for r in results][::-1], [r.spread[1] - r.median for r in results][::-1]]
    ax.barh(names, medians, xerr=errors, color="#3a7ca5", capsize=3)
    ax.set_xlabel(results[0].unit if results else "")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(reports: list[Report], directory: Path = RESULTS_DIR) -> Path:
    """bench/results/README.md: the machine, then each benchmark's table and chart."""
    machine = machine_description()
    lines = ["# bpfnet benchmark results", "",
             f"Machine: {machine['processor']}, {machine['cpus']} CPUs, Linux {machine['kernel']}, "
             f"Python {machine['python']}; measured {machine['date']}.", "",
             "Every benchmark interleaves its scenarios round by round and reports medians; the ratio "
             "column compares each scenario with the reference measured in the same run.", ""]
    for report in reports:
        ref = next(r for r in report.results if r.name == report.reference)
        lines += [f"## {report.title}", "", f"| scenario | median | × {report.reference} | note |",
                  "|---|---:|---:|---|"]
        lines += [f"| {r.name} | {r.median:.3f} {r.unit} | {ratio(r, ref):.2f} | {r.note} |"
                  for r in report.results]
        lines += ["", f"![{report.title}]({report.name}.png)", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path
