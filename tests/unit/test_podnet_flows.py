import ctypes
import socket

import numpy as np
import pytest

from bpfnet.podnet.flows import (
    FLOW_DTYPE,
    DropReason,
    Endpoint,
    Flow,
    FlowEvent,
    FlowStore,
    Verdict,
    compact,
    decode,
    ipv4_lookup,
    parse_filters,
)

NOW = 1_800_000_000.0


def flow(src="x/a", dst="y/b", port=80, verdict="FORWARDED", reason="", flags=("SYN",), t=NOW,
         sid=300, did=301, protocol="TCP", reply=False):
    def ep(name, identity, p):
        ns, _, pod = name.partition("/")
        return Endpoint(f"10.0.0.{identity - 299}", p, identity, ns, pod, (f"pod={pod}", f"ns={ns}"))

    return Flow(t, "node1", ep(src, sid, 40000), ep(dst, did, port), protocol, "egress", verdict,
                reason, flags, reply)


FLOWS = [flow(), flow(dst="y/c", port=81), flow(src="z/a", verdict="DROPPED", reason="POLICY_DENIED"),
         flow(flags=("ACK",), reply=True), flow(protocol="UDP", flags=(), port=53, t=NOW - 600)]


def select(*tokens):
    return [FLOWS.index(f) for f in parse_filters(tokens, now=NOW)(FLOWS)]


def test_values_of_one_flag_are_ored_and_flags_anded():
    assert select("--to-pod", "y/b") == [0, 2, 3, 4]
    assert select("--to-pod", "y/b", "--to-pod", "y/c") == [0, 1, 2, 3, 4]
    assert select("--to-pod", "y/b", "--port", "53") == [4]
    assert select("--pod", "z/a") == [2]
    assert select("--namespace", "z", "--namespace", "y") == [0, 1, 2, 3, 4]


def test_not_negates_only_the_next_filter():
    assert select("--not", "--verdict", "forwarded") == [2]
    assert select("--not", "--verdict", "dropped", "--port", "81") == [1]
    assert select("--verdict", "dropped", "--drop-reason", "policy_denied") == [2]


def test_labels_identities_flags_protocol_since():
    assert select("--from-label", "ns=z") == [2]
    assert select("--to-identity", "301", "--tcp-flags", "SYN") == [0, 1, 2]
    assert select("--protocol", "udp") == [4]
    assert select("--since", "5m") == [0, 1, 2, 3]
    assert select("--from-ip", "10.0.0.0/24", "--port=53") == [4]


@pytest.mark.parametrize("tokens, message", [
    (["--verdict", "maybe"], "--verdict 'maybe': use one of forwarded, dropped, translated"),
    (["--color", "red"], "unknown filter '--color'"),
    (["--port"], "--port needs a value"),
    (["--port", "http"], "--port 'http'"),
    (["--since", "yesterday"], "--since 'yesterday': use a duration"),
    (["--not"], "--not must be followed by a filter"),
    (["--tcp-flags", "SYN,BOGUS"], "unknown flag BOGUS"),
])
def test_bad_filters_name_the_problem(tokens, message):
    with pytest.raises(ValueError) as info:
        parse_filters(tokens, now=NOW)(FLOWS).__next__()
    assert message in str(info.value)


def test_decode_a_kernel_record():
    event = FlowEvent(time_ns=2_000_000_000, family=4, protocol=6, direction=1, verdict=2,
                      drop_reason=133, tcp_flags=0x12, is_reply=0, src_identity=300,
                      dst_identity=301, packets=3, bytes=180)
    event.src_addr[:4] = list(socket.inet_aton("10.1.0.5"))
    event.dst_addr[:4] = list(socket.inet_aton("10.2.0.7"))
    event.src_port, event.dst_port = socket.htons(40000), socket.htons(80)
    resolve = {"10.1.0.5": ("x", "a", ("pod=a",)), "10.2.0.7": ("y", "b", ("pod=b",))}
    result = decode(bytes(event), "node1", 100.0, lambda a: resolve.get(a, ("", "", ())))
    assert result.time == 102.0
    assert (result.source.name, result.source.port, result.destination.name, result.destination.port) == (
        "x/a", 40000, "y/b", 80)
    assert (result.verdict, result.drop_reason, result.tcp_flags, result.direction) == (
        "DROPPED", "POLICY_DENIED", ("SYN", "ACK"), "ingress")
    assert (result.packets, result.bytes) == (3, 180)
    assert "x/a:40000 (300) -> y/b:80 (301) TCP SYN,ACK ingress DROPPED (POLICY_DENIED)" in compact(result)
    assert ctypes.sizeof(FlowEvent) == 80


