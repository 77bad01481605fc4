"""Limits added at the edge by the API soak (tests/e2e/test_api_soak.py): inputs that validated but
then hung the agent or failed inside the data plane are now refused by the apps' models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bpfnet.ddos.config import MAX_EXPRESSION_CHARS, Rule
from bpfnet.lb.config import LbSettings
from bpfnet.lb.controller import port_param


def _ports_expression(max_chars: int) -> str:
    """'port 1 or port 2 or ...': the shape libpcap's optimizer is slowest on, near `max_chars`."""
    terms, i = [], 1
    while len(" or ".join([*terms, f"port {i}"])) <= max_chars:
        terms.append(f"port {i}")
        i += 1
    return " or ".join(terms)


def test_a_ddos_expression_longer_than_the_limit_is_refused_before_libpcap_sees_it():
    expression = _ports_expression(4 * MAX_EXPRESSION_CHARS)  # seconds of libpcap time if compiled
    with pytest.raises(ValidationError) as caught:
        Rule(expr=expression)
    assert len(caught.value.errors()) == 1  # the field check failed, so the compiling validator never ran
    error = caught.value.errors()[0]
    assert error["loc"] == ("expr",)
    assert error["msg"] == f"String should have at most {MAX_EXPRESSION_CHARS} characters"


def test_a_ddos_expression_at_the_limit_still_compiles():
    expression = _ports_expression(MAX_EXPRESSION_CHARS)
    assert len(expression) > MAX_EXPRESSION_CHARS - 20
    assert Rule(expr=expression).expr == expression


@pytest.mark.parametrize("seconds", [86400.5, 1e308])
def test_lb_udp_timeout_beyond_a_day_is_refused(seconds):
    # 1e308 s used to validate and then overflow the program's u64 nanosecond constant in apply
    with pytest.raises(ValidationError) as caught:
        LbSettings(udp_timeout=seconds)
    assert caught.value.errors()[0]["loc"] == ("udp_timeout",)
    assert LbSettings(udp_timeout=86400).udp_timeout == 86400


@pytest.mark.parametrize("text, message", [("99999", "sport 99999 is not in 0..65535"),
                                           ("-1", "sport -1 is not in 0..65535"),
                                           ("http", "sport must be a port number, got 'http'")])
def test_lb_flow_query_ports_are_checked(text, message):
    # out-of-range ports used to reach the packet builder and fail there (a 500 from the API)
    with pytest.raises(ValueError, match=message):
        port_param({"sport": text}, "sport")
    assert port_param({"sport": "65535"}, "sport") == 65535
