"""Value runs (ruleset.final_compare, straight_items): which rules have a shape, and how
consecutive rules of one shape fold into one table lookup."""

import pytest

from bpfnet.ddos.pcap import compile_filter
from bpfnet.ddos.ruleset import VALUE_RUNS, Action, CompiledRule, PrefixRun, ValueRun, final_compare, straight_items


def rule(number: int, expr: str, action: Action = Action.DROP) -> CompiledRule:
    return CompiledRule(number, action, tuple(compile_filter(expr)))


@pytest.mark.parametrize("expr, value", [("udp dst port 53", 53), ("tcp dst port 443", 443), ("dst port 9", 9),
                                         ("src port 123", 123), ("ip[8] = 64", 64), ("udp[8:2] = 0x6869", 0x6869),
                                         ("ip6 and udp dst port 53", 53)])
def test_rules_compared_last_with_one_constant_have_a_shape(expr, value):
    found = final_compare(tuple(compile_filter(expr)))
    assert found is not None and found[1] == value


@pytest.mark.parametrize("expr", ["port 53",                      # src or dst: an accept before the last test
                                  "src host 10.0.0.1",            # 32-bit value (a prefix run's job)
                                  "udp", "ip[8] < 64", "not udp dst port 53", "udp dst port 53 or ip[8] = 1",
                                  "udp dst portrange 10-20"])
def test_other_rules_have_none(expr):
    assert final_compare(tuple(compile_filter(expr))) is None


def test_shapes_differ_only_by_value():
    first, second = (final_compare(tuple(compile_filter(f"udp dst port {p}"))) for p in (1, 2))
    assert first is not None and second is not None and first[0] == second[0]
    other = final_compare(tuple(compile_filter("tcp dst port 1")))
    assert other is not None and other[0] != first[0]


def test_consecutive_rules_of_one_shape_fold_and_the_first_of_a_value_wins():
    rules = [rule(1, "udp dst port 53"), rule(2, "udp dst port 80", Action.PASS),
             rule(3, "udp dst port 53", Action.PASS),
             rule(4, "icmp"), rule(5, "tcp dst port 22"), rule(6, "udp dst port 7"),
             rule(7, "src net 10.0.0.0/8"), rule(8, "src net 10.1.0.0/16")]
    items = straight_items(rules)
    assert [type(item).__name__ for item in items] == ["ValueRun", "CompiledRule", "CompiledRule", "CompiledRule",
                                                       "PrefixRun"]
    run = items[0]
    assert isinstance(run, ValueRun) and isinstance(items[4], PrefixRun)
    assert run.entries == {53: rules[0].match_word, 80: rules[1].match_word}  # rule 3 never decides
    assert len(run.sites) >= 2  # IPv4 and IPv6 each end in the port comparison


def test_at_most_value_runs_runs_a_set_and_the_rest_stay_rules():
    rules = []
    for n, shape in enumerate(["udp dst port {}", "tcp dst port {}", "ip[8] = {}", "src port {}", "ip[1] = {}"]):
        rules += [rule(10 * n + i + 1, shape.format(i + 1)) for i in range(3)]
    items = straight_items(rules)
    assert sum(isinstance(item, ValueRun) for item in items) == VALUE_RUNS
    assert [item.number for item in items if isinstance(item, ValueRun)] == list(range(VALUE_RUNS))
    assert len(items) == VALUE_RUNS + 3
