"""`bpfnet doctor` and `bpfnet bench baseline` run for real and leave nothing behind."""

import json
import subprocess
import sys

import pytest

from bpfnet.netns import list_netns

pytestmark = pytest.mark.root
BPFNET = [sys.executable, "-m", "bpfnet.cli"]


def test_doctor_passes_every_required_check():
    out = subprocess.run([*BPFNET, "doctor", "-o", "json"], capture_output=True, text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert out.returncode == 0, checks
    assert {"root", "kernel", "BPF JIT", "map types", "helpers", "BPF objects", "attach"} <= set(checks)
    assert all(c["ok"] for c in checks.values() if c["required"])
    # optional, but this machine has what syncookie rules need
    assert checks["SYN cookies"]["ok"] and "window scale" in checks["SYN cookies"]["detail"], checks["SYN cookies"]


def test_baseline_bench_measures_every_hook_and_cleans_up(tmp_path):
    from bpfnet.bench.baseline import Bench, scenarios
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.netns import Topology

    with Topology("bbt") as topology:
        bench = Bench(topology)
        try:
            results = run_scenarios(scenarios(bench, frames=20_000), rounds=1)
        finally:
            bench.close()
    assert [r.name for r in results][0] == "XDP drop (bpfnet)"
    assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
    assert not [ns for ns in list_netns() if ns.startswith("bbt-")]


def test_lb_bench_forwards_through_every_scenario():
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.bench.lb import LbBench, scenarios
    from bpfnet.netns import Topology

    with Topology("blt") as topology:
        bench = LbBench(topology)
        try:
            results = run_scenarios(scenarios(bench, frames=20_000), rounds=1)
            counters = bench.dataplane.counters()
        finally:
            bench.close()
    assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
    assert counters["tx"]["packets"] > 0 and counters["drop"]["packets"] == 0
    assert not [ns for ns in list_netns() if ns.startswith("blt-")]


def test_ddos_bench_every_peer_drops_and_nothing_is_left():
    from pathlib import Path

    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.ddos import DdosBench, scenarios
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.netns import Topology

    libxdp_workdir = Path("/sys/fs/bpf/xdp").exists()
    with Topology("bdt") as topology:
        bench = Bench(topology)
        stages = DdosBench(bench, rule_counts=(3,), worst_case=5)
        try:
            results = run_scenarios(scenarios(stages, frames=20_000), rounds=1)
            matched = {count: stage.counters(count).packets for (count, _), stage in stages.stages.items()}
        finally:
            stages.close()
            bench.close()
    names = [r.name for r in results]
    assert names == ["XDP drop ceiling", "bpfnet ddos, 3 rule(s)", "xdp-filter, 3 port(s)",
                     "nftables netdev, 3 port(s)", "iptables raw, 3 rule(s)", "bpfnet ddos, 5 source-net rules",
                     "nftables netdev, 5 source nets"]
    # each peer's own drop counter moved (the rates are computed from them), and only the last rule matched
    assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
    assert all(packets > 0 for packets in matched.values()), matched
    assert not Path("/sys/fs/bpf/xdp-filter").exists()  # xdp-filter unloaded with its pins
    assert libxdp_workdir or not Path("/sys/fs/bpf/xdp").exists()  # and libxdp's directory, if it made it
    assert not [ns for ns in list_netns() if ns.startswith("bdt-")]


def test_services_bench_connects_through_every_peer():
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.bench.services import ServicesBench, scenarios
    from bpfnet.netns import Topology

    with Topology("bst") as topology:
        bench = ServicesBench(topology, counts=(1, 50))
        try:
            rates, latencies = scenarios(bench, connections=200)
            results = run_scenarios(rates + latencies, rounds=1)
            # the socket LB really carried its connections (two scenarios each, 200 each)
            assert [bench.socket_connects(n) for n in (1, 50)] == [400, 400]
            # and the peers' NAT rules did: iptables' KUBE-SERVICES matched the last service every time
            listing = topology.run(bench.namespaces["iptables", 50], ["iptables", "-t", "nat", "-L",
                                   "KUBE-SERVICES", "-v", "-x", "-n"]).stdout.splitlines()
            assert int(listing[-1].split()[0]) == 400 and "10.96.0.10" in listing[-1]
        finally:
            bench.close()
    assert all(r.median > 0 for r in results)
    assert not [ns for ns in list_netns() if ns.startswith("bst-")]


def test_services_bench_refuses_a_bad_service_count():
    from bpfnet.bench.services import ServicesBench
    from bpfnet.netns import Topology

    with Topology("bsx") as topology, pytest.raises(ValueError, match="1..4096"):
        ServicesBench(topology, counts=(0,))


def test_ddos_bench_mixed_sets_drop_in_bpfnet_and_nftables():
    """The mixed rule sets (networks + protocol + ports, v4/v6) of `bench ddos`: bpfnet's stage and
    nftables' concatenated interval sets both drop the generator's traffic by the last rule."""
    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.ddos import DdosBench, scenarios
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.netns import Topology

    with Topology("bdm") as topology:
        bench = Bench(topology)
        stages = DdosBench(bench, rule_counts=(), worst_case=0, mixed=(13,))
        try:
            results = run_scenarios(scenarios(stages, frames=20_000), rounds=1)
            matched = stages.stages[13, "mixed"].counters(13).packets
        finally:
            stages.close()
            bench.close()
    assert [r.name for r in results] == ["XDP drop ceiling", "bpfnet ddos, 13 mixed rules",
                                         "nftables netdev, 13 mixed rules"]
    assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
    assert matched > 0
    assert not [ns for ns in list_netns() if ns.startswith("bdm-")]
