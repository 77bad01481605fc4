"""`bpfnet bench …`: measured comparisons against peers, printed as ratios from the same run."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from bpfnet.bench.harness import (
    RESULTS_DIR,
    Report,
    Result,
    render_table,
    run_scenarios,
    write_outputs,
    write_summary,
)
from bpfnet.cliutil import fail

app = typer.Typer(help="Benchmarks that compare bpfnet with its peers in one run. Results are "
                       "medians of interleaved rounds; ratios matter, absolute numbers vary by machine.",
                  no_args_is_help=True)
console = Console(emoji=False)

RoundsOption = typer.Option(5, "--rounds", min=1, help="interleaved rounds per scenario")
FramesOption = typer.Option(1_000_000, "--frames", min=10_000, help="frames sent per round")
WriteOption = typer.Option(True, "--write/--no-write", help="write bench/results/<name>.{md,json,png}")
GeneratorOption = typer.Option(
    "auto", "--generator", metavar="auto|live|packet",
    help="how frames are sent: live = XDP live frames (BPF_PROG_TEST_RUN, where the kernel allows "
         "it), packet = AF_PACKET sendmmsg() batches; auto picks live where allowed, else packet")


def _backend(generator: str) -> str:
    """The generator backend asked for, checked against what this kernel allows."""
    from bpfnet.bench.trafficgen import choose_backend

    try:
        backend = choose_backend(generator)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--generator") from None
    console.print(f"traffic generator: {backend.value}")
    return backend.value


def _report(name: str, title: str, scenarios, reference: str, rounds: int, write: bool) -> Report:
    return _publish(name, title, _measure(name, scenarios, rounds), reference, write)


def _measure(name: str, scenarios, rounds: int) -> list[Result]:
    with console.status("measuring…") as status:
        return run_scenarios(scenarios, rounds, progress=lambda text: status.update(f"{name}: {text}"))


def _publish(name: str, title: str, results: list[Result], reference: str, write: bool) -> Report:
    console.print(render_table(title, results, reference))
    if write:
        for path in write_outputs(name, title, results, reference):
            console.print(f"wrote {escape(str(path))}")
    return Report(name, title, results, reference)


def _counts(option: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} {value!r}: give sizes like 1,100,1000") from None


@app.command()
def baseline(rounds: int = RoundsOption, frames: int = FramesOption, write: bool = WriteOption,
             generator: str = GeneratorOption) -> Report:
    """Cost of dropping at XDP against tc, nftables and iptables on one veth: rate, the receiver's
    CPU ns per packet, and the BPF programs' in-kernel ns per packet."""
    from bpfnet.bench.baseline import Bench, scenarios
    from bpfnet.netns import Topology

    backend = _backend(generator)
    with Topology("bb") as topology:
        bench = Bench(topology, backend)
        try:
            return _report("baseline", "Drop cost by hook (veth, 64-byte UDP, 256 flows)",
                    scenarios(bench, frames), "XDP drop (bpfnet)", rounds, write)
        finally:
            bench.close()


@app.command("generator")
def generator_rate(rounds: int = RoundsOption, frames: int = FramesOption, write: bool = WriteOption) -> Report:
    """The traffic generator's rate with each backend this kernel allows (live frames, AF_PACKET
    sendmmsg batches) against plain AF_PACKET send() of one frame a call."""
    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.generator import PLAIN_SEND, GeneratorBench, scenarios
    from bpfnet.netns import Topology

    with Topology("bg") as topology:
        bench = Bench(topology, _backend("auto"))
        rig = GeneratorBench(bench)
        try:
            return _report("generator", "Traffic generator rate by backend (veth, 64-byte UDP, into XDP_DROP)",
                           scenarios(rig, frames), PLAIN_SEND, rounds, write)
        finally:
            rig.close()
            bench.close()


