"""A full connection table (issue 8's faults): the LB never drops a packet for lack of room. The
least recently used flows are evicted (counted as misses when they come back); an evicted flow is
hashed through the ring again, so it stays on its real unless the ring changed meanwhile, while a
flow still in the table stays put whatever the ring says."""

import os

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpfnet.lb.config import LbState
from bpfnet.lb.dataplane import Dataplane, lb_spec

pytestmark = pytest.mark.root
XDP_TX = 3
REALS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
CAPACITY = 64


def state(weights: dict[str, int]) -> LbState:
    return LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": "00:00:de:ad:be:af", "max_vips": 4, "max_reals": 8,
                     "conn_table_size": CAPACITY},
        "vips": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp",
                  "reals": [{"address": a, "weight": weights.get(a, 1)} for a in REALS]}]})


def frame(sport: int) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="00:ff:de:ad:be:af")
                 / IP(src="192.168.1.1", dst="10.200.1.1") / TCP(sport=sport, dport=80, flags="A"))


@pytest.fixture
def lb():
    # per-CPU LRU lists: keep every test run on one CPU so "least recently used" is one list
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    start = state({})
    obj = lb_spec(start.settings).load()
    try:
        dataplane = Dataplane(obj, start.settings)
        dataplane.apply(start)
        yield obj.programs["xdp_lb"], dataplane
    finally:
        obj.close()
        os.sched_setaffinity(0, affinity)


def send(program, sport: int) -> str:
    result = program.test_run(frame(sport))
    assert result.retval == XDP_TX
    return Ether(result.data)[IP].dst


def test_a_full_table_evicts_the_oldest_flows_and_drops_nothing(lb):
    program, dataplane = lb
    flows = range(10000, 10000 + 10 * CAPACITY)
    first_real = {sport: send(program, sport) for sport in flows}  # every packet forwarded
    assert len(list(dataplane.conn_table.keys())) <= CAPACITY
    assert dataplane.counters()["conn_miss"]["packets"] == len(flows)
    assert dataplane.counters()["drop"]["packets"] == 0

    oldest = flows[0]
    drained = first_real[oldest]
    newest = next(s for s in reversed(flows) if first_real[s] == drained)  # still in the table
    dataplane.apply(state({drained: 0}))  # drain that real: the ring no longer has it
    misses = dataplane.counters()["conn_miss"]["packets"]
    assert send(program, newest) == drained  # in the table: stays on its real
    assert send(program, oldest) != drained  # evicted: re-hashed through the new ring
    assert dataplane.counters()["conn_miss"]["packets"] == misses + 1
