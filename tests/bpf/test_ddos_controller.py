"""DdosController against the kernel: apply, expiry in tick, stats, queries, adoption of pins."""

import uuid

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfnet.ddos.config import DdosState
from bpfnet.ddos.controller import DdosController
from bpfnet.ebpf import pins

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2
FRAME = bytes(Ether() / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=4000, dport=53))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pin_root():
    root = pins.pin_dir(f"dd-test-{uuid.uuid4().hex[:8]}")
    try:
        yield root
    finally:
        pins.unpin(root)


def state(**kwargs) -> DdosState:
    return DdosState.model_validate(kwargs)


def test_apply_stats_and_rule_query(pin_root):
    controller = DdosController(pin_root)
    controller.start(state(rules=[{"expr": "udp port 53", "action": "drop", "comment": "dns flood"}],
                           sample_every=1))
    try:
        assert controller.dataplane.entry.test_run(FRAME).retval == XDP_DROP
        stats = controller.stats()
        assert stats["packets"]["drop_rule"] == 1 and stats["rule_packets"] == {"1": 1}
        [row] = controller.query("rules", {})
        assert (row["id"], row["packets"], row["comment"], row["in_force"]) == (1, 1, "dns flood", True)
        [sample] = controller.query("samples", {"limit": 10})
        assert (sample["rule"], sample["verdict"], sample["src"], sample["dst_port"]) == (1, "drop", "10.9.0.1", 53)
        with pytest.raises(KeyError):
            controller.query("nope", {})
    finally:
        controller.stop(detach=True)
    assert not (pin_root / "ddos").exists()


def test_expired_rules_leave_the_data_plane_in_tick(pin_root):
    clock = FakeClock(1000.0)
    controller = DdosController(pin_root, clock=clock)
    controller.start(state(rules=[{"expr": "udp", "action": "drop", "expires": 1060.0}]))
    try:
        assert controller.dataplane.entry.test_run(FRAME).retval == XDP_DROP
        clock.now = 1059.0
        controller.tick(0.0)
        assert controller.dataplane.entry.test_run(FRAME).retval == XDP_DROP
        clock.now = 1060.0
        controller.tick(0.2)
        assert controller.dataplane.entry.test_run(FRAME).retval == XDP_PASS
        [row] = controller.query("rules", {})
        assert row["in_force"] is False
    finally:
        controller.stop(detach=True)


def test_a_restarted_controller_adopts_pinned_maps_and_counters(pin_root):
    desired = state(rules=[{"id": 5, "expr": "udp", "action": "drop"}])
    first = DdosController(pin_root)
    first.start(desired)
    first.dataplane.entry.test_run(FRAME)
    first.stop(detach=False)
    second = DdosController(pin_root)
    second.start(desired)
    try:
        assert second.stats()["rule_packets"] == {"5": 1}  # same rule, same counters
        assert second.dataplane.entry.test_run(FRAME).retval == XDP_DROP
    finally:
        second.stop(detach=True)