@app.command()
def lb(rounds: int = RoundsOption, frames: int = FramesOption, write: bool = WriteOption,
       generator: str = GeneratorOption) -> Report:
    """Load balancer cost: bpfnet's XDP LB against the XDP_TX ceiling and nftables DNAT (rate, the
    LB side's CPU ns per packet, in-kernel ns per packet)."""
    from bpfnet.bench.lb import LbBench, scenarios
    from bpfnet.netns import Topology

    backend = _backend(generator)
    with Topology("bl") as topology:
        bench = LbBench(topology, backend)
        try:
            return _report("lb", "Load balancer cost (veth, 64-byte UDP, 16k flows, 3 reals)",
                    scenarios(bench, frames), "XDP_TX ceiling", rounds, write)
        finally:
            bench.close()


@app.command()
def ddos(rounds: int = RoundsOption, frames: int = FramesOption, write: bool = WriteOption,
         rules: str = typer.Option("1,100,1000", help="rule-set sizes to measure, comma-separated"),
         kernel_rules: str = typer.Option("1,100,1000,10000", "--kernel-rules",
                                          help="port rule-set sizes of the in-kernel table (up to 65535)"),
         mixed_rules: str = typer.Option("10,100,1000,10000", "--mixed-rules",
                                         help="mixed rule-set sizes (networks + protocol + ports, v4/v6) of the "
                                              "in-kernel table (up to 65535)"),
         mixed_live: str = typer.Option("1000", "--mixed-live",
                                        help="mixed rule-set sizes measured live against nftables (empty: none)"),
         generator: str = GeneratorOption) -> Report:
    """DDoS rule cost as rule sets grow: bpfnet XDP rules against xdp-filter, nftables netdev and
    iptables raw rules (rate, the receiver's CPU ns per packet, in-kernel ns per packet), then the
    in-kernel table: bpfnet's stage, xdp-filter and a trivial XDP_DROP per rule set."""
    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.ddos import MIXED_PEER_NOTE, DdosBench, kernel_markdown, scenarios
    from bpfnet.netns import Topology

    counts = _counts("--rules", rules)
    kernel_counts = _counts("--kernel-rules", kernel_rules)
    mixed_counts = _counts("--mixed-rules", mixed_rules)
    live_mixed = _counts("--mixed-live", mixed_live) if mixed_live.strip() else ()
    from bpfnet.ddos.ruleset import MAX_RULES
    for option, text, sizes in (("--kernel-rules", kernel_rules, kernel_counts),
                                ("--mixed-rules", mixed_rules, mixed_counts), ("--mixed-live", mixed_live, live_mixed)):
        if not all(2 <= n < MAX_RULES if option != "--kernel-rules" else 1 <= n < MAX_RULES for n in sizes):
            raise typer.BadParameter(f"{option} {text!r}: sizes run from {1 if option == '--kernel-rules' else 2} "
                                     f"to {MAX_RULES - 1} (a rule set's limit)")
    backend = _backend(generator)
    with Topology("bd") as topology:
        bench = Bench(topology, backend)
        stages = DdosBench(bench, counts, mixed=live_mixed)
        try:
            report = _report("ddos", "DDoS rules: drop cost by rule-set size (veth, 64-byte UDP)",
                             scenarios(stages, frames), "XDP drop ceiling", rounds, write)
            with console.status("ddos: in-kernel table…"):
                table = kernel_markdown(stages.kernel_table(kernel_counts, 1000, rounds=max(rounds, 9),
                                                            mixed=mixed_counts))
            console.print("In-kernel ns per packet (BPF_PROG_TEST_RUN, 64-byte UDP, medians of interleaved rounds)")
            console.print(escape("\n".join(table)), highlight=False)
            console.print(escape(MIXED_PEER_NOTE), highlight=False)
            if write:
                path = RESULTS_DIR / "ddos-kernel.md"
                path.write_text("# DDoS rules: in-kernel ns per packet\n\n" + "\n".join(table) + "\n\n"
                                + MIXED_PEER_NOTE + "\n")
                console.print(f"wrote {escape(str(path))}")
            return report
        finally:
            stages.close()
            bench.close()


