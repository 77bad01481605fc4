"""LbController against the kernel (pins, no interface): apply, refusals that change nothing, adoption
after an agent restart, program reload and map replacement, stats and queries.
Pins under /sys/fs/bpf: run with the shared lock (flock /tmp/bpfnet-kernel.lock)."""

import ipaddress
import uuid

import pytest

from bpfnet.app.controller import ApplyError
from bpfnet.ebpf import pins
from bpfnet.lb.config import LbState
from bpfnet.lb.controller import LbController
from bpfnet.lb.dataplane import Flow
from bpfnet.lb.simulate import flow_frame

pytestmark = pytest.mark.root

XDP_TX = 3


def state(reals=("10.0.0.1", "10.0.0.2", "10.0.0.3"), weights=None, **settings) -> LbState:
    weights = weights or [1] * len(reals)
    return LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": "00:00:de:ad:be:af", "max_vips": 8, "max_reals": 32,
                     "conn_table_size": 256, **settings},
        "vips": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp",
                  "reals": [{"address": a, "weight": w} for a, w in zip(reals, weights, strict=False)]},
                 {"address": "fc00:1::1", "port": 80, "protocol": "udp",
                  "reals": [{"address": "fc00::1"}, {"address": "fc00::2"}]}]})


@pytest.fixture
def pin_root():
    root = pins.PIN_ROOT / f"lbtest-{uuid.uuid4().hex[:8]}"
    yield root
    pins.unpin(root)
    pins.remove_empty_parents(root.parent)


@pytest.fixture
def controller(pin_root):
    ctl = LbController(pin_root)
    ctl.start(state())
    yield ctl
    ctl.stop(detach=True)


def send(ctl: LbController, sport: int, syn=False) -> str:
    frame = flow_frame(ipaddress.ip_address("192.168.1.1"), sport, ipaddress.ip_address("10.200.1.1"), 80,
                       "tcp", syn=syn)
    result = ctl.program.test_run(frame)
    assert result.retval == XDP_TX
    return str(ipaddress.IPv4Address(result.data[30:34]))


def test_apply_and_flow_query(controller):
    # Katran's vector: 192.168.1.1:31337 -> 10.0.0.3 (reference/katran.md 3.7)
    pick = controller.query("flow", {"src": "192.168.1.1", "sport": "31337", "dst": "10.200.1.1", "dport": "80"})
    assert pick == {"verdict": "tx", "real": "10.0.0.3", "drop_reason": None, "established_real": None}
    assert send(controller, 31337) == "10.0.0.3"
    # The live connection table now pins the flow; asking did not add entries of its own.
    pick = controller.query("flow", {"src": "192.168.1.1", "sport": "31337", "dst": "10.200.1.1", "dport": "80"})
    assert pick["established_real"] == "10.0.0.3"
    assert len(list(controller.dataplane.conn_table.keys())) == 1
    other = controller.query("flow", {"src": "192.168.1.1", "sport": "1", "dst": "10.9.9.9", "dport": "80"})
    assert other["verdict"] == "pass"


def test_ring_query_follows_weights(controller):
    controller.apply(state(weights=[1, 2, 3]))
    rows = controller.query("ring", {"vip": "10.200.1.1:80/tcp"})
    assert [(r["real"], r["slots"]) for r in rows] == [("10.0.0.1", 10922), ("10.0.0.2", 21846),
                                                       ("10.0.0.3", 32769)]
    with pytest.raises(ValueError, match="missing parameter 'vip'"):
        controller.query("ring", {})
    with pytest.raises(KeyError):
        controller.query("nope", {})


def test_refused_state_changes_nothing(controller):
    before = controller.dataplane.tables
    # Valid config, but a ring Katran's Maglev v1 cannot fill (reference/katran.md 3.4, step 3).
    unfillable = LbState.model_validate({
        "settings": controller.state.settings.model_dump(),
        "vips": [{"address": "10.200.1.1", "port": 80, "maglev": "v1",
                  "reals": [{"address": "10.0.0.2", "weight": 1}, {"address": "10.2.40.26", "weight": 65536}]}]})
    with pytest.raises(ApplyError, match="never terminates"):
        controller.apply(unfillable)
    assert controller.state == state()
    assert controller.dataplane.tables.vips == before.vips and controller.dataplane.tables.reals == before.reals
    missing = state(interface="lbnosuchif0")
    with pytest.raises(ApplyError, match="no interface 'lbnosuchif0'"):
        controller.apply(missing)
    assert controller.state == state()


def test_restart_adopts_pinned_maps_and_flows(pin_root):
    first = LbController(pin_root)
    first.start(state())
    try:
        assert send(first, 31337) == "10.0.0.3"
        first.stop(detach=False)
        second = LbController(pin_root)
        second.start(state(weights=[1, 1, 0]))  # 10.0.0.3 drained meanwhile
        try:
            assert {str(a) for a in second.dataplane.tables.reals.values()} >= {"10.0.0.1", "10.0.0.3"}
            assert send(second, 31337) == "10.0.0.3"       # established flow survived the restart
            assert send(second, 31337, syn=True) != "10.0.0.3"  # new flows avoid the drained real
        finally:
            second.stop(detach=True)
    finally:
        first.stop(detach=True)
    assert not (pin_root / "lb").exists()


def test_settings_change_reloads_program_and_keeps_flows(controller):
    assert send(controller, 4000) in {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    real = send(controller, 4000)
    controller.apply(state(gateway_mac="02:00:00:00:00:99"))
    frame = flow_frame(ipaddress.ip_address("192.168.1.1"), 4000, ipaddress.ip_address("10.200.1.1"), 80, "tcp",
                       syn=False)
    out = controller.program.test_run(frame).data
    assert out[:6] == bytes.fromhex("020000000099")
    assert str(ipaddress.IPv4Address(out[30:34])) == real


def test_size_change_replaces_maps(controller, pin_root):
    controller.apply(state(conn_table_size=512))
    assert controller.dataplane.conn_table.map.max_entries == 512
    from bpfnet.ebpf import Map

    with Map.from_pin(pin_root / "lb" / "conn_table") as pinned:
        assert pinned.max_entries == 512
    assert send(controller, 31337) == "10.0.0.3"


def test_stats(controller):
    send(controller, 31337)
    send(controller, 31337)
    stats = controller.stats()
    assert stats["packets"]["tx"] == 2 and stats["packets"]["conn_hit"] == 1
    assert stats["vip_packets"]["10.200.1.1:80/tcp"] == 2
    assert stats["real_packets"]["10.0.0.3"] == 2
    assert stats["vip_packets"]["[fc00:1::1]:80/udp"] == 0


def test_flow_key_mirror_matches_the_kernel(controller):
    send(controller, 31337)
    key = Flow.of(ipaddress.ip_address("192.168.1.1"), 31337, ipaddress.ip_address("10.200.1.1"), 80, 6)
    assert controller.dataplane.conn_table.lookup(key) is not None
