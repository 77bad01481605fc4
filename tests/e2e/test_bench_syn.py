"""`bpfnet bench syn`: every peer really answers the spoofed SYNs with a cookie, and the bench
leaves nothing behind (namespaces, the sink's sysctl, nftables table, the stage)."""

import pytest

from bpfnet.netns import list_netns

pytestmark = pytest.mark.root


def test_every_peer_answers_the_flood_with_cookies_and_nothing_is_left():
    from bpfnet.bench.baseline import Bench
    from bpfnet.bench.harness import run_scenarios
    from bpfnet.bench.syn import RULE_ID, SynBench, scenarios
    from bpfnet.netns import Topology

    with Topology("bsy") as topology:
        bench = Bench(topology)
        rig = SynBench(bench)
        try:
            syncookies_before = topology.run(bench.sink, ["sysctl", "-n", "net.ipv4.tcp_syncookies"]).stdout
            results = run_scenarios(scenarios(rig, frames=20_000), rounds=1)
            totals = rig.stage.total_counts()
            # each answer came from its own peer: XDP's SYN-ACKs, SYNPROXY's, the listener's cookies
            assert totals["syncookie_sent"]["packets"] == rig.stage.counters(RULE_ID).packets >= 20_000
            assert rig.synproxy_syns() >= 20_000
            assert rig.netstat("SyncookiesSent") >= 20_000
            assert rig.netstat("ListenOverflows") == 0  # cookies, not a queue that filled
            assert topology.run(bench.sink, ["sysctl", "-n", "net.ipv4.tcp_syncookies"]).stdout == syncookies_before
            assert "benchsyn" not in topology.run(bench.sink, ["nft", "list", "tables"]).stdout
        finally:
            rig.close()
            bench.close()
    assert [r.name for r in results] == ["XDP drop (no answer)", "bpfnet syncookie rule (XDP)",
                                         "nftables SYNPROXY", "Linux listener, tcp_syncookies=2"]
    assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
    assert not [ns for ns in list_netns() if ns.startswith("bsy-")]