@app.command()
def syn(rounds: int = RoundsOption, frames: int = FramesOption, write: bool = WriteOption,
        generator: str = GeneratorOption) -> Report:
    """A SYN flood from 65,536 spoofed sources, answered with cookies: bpfnet's syncookie rule in
    XDP against nftables SYNPROXY and a Linux listener with tcp_syncookies=2 (rate, the receiver's
    CPU ns per SYN, answer included), next to dropping the flood in XDP."""
    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.syn import SynBench, scenarios
    from bpfnet.netns import Topology

    backend = _backend(generator)
    with Topology("bs") as topology:
        bench = Bench(topology, backend)
        rig = SynBench(bench)
        try:
            return _report("syn", "SYN flood: cost of a cookie SYN-ACK (veth, spoofed sources)",
                           scenarios(rig, frames), "XDP drop (no answer)", rounds, write)
        finally:
            rig.close()
            bench.close()


SecondsOption = typer.Option(3, "--seconds", min=1, help="seconds per pod-to-pod measurement")


@app.command()
def services(rounds: int = RoundsOption, write: bool = WriteOption,
             connections: int = typer.Option(3000, "--connections", min=100, help="connections per round"),
             count: str = typer.Option("1,1000", "--services",
                                       help="numbers of services to measure with, comma-separated (1..4096)"),
             seconds: int = SecondsOption,
             flow_events: int = typer.Option(1_000_000, "--flow-events", min=100_000,
                                             help="flow events per ingest round")) -> list[Report]:
    """Service connection setup, rate and latency: bpfnet's socket LB against kube-proxy's iptables
    and nftables DNAT as the number of services grows; flow events/s the agent ingests from a ring
    buffer the kernel fills, against the 1 M/s target; pod to pod over VXLAN with and without
    policy against plain kernel VXLAN."""
    from bpfnet.bench.flow_ingest import FLOW_TARGET, FlowIngestBench
    from bpfnet.bench.services import ServicesBench, reference, scenarios
    from bpfnet.netns import Topology

    counts = _counts("--services", count)
    with Topology("bs") as topology:
        try:
            bench = ServicesBench(topology, counts)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        try:
            rates, latencies = scenarios(bench, connections)
            reports = [_report("services", "Service connection setup rate (one client, 3 backends, loopback)",
                               rates, reference(bench), rounds, write),
                       _report("services-latency", "Service connection setup latency (connect(), median)",
                               latencies, reference(bench), rounds, write)]
        finally:
            bench.close()
    ingest = FlowIngestBench(flow_events)
    try:
        reports.append(_report("services-flows", "Flow events the agent ingests from the kernel's ring buffer",
                               ingest.scenarios(), FLOW_TARGET, rounds, write))
    finally:
        ingest.close()
    return [*reports, *vxlan(rounds, write, seconds)]


@app.command()
def vxlan(rounds: int = RoundsOption, write: bool = WriteOption, seconds: int = SecondsOption) -> list[Report]:
    """Pod to pod across two nodes over VXLAN: TCP throughput and request/response rate of bpfnet
    with and without policy against plain kernel VXLAN (part of `services`)."""
    from bpfnet.app.controller import ApplyError
    from bpfnet.bench.vxlan import RR_REFERENCE, THROUGHPUT_REFERENCE, VxlanBench, VxlanBenchError, scenarios
    from bpfnet.netns import Topology, TopologyError

    try:
        with Topology("bv") as topology:
            bench = VxlanBench(topology)
            try:
                results = _measure("vxlan", scenarios(bench, seconds), rounds)
            finally:
                bench.close()
    except (VxlanBenchError, ApplyError, TopologyError) as err:
        fail(f"bench vxlan: {err}")
    reports = []
    for name, title, reference in (
            ("services-vxlan-tcp", "Pod to pod over VXLAN: TCP throughput (iperf3, one stream)",
             THROUGHPUT_REFERENCE),
            ("services-vxlan-rr", "Pod to pod over VXLAN: request/response (1 byte, one connection)",
             RR_REFERENCE)):
        unit = next(r.unit for r in results if r.name == reference)
        reports.append(_publish(name, title, [r for r in results if r.unit == unit], reference, write))
    return reports


