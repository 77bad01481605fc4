"""The detector against four attack shapes, end to end (issue 5): an agent with the ddos stage and
`bpfnet ddos auto on` in a server namespace, the in-kernel generator flooding from an attacker
namespace, a client making TCP connections and UDP exchanges meanwhile (bpfnet.bench.detector).
Asserted per shape: a rule is deployed, every attack frame that reaches the stage while it is in
force is dropped by it, the client's exchanges succeed, the rule is removed after the attack.
The time to the rule is printed, never asserted (but for the attacks defined by a pattern or a
range, where issue 19 asks for a rule within 1 s). IPv6 shapes: the client then talks IPv6."""

from __future__ import annotations

import pytest

from bpfnet.bench.detector import IPV6_SHAPES, PATTERN_SHAPES, SHAPES, DetectorRig
from bpfnet.netns import Topology, cleanup

pytestmark = pytest.mark.root
PREFIX = "ds"


@pytest.fixture(scope="module")
def rig():
    cleanup(PREFIX)
    with Topology(PREFIX) as topology:
        rig = DetectorRig(topology)
        try:
            rig.auto_on()
            yield rig
        finally:
            rig.close()


def assert_client_served_and_rules_withdrawn(rig, outcome) -> None:
    """What every shape asks besides the drops: the client's TCP and UDP exchanges go on (>= 99.9%
    succeed) and every rule is removed after the attack."""
    tally = outcome.client
    assert tally.tcp_ok > 0 and tally.udp_ok > 0, tally
    assert tally.success_share >= 0.999, tally
    assert outcome.removed, [e["kind"] for e in outcome.events]
    assert rig.detector_rules() == []


def print_pattern_outcome(shape, outcome) -> None:
    print(f"\n{shape.name}: first rule {outcome.time_to_rule:.2f} s after the attack started, last "
          f"{outcome.time_to_cover:.2f} s: {outcome.expressions}; since the first rule "
          f"{outcome.dropped_since_rule}/{outcome.sent_since_rule} dropped, then {outcome.dropped_by_rule}/"
          f"{outcome.sent_after_rule}; client {outcome.client}")


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_detector_drops_the_attack_keeps_the_client_and_withdraws_the_rule(rig, shape):
    outcome = rig.attack(shape)
    print(f"\n{shape.name}: first rule {outcome.time_to_rule:.2f} s after the attack started, last "
          f"{outcome.time_to_cover:.2f} s: {outcome.expressions}; {outcome.dropped_by_rule}/"
          f"{outcome.sent_after_rule} dropped, client {outcome.client}")
    # every attack frame that reaches the stage is dropped by the detector's rules: the stage lets
    # only a few stray frames pass (ARP, the paused client's last TCP segments) — an attack that
    # leaked would show thousands; a veth may lose a few generated frames before XDP sees them
    assert outcome.passed <= 20, outcome
    assert outcome.dropped_by_rule >= 0.9 * outcome.sent_after_rule, outcome
    assert_client_served_and_rules_withdrawn(rig, outcome)


@pytest.mark.parametrize("shape", PATTERN_SHAPES, ids=[s.name.replace(" ", "-") for s in PATTERN_SHAPES])
def test_attack_defined_by_a_bit_pattern_or_range_is_dropped_within_a_second(rig, shape):
    """Issue 19: attacks whose frames share no exact value (eight templates each), only a pattern of
    bits or a range: a rule within 1 s holding that pattern or range, >= 99% of the attack dropped,
    >= 99.9% of the client's exchanges kept."""
    outcome = rig.attack(shape)
    print_pattern_outcome(shape, outcome)
    assert outcome.time_to_rule <= 1.0, outcome.expressions
    assert shape.expect in outcome.expressions[0], outcome.expressions
    assert outcome.passed <= 20, outcome
    assert outcome.dropped_by_rule >= 0.99 * outcome.sent_after_rule, outcome
    assert_client_served_and_rules_withdrawn(rig, outcome)


@pytest.mark.parametrize("shape", IPV6_SHAPES, ids=[s.name.replace(" ", "-") for s in IPV6_SHAPES])
def test_ipv6_attack_is_dropped_within_a_second_and_ipv6_clients_are_served(rig, shape):
    """IPv6 floods (issue 19), held to the pattern shapes' bounds: a UDP flood from one /64 with a
    fixed hop limit to the client's UDP service, and attacks defined only by a TCP flag pattern or
    a payload-length range (eight templates each, sources in eight /32s). A rule within 1 s holding
    the shape's term, >= 99% of the attack dropped, >= 99.9% of the IPv6 client's exchanges kept,
    the rule withdrawn after the attack."""
    assert shape.family == 6
    outcome = rig.attack(shape)
    print_pattern_outcome(shape, outcome)
    assert outcome.time_to_rule <= 1.0, outcome.expressions
    assert all(e.startswith("dst host fd00:79::1 and ip6[6] = ") for e in outcome.expressions), outcome.expressions
    assert shape.expect in outcome.expressions[0], outcome.expressions
    assert outcome.passed <= 20, outcome
    assert outcome.dropped_by_rule >= 0.99 * outcome.sent_after_rule, outcome
    assert_client_served_and_rules_withdrawn(rig, outcome)
