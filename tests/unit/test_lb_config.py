"""The lb config schema: defaults, and bad input rejected with a message naming the problem."""

import ipaddress

import pytest
from pydantic import ValidationError

from bpfnet.lb.config import LbState, parse_vip_name, vip_name


def vip(**kw):
    return {"address": "10.200.0.1", "port": 80, **kw}


def test_minimal_state_and_defaults():
    state = LbState.model_validate({"vips": [vip(reals=[{"address": "10.0.0.1"}])]})
    [v] = state.vips
    assert v.protocol == "tcp" and v.maglev == "v2" and v.reals[0].weight == 1
    assert v.name == "10.200.0.1:80/tcp" and v.flag_bits == 0
    assert state.settings.ring_size == 65537 and state.settings.encap == "ipip"


def test_flags_to_bits():
    state = LbState.model_validate({"vips": [vip(flags=["hash_no_src_port", "lru_bypass", "hash_dport_only"])]})
    assert state.vips[0].flag_bits == 11


@pytest.mark.parametrize("data, message", [
    ({"vips": [vip(), vip()]}, "VIP 10.200.0.1:80/tcp is defined twice"),
    ({"vips": [vip(reals=[{"address": "10.0.0.1"}, {"address": "10.0.0.1"}])]}, "real 10.0.0.1 is listed twice"),
    ({"vips": [vip(address="fc00::1", reals=[{"address": "10.0.0.1"}])]}, "an IPv6 VIP needs IPv6 reals"),
    ({"vips": [vip(port=70000)]}, "less than or equal to 65535"),
    ({"vips": [vip(protocol="sctp")]}, "'tcp' or 'udp'"),
    ({"vips": [vip(flags=["fast"])]}, "hash_no_src_port"),
    ({"vips": [vip(reals=[{"address": "10.0.0.1", "weight": -1}])]}, "greater than or equal to 0"),
    ({"vips": [vip(reals=[{"address": "10.0.0.999"}])]}, "IPv4 or IPv6 address"),
    ({"vips": [vip(maglev="v3")]}, "'v1' or 'v2'"),
    ({"vips": [vip(port=0, health_check={"kind": "tcp"})]}, "its health_check needs a port"),
    ({"vips": [vip(health_check={"kind": "http", "path": "health"})]}, "path must start with '/'"),
    ({"settings": {"ring_size": 65536}}, "ring_size must be prime"),
    ({"settings": {"gateway_mac": "00:11:22"}}, "gateway_mac must look like"),
    ({"settings": {"encap": "gue"}, "vips": [vip(reals=[{"address": "10.0.0.1"}])]}, "gue_source_v4 is needed"),
    ({"settings": {"max_vips": 1}, "vips": [vip(), vip(port=81)]}, "2 VIPs, settings.max_vips is 1"),
    ({"vips": [vip(weight=3)]}, "Extra inputs are not permitted"),
])
def test_bad_input_is_named(data, message):
    with pytest.raises(ValidationError, match=message):
        LbState.model_validate(data)


def test_json_round_trip():
    state = LbState.model_validate({"settings": {"gateway_mac": "02:AA:00:00:00:01"},
                                    "vips": [vip(address="fc00::1", health_check={"kind": "http"},
                                                 reals=[{"address": "fc00::2", "weight": 0}])]})
    again = LbState.model_validate(state.model_dump(mode="json"))
    assert again == state and again.settings.gateway_mac == "02:aa:00:00:00:01"


@pytest.mark.parametrize("text, parsed", [
    ("10.0.0.1:80/tcp", ("10.0.0.1", 80, "tcp")),
    ("10.0.0.1:53/udp", ("10.0.0.1", 53, "udp")),
    ("10.0.0.1:0", ("10.0.0.1", 0, "tcp")),
    ("[fc00::1]:443/udp", ("fc00::1", 443, "udp")),
])
def test_parse_vip_name(text, parsed):
    address, port, protocol = parse_vip_name(text)
    assert (str(address), port, protocol) == parsed
    assert parse_vip_name(vip_name(address, port, protocol)) == (address, port, protocol)


@pytest.mark.parametrize("text, message", [
    ("10.0.0.1", "must look like"), ("10.0.0.1:80/sctp", "must look like"),
    ("10.0.0.300:80/tcp", "not an IP address"), ("10.0.0.1:99999/tcp", "over 65535"),
])
def test_parse_vip_name_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_vip_name(text)


def test_state_vip_lookup():
    state = LbState.model_validate({"vips": [vip()]})
    assert state.vip("10.200.0.1:80/tcp").address == ipaddress.ip_address("10.200.0.1")
    with pytest.raises(KeyError, match="no VIP 10.200.0.1:81/tcp"):
        state.vip("10.200.0.1:81/tcp")


def test_default_connection_table_is_production_sized_and_fits():
    from bpfnet.lb.config import MAX_MAP_BYTES, LbSettings, map_bytes

    settings = LbSettings()
    assert settings.conn_table_size == 1 << 22
    assert 400 * 2**20 < map_bytes(settings) <= MAX_MAP_BYTES
    with pytest.raises(ValidationError, match="the limit is 1,024 MiB"):
        LbSettings(conn_table_size=16_000_000)


def test_routing_state_is_checked():
    vip = {"address": "10.1.1.1", "port": 53, "protocol": "udp", "reals": [{"address": "10.0.0.1"}]}
    for extra, message in [
        ({"server_ids": [{"id": 5, "address": "10.0.0.1"}, {"id": 5, "address": "10.0.0.2"}]},
         "server id 5 is listed twice"),
        ({"server_ids": [{"id": 0, "address": "10.0.0.1"}]}, "greater than or equal to 1"),
        ({"source_routes": [{"prefix": "10.0.0.0/8", "address": "10.0.0.1"},
                            {"prefix": "10.0.0.0/8", "address": "10.0.0.2"}]},
         "source route 10.0.0.0/8 is listed twice"),
        ({"down_reals": [{"vip": "10.1.1.1:53/tcp", "address": "10.0.0.1"}]}, "VIP 10.1.1.1:53/tcp has no real"),
        ({"settings": {"decap_addresses": ["10.9.9.9", "10.9.9.9"]}}, "decap address 10.9.9.9 is listed twice"),
    ]:
        with pytest.raises(ValidationError, match=message):
            LbState.model_validate({"vips": [vip], **extra})
    state = LbState.model_validate({"vips": [vip], "down_reals": [{"vip": "10.1.1.1:053/udp", "address": "10.0.0.1"}]})
    assert state.down_reals[0].vip == "10.1.1.1:53/udp"  # VIP names are canonical