@app.command()
def detector(rounds: int = RoundsOption, write: bool = WriteOption, generator: str = GeneratorOption) -> Report:
    """The DDoS detector end to end, per attack shape (time to rule, drop share, client success),
    and the samples/s it sustains on one core."""
    from bpfnet.bench.detector import THROUGHPUT_REFERENCE, DetectorRig, attack_scenarios, throughput_scenarios
    from bpfnet.netns import Topology

    backend = _backend(generator)
    with Topology("ds") as topology:
        rig = DetectorRig(topology, backend)
        try:
            rig.auto_on()
            # rows of several units (in their names): the × column compares only the samples/s rows
            return _report("detector", "DDoS detector end to end per attack shape, and samples/s",
                           attack_scenarios(rig) + throughput_scenarios(), THROUGHPUT_REFERENCE, rounds, write)
        finally:
            rig.close()


@app.command()
def policy(rounds: int = RoundsOption, frames: int = FramesOption,
           rules: str = typer.Option("10,100,1000,10000", "--rules", help="rule counts to compare"),
           write: bool = WriteOption, generator: str = GeneratorOption) -> list[Report]:
    """Pod network policy cost as rules grow (test_run, and live traffic against iptables and
    nftables: rate and CPU ns per packet), and the time from apply to enforcement for 1,000
    policies."""
    from bpfnet.bench import policy as policy_bench
    from bpfnet.netns import Topology

    counts = tuple(sorted(set(_counts("--rules", rules))))
    if min(counts) < 1:
        raise typer.BadParameter("rule counts must be positive", param_hint="--rules")
    backend = _backend(generator)
    test_run = policy_bench.TestRunBench(counts)
    try:
        reports = [_report("policy-testrun", "Policy cost per packet (BPF_PROG_TEST_RUN)",
                           policy_bench.test_run_scenarios(test_run), f"new flow, {counts[0]} rules", rounds, write)]
    finally:
        test_run.close()
    with Topology("pnb") as topology:
        live = policy_bench.LiveBench(topology, counts, backend=backend)
        try:
            reports.append(_report("policy-live", "Pod egress policy, live UDP, every packet a new flow",
                                   policy_bench.live_scenarios(live, frames), f"bpfnet tc, {counts[0]} rules",
                                   rounds, write))
        finally:
            live.close()
    seconds = sorted(policy_bench.apply_to_enforcement(1000) for _ in range(rounds))
    console.print(f"apply to enforcement, 1,000 policies: median {seconds[len(seconds) // 2]:.3f} s "
                  f"(min {seconds[0]:.3f}, max {seconds[-1]:.3f})")
    return reports


@app.command()
def cluster(rounds: int = RoundsOption, write: bool = WriteOption,
            hosts: str = typer.Option("1,3,10", "--hosts", help="fleet sizes to measure, comma-separated")) -> Report:
    """From a write on one host to enforcement on every host of a fleet on a three-member etcd (a
    ddos rule, a NetworkPolicy, a VIP's real weight), against one agent on SQLite; and the rate at
    which every host derives identities. Each host is a namespace with its own agent process."""
    from bpfnet.bench.cluster import run, summary

    with console.status("starting…") as status:
        results = run(_counts("--hosts", hosts), rounds, progress=lambda text: status.update(f"cluster: {text}"))
    report = _publish("cluster", "Write on one host to enforcement on every host (ms)", results,
                      "ddos rule: SQLite, 1 agent", write)
    console.print(escape(summary(results)))
    return report


@app.command(name="all")
def all_(rounds: int = RoundsOption, frames: int = FramesOption, generator: str = GeneratorOption) -> None:
    """Every benchmark, then one report: bench/results/README.md with the machine and each chart."""
    reports = [generator_rate(rounds=rounds, frames=frames, write=True),
               baseline(rounds=rounds, frames=frames, write=True, generator=generator),
               lb(rounds=rounds, frames=frames, write=True, generator=generator),
               ddos(rounds=rounds, frames=frames, write=True, rules="1,100,1000", kernel_rules="1,100,1000,10000",
                    mixed_rules="10,100,1000,10000", mixed_live="1000", generator=generator),
               syn(rounds=rounds, frames=frames, write=True, generator=generator),
               *services(rounds=rounds, write=True, connections=3000, count="1,1000", seconds=3,
                         flow_events=1_000_000),
               detector(rounds=rounds, write=True, generator=generator),
               *policy(rounds=rounds, frames=frames, rules="10,100,1000,10000", write=True, generator=generator)]
    console.print(f"wrote {write_summary(reports)}")
