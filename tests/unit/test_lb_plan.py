"""Planning map operations: stable numbers, only changed ring slots, write-new / flip / delete order."""

import ipaddress

import pytest

from bpfnet.lb.config import LbState
from bpfnet.lb.plan import PlanError, TableState, VipEntry, VipWant, allocate, applied, plan, vip_wants

R = 13  # a small prime ring keeps the expectations readable
A, B, C = (ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3"))
VIP1 = (ipaddress.ip_address("10.200.0.1"), 80, 6)
VIP2 = (ipaddress.ip_address("10.200.0.2"), 0, 17)


def want(key, *reals, flags=0):
    return VipWant(key, flags, [(address, 1) for address in reals])


def step(current, wanted, max_vips=4, max_reals=8):
    desired = allocate(current, wanted, R, max_vips, max_reals)
    return desired, plan(current, desired, R), applied(current, desired, R)


def test_fresh_state_writes_reals_rings_then_vip():
    desired, ops, _ = step(TableState(), [want(VIP1, A, B)])
    assert [op.map for op in ops] == ["vip_stats", "real_stats", "reals", "ch_rings", "vip_map", "vip_addrs"]
    assert ops[0].keys == (0,) and ops[1].keys == (1, 2)  # counters of new numbers start at zero
    assert ops[2].keys == (1, 2) and ops[2].values == (A, B)
    assert len(ops[3].keys) == R and set(ops[3].values) == {1, 2}
    assert ops[4].values == (VipEntry(0, 0),)
    assert ops[5].keys == (VIP1[0],) and ops[5].values == (1,)


def test_unchanged_state_plans_nothing():
    _, _, current = step(TableState(), [want(VIP1, A, B)])
    _, ops, _ = step(current, [want(VIP1, A, B)])
    assert ops == []


def test_adding_a_real_writes_only_changed_slots_and_keeps_ids():
    _, _, current = step(TableState(), [want(VIP1, A, B)])
    desired, ops, _ = step(current, [want(VIP1, A, B, C)])
    assert desired.reals == {1: A, 2: B, 3: C}
    ring_op = next(op for op in ops if op.map == "ch_rings")
    assert 0 < len(ring_op.keys) < R
    assert set(ring_op.values) == {3}  # only slots that moved to the new real
    assert [(op.map, op.keys) for op in ops[:2]] == [("real_stats", (3,)), ("reals", (3,))]
    assert [op.map for op in ops] == ["real_stats", "reals", "ch_rings"]


def test_removal_order_vip_first_then_ring_then_real():
    _, _, current = step(TableState(), [want(VIP1, A), want(VIP2, B)])
    _, ops, after = step(current, [want(VIP1, A)])
    assert [(op.map, op.values is None) for op in ops] == [
        ("vip_map", True), ("vip_addrs", True), ("ch_rings", False), ("reals", False), ("portless_vips", False)]
    ring_op = ops[2]
    assert set(ring_op.values) == {0} and min(ring_op.keys) == 1 * R  # VIP2 had number 1
    assert ops[3].keys == (2,) and ops[3].values == (None,)
    assert ops[4].keys == (0,) and ops[4].values == (0,)  # VIP2 was the last port-less VIP
    assert after.rings[1] == [0] * R


def test_portless_flag_is_set_before_the_first_portless_vip_and_cleared_after_the_last():
    _, ops, current = step(TableState(), [want(VIP1, A)])
    assert "portless_vips" not in [op.map for op in ops] and not current.portless
    _, ops, current = step(current, [want(VIP1, A), want(VIP2, B)])
    names = [op.map for op in ops]
    assert ops[names.index("portless_vips")].values == (1,)
    assert names.index("portless_vips") < names.index("vip_map")  # no port-less entry without the flag
    assert current.portless
    _, ops, current = step(current, [want(VIP1, A), want(VIP2, B), want((VIP2[0], 0, 6), B)])
    assert "portless_vips" not in [op.map for op in ops]  # already set
    _, ops, current = step(current, [want(VIP1, A), want((VIP2[0], 0, 6), B)])
    assert "portless_vips" not in [op.map for op in ops]  # one port-less VIP is left
    _, ops, current = step(current, [want(VIP1, A)])
    names = [op.map for op in ops]
    assert names[-1] == "portless_vips" and ops[-1].values == (0,) and not current.portless
    assert names.index("vip_map") < names.index("portless_vips")


def test_an_adopted_data_plane_without_the_flag_gets_it():
    _, _, current = step(TableState(), [want(VIP2, B)])
    adopted = TableState(vips=current.vips, reals=current.reals, rings={})  # flag read back as 0
    _, ops, _ = step(adopted, [want(VIP2, B)])
    assert [(op.map, op.values) for op in ops if op.map == "portless_vips"] == [("portless_vips", (1,))]


def test_new_vip_never_reuses_a_number_freed_in_the_same_step():
    _, _, current = step(TableState(), [want(VIP1, A), want(VIP2, B)])
    desired, _, _ = step(current, [want(VIP1, A), want((VIP2[0], 53, 17), C)])
    assert desired.vips[(VIP2[0], 53, 17)].vip_num == 2
    assert desired.reals == {1: A, 3: C}


def test_freed_real_ids_are_reused_last():
    _, _, current = step(TableState(), [want(VIP1, A, B)])
    _, _, current = step(current, [want(VIP1, A)])
    desired, _, _ = step(current, [want(VIP1, A, C)])
    assert desired.reals == {1: A, 3: C}  # not id 2, which connection-table entries may still name


def test_flag_change_updates_vip_only():
    _, _, current = step(TableState(), [want(VIP1, A)])
    _, ops, _ = step(current, [want(VIP1, A, flags=2)])
    assert [(op.map, op.values) for op in ops] == [("vip_map", (VipEntry(0, 2),))]


def test_shared_address_counts_and_unknown_rings_are_rewritten():
    two_on_one = [want(VIP1, A), want((VIP1[0], 443, 6), A)]
    _, ops, current = step(TableState(), two_on_one)
    assert next(op for op in ops if op.map == "vip_addrs").values == (2,)
    adopted = TableState(vips=current.vips, reals=current.reals, rings={})  # as read back after a restart
    _, ops, _ = step(adopted, two_on_one)
    assert [op.map for op in ops] == ["ch_rings", "ch_rings"] and all(len(op.keys) == R for op in ops)


def test_limits():
    with pytest.raises(PlanError, match="3 VIPs wanted, the data plane holds at most 2"):
        step(TableState(), [want(VIP1, A), want(VIP2, A), want((VIP1[0], 1, 6), A)], max_vips=2)
    _, _, current = step(TableState(), [want(VIP1, A, B)], max_reals=4)
    with pytest.raises(PlanError, match="no free number for reals"):
        step(current, [want(VIP1, C, ipaddress.ip_address("10.0.0.4"), ipaddress.ip_address("10.0.0.5"))],
             max_reals=4)


def test_vip_wants_from_config_and_down_reals():
    state = LbState.model_validate({"vips": [
        {"address": "10.200.0.1", "port": 80, "protocol": "udp", "flags": ["lru_bypass", "hash_no_src_port"],
         "maglev": "v1", "reals": [{"address": "10.0.0.1", "weight": 3}, {"address": "10.0.0.2", "weight": 5}]}]})
    [w] = vip_wants(state, down={("10.200.0.1:80/udp", B)})
    assert w.key == (ipaddress.ip_address("10.200.0.1"), 80, 17)
    assert w.flags == 3 and w.version == "v1"
    assert list(w.reals) == [(A, 3), (B, 0)]


def test_removed_members_name_reals_taken_off_a_vip():
    from bpfnet.lb.plan import removed_members

    _, _, current = step(TableState(), [want(VIP1, A, B), want(VIP2, A, B)])
    drained = [VipWant(VIP1, 0, [(A, 1), (B, 0)]), want(VIP2, A, B)]
    desired, _, _ = step(current, drained)
    assert removed_members(current, desired) == {}  # weight 0 keeps its flows
    desired, _, _ = step(current, [want(VIP1, A), want(VIP2, A, B)])
    assert removed_members(current, desired) == {VIP1: frozenset({2})}
    desired, _, _ = step(current, [want(VIP1, A, B)])
    assert removed_members(current, desired) == {VIP2: frozenset({1, 2})}
