"""Run benchmark scenarios interleaved (round-robin, so machine noise hits them alike) and report
medians and ratios against a reference measured in the same run.

A round gives a rate (or any value in the scenario's unit) and, for traffic benchmarks, the CPU
time the receiver spent per packet and the in-kernel ns per packet of the program under test
(BPF_PROG_TEST_RUN). When the generator is slower than the receiver, the rate only measures the
generator: the CPU columns are the comparison that counts, and the ratio column then compares CPU
per packet (lower is cheaper)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

RESULTS_DIR = Path("bench/results")


@dataclass(frozen=True)
class Sample:
    """One round of a traffic scenario: its rate, the receiver's CPU ns per packet, and the
    program's in-kernel ns per packet under BPF_PROG_TEST_RUN (None where not measured)."""

    value: float
    cpu_ns: float | None = None
    kernel_ns: float | None = None


@dataclass
class Scenario:
    """One thing to measure. `measure()` runs one round and returns its value in `unit` (or a
    Sample with CPU figures too)."""

    name: str
    measure: Callable[[], float | Sample]
    unit: str = "Mpps"
    note: str = ""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


@dataclass
class Result:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""
    cpu_ns: list[float] = field(default_factory=list)
    kernel_ns: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return _median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (0.0, 0.0)

    @property
    def cpu_median(self) -> float | None:
        return _median(self.cpu_ns) if self.cpu_ns else None

    @property
    def kernel_median(self) -> float | None:
        return _median(self.kernel_ns) if self.kernel_ns else None

    def add(self, sample: float | Sample) -> None:
        if not isinstance(sample, Sample):
            sample = Sample(sample)
        self.samples.append(sample.value)
        if sample.cpu_ns is not None:
            self.cpu_ns.append(sample.cpu_ns)
        if sample.kernel_ns is not None:
            self.kernel_ns.append(sample.kernel_ns)


def run_scenarios(scenarios: list[Scenario], rounds: int = 5,
                  progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every scenario `rounds` times, alternating between them each round."""
    results = [Result(s.name, s.unit, note=s.note) for s in scenarios]
    for round_ in range(rounds):
        for scenario, result in zip(scenarios, results, strict=False):
            if progress:
                progress(f"round {round_ + 1}/{rounds}: {scenario.name}")
            result.add(scenario.measure())
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


def cpu_ratio(result: Result, reference: Result) -> float | None:
    """CPU per packet against the reference's (lower is cheaper); None where either lacks it."""
    if result.cpu_median is None or not reference.cpu_median:
        return None
    return result.cpu_median / reference.cpu_median


def _has_cpu(results: list[Result]) -> bool:
    return any(r.cpu_ns for r in results)


def _has_kernel(results: list[Result]) -> bool:
    return any(r.kernel_ns for r in results)


def _optional(value: float | None, form: str) -> str:
    return "–" if value is None else format(value, form)


def table_rows(results: list[Result], reference: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a report, as text: the same for the terminal, Markdown and the summary.
    CPU and in-kernel columns appear when some scenario measured them."""
    ref = next(r for r in results if r.name == reference)
    header = ["scenario", "median", "min–max", f"× {reference}"]
    cpu, kernel = _has_cpu(results), _has_kernel(results)
    if cpu:
        header += ["receiver CPU ns/pkt", "CPU × ref", "CPU ns over ref"]
    if kernel:
        header += ["in-kernel ns/pkt (test run)"]
    header.append("note")
    rows = []
    for r in results:
        low, high = r.spread
        row = [r.name, f"{r.median:.3f} {r.unit}", f"{low:.3f}–{high:.3f}", f"{ratio(r, ref):.2f}"]
        if cpu:
            over = None if r.cpu_median is None or ref.cpu_median is None else r.cpu_median - ref.cpu_median
            row += [_optional(r.cpu_median, ".0f"), _optional(cpu_ratio(r, ref), ".2f"), _optional(over, "+.0f")]
        if kernel:
            row.append(_optional(r.kernel_median, ".1f"))
        rows.append([*row, r.note])
    return header, rows


def render_table(title: str, results: list[Result], reference: str) -> Table:
    header, rows = table_rows(results, reference)
    table = Table(title=escape(title))
    for column in header:
        table.add_column(escape(column), justify="left" if column in ("scenario", "note") else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if column in ("scenario", "note") else "---:" for column in header]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


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
            "results": [{**asdict(r), "median": r.median, "ratio": ratio(r, ref), "cpu_ns_median": r.cpu_median,
                         "cpu_ratio": cpu_ratio(r, ref), "kernel_ns_median": r.kernel_median} for r in results]}
    paths = [directory / f"{name}.json", directory / f"{name}.md", directory / f"{name}.png"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# {title}", "", f"Machine: {machine['processor']}, {machine['cpus']} CPUs, Linux "
             f"{machine['kernel']}, measured {machine['date']}. Medians of {len(ref.samples)} "
             "interleaved rounds; ratios are against the reference measured in the same run.", "",
             *_markdown(*table_rows(results, reference))]
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
    if _has_cpu(results):  # the receiver's CPU per packet is the comparison that counts
        values = [[*r.cpu_ns] or [0.0] for r in results][::-1]
        label = "receiver CPU ns per packet (lower is cheaper)"
    else:
        values = [r.samples or [0.0] for r in results][::-1]
        label = results[0].unit if results else ""
    medians = [_median(v) for v in values]
    errors = [[m - min(v) for m, v in zip(medians, values, strict=True)],
              [max(v) - m for m, v in zip(medians, values, strict=True)]]
    ax.barh(names, medians, xerr=errors, color="#3a7ca5", capsize=3)
    ax.set_xlabel(label)
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
        lines += [f"## {report.title}", "", *_markdown(*table_rows(report.results, report.reference)),
                  "", f"![{report.title}]({report.name}.png)", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path