def events(*specs):
    """FLOW_DTYPE rows: one per (source host number, verdict, drop reason)."""
    rows = []
    for host, verdict, reason in specs:
        e = FlowEvent(time_ns=host * 1_000_000_000, family=4, protocol=6, verdict=verdict, drop_reason=reason,
                      src_identity=300 + host, dst_identity=301, packets=1)
        e.src_addr[:4] = list(socket.inet_aton(f"10.1.0.{host}"))
        e.dst_addr[:4] = list(socket.inet_aton("10.2.0.7"))
        rows.append(bytes(e))
    return np.frombuffer(b"".join(rows), FLOW_DTYPE)


def make_flow(raw, node):
    return decode(raw, node, 0.0, lambda a: ("x", f"pod{a.split('.')[-1]}", ()) if a.startswith("10.1.") else
                  ("", "", ()))


def sources(flows):
    return [(f.node, f.source.pod) for f in flows]


def test_store_keeps_the_last_events_and_builds_flows_for_the_rows_asked():
    store = FlowStore(capacity=4)
    store.add(events((1, 1, 0), (2, 2, 133)), "n1")
    store.add(events(), "n1")   # an empty batch changes nothing
    store.add(events((3, 1, 0), (4, 2, 203), (5, 1, 0)), "n2")   # wraps around the end
    assert (store.seen, len(store)) == (5, 4)
    rows = store.rows()
    assert sources(rows.select(make_flow)) == [("n1", "pod2"), ("n2", "pod3"), ("n2", "pod4"), ("n2", "pod5")]
    dropped = parse_filters(["--verdict", "dropped"], now=NOW)
    assert sources(rows.select(make_flow, dropped)) == [("n1", "pod2"), ("n2", "pod4")]
    assert sources(rows.select(make_flow, dropped, last=1)) == [("n2", "pod4")]
    assert sources(rows.select(make_flow, last=2)) == [("n2", "pod4"), ("n2", "pod5")]
    assert sources(rows.select(make_flow, last=10)) == sources(rows.select(make_flow))
    assert rows.select(make_flow, last=1)[0].time == 5.0
    assert sources(store.rows(after=4).select(make_flow)) == [("n2", "pod5")]   # follow: from number 4 on
    assert store.rows(after=5).select(make_flow) == []
    store.add(events((6, 1, 0)), "n1")   # the copy taken before stays as it was
    assert len(rows.events) == 4 and sources(store.rows(after=5).select(make_flow)) == [("n1", "pod6")]


def test_a_batch_larger_than_the_store_keeps_its_newest_rows_and_counts_all():
    store = FlowStore(capacity=3)
    store.add(events((9, 1, 0)), "n1")
    store.add(events(*[(h, 2, 133 if h % 2 else 157) for h in range(1, 8)]), "n1")
    assert sources(store.rows().select(make_flow)) == [("n1", "pod5"), ("n1", "pod6"), ("n1", "pod7")]
    assert store.counts() == {("FORWARDED", ""): 1, ("DROPPED", "POLICY_DENIED"): 4,
                              ("DROPPED", "FRAGMENT_NOT_SUPPORTED"): 3}
    store.add(events((8, 2, 250), (8, 9, 0)), "n1")
    assert store.counts()[("DROPPED", "UNKNOWN_250")] == 1 and store.counts()[("9", "")] == 1
    assert Verdict.DROPPED.name == "DROPPED" and DropReason(133).name == "POLICY_DENIED"


def test_rows_of_one_batch_can_belong_to_different_nodes():
    """A ring serving several nodes (the socket LB's): the node of each row comes with the batch."""
    store = FlowStore(capacity=3)
    store.add(events((1, 3, 0), (2, 3, 0), (3, 3, 0), (4, 3, 0)), ["n2", "n1", "n2", "n3"])
    assert sources(store.rows().select(make_flow)) == [("n1", "pod2"), ("n2", "pod3"), ("n3", "pod4")]
    assert store.counts() == {("TRANSLATED", ""): 4}


def test_ipv4_lookup_maps_each_row_of_an_address_column():
    batch = events((1, 3, 0), (2, 3, 0), (1, 3, 0))
    table = {"10.1.0.1": "n1", "10.2.0.7": "n9"}
    assert ipv4_lookup(batch["src_addr"], table, "").tolist() == ["n1", "", "n1"]
    assert ipv4_lookup(batch["dst_addr"], {"10.2.0.7": 301}, 0).tolist() == [301, 301, 301]
