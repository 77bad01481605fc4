"""`bench all` calls every benchmark with its options by name and summarises what they return."""

from bpfnet.bench import cli


def test_bench_all_runs_every_benchmark_with_the_options_given(monkeypatch, tmp_path):
    calls = {}

    def fake(name, returns_list=False):
        def run(**options):
            calls[name] = options
            return [name] if returns_list else name
        return run

    for name in ("generator_rate", "baseline", "lb", "ddos", "detector"):
        monkeypatch.setattr(cli, name, fake(name))
    for name in ("services", "policy"):
        monkeypatch.setattr(cli, name, fake(name, returns_list=True))
    summary = {}
    monkeypatch.setattr(cli, "write_summary", lambda reports: summary.setdefault("reports", reports) and tmp_path)
    cli.all_(rounds=2, frames=20_000, generator="packet")
    assert summary["reports"] == ["generator_rate", "baseline", "lb", "ddos", "services", "detector", "policy"]
    for name in ("baseline", "lb", "ddos", "detector", "policy"):
        assert calls[name]["generator"] == "packet" and calls[name]["rounds"] == 2, name
    assert calls["baseline"]["frames"] == calls["generator_rate"]["frames"] == 20_000
