"""Katran's routing beyond the hash, through BPF_PROG_TEST_RUN: input frame, verdict, exact output.

- down reals and UDP flow migration (`udp_flow_migration`, Katran's F_UDP_FLOW_MIGRATION): a UDP flow
  whose connection-table entry names a real that is down is hashed again, onto the reals left;
- UDP stable routing (`udp_stable_routing`, F_UDP_STABLE_ROUTING_VIP): a payload that starts with 0x52
  and holds 8 bytes names a server id in bytes 1-3 (big endian), mapped to a real by `server_ids`;
- QUIC connection-id routing (`quic`, F_QUIC_VIP): long-header Initial/0-RTT packets are hashed, other
  packets carry a server id in their destination connection id (layouts v1, v2, v3) mapped through
  `server_ids`; unknown ids are hashed; one counter per outcome;
- TCP server-id routing (setting `tcp_server_id_routing`, Katran's TPR): a non-SYN TCP packet whose
  options hold kind 0xB7, length 6 and a 4-byte server id (little-endian) goes to the id's real;
- inline decapsulation (setting `decap_addresses`): IPIP / IP6IP6 / 4in6 / GUE packets sent to one of
  the LB's addresses lose their outer header, then the inner packet is balanced (or passed);
- source routing (`src_routing`, F_SRC_ROUTING with LPM_SRC_LOOKUP): the longest client prefix of
  `source_routes` names the real instead of the ring.

Frames and expected outputs are built with scapy from the wire formats (docs/lb.md); the real a
hashed flow lands on comes from the Python twin of the hash and ring.
"""

import ipaddress
import random
import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpf.test_lb_dataplane import (
    CLIENT_MAC,
    LB_MAC,
    XDP_TX,
    LoadedLb,
    destination,
    ipip,
    mutate,
    payload,
    random_frame,
    v4,
    v6,
)
from bpfnet.lb.config import LbState
from bpfnet.lb.hashing import flow_hash
from bpfnet.lb.maglev import build_ring

pytestmark = pytest.mark.root

REALS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
MIGRATING, STAYING, STABLE = "10.200.2.1:53/udp", "10.200.2.3:53/udp", "10.200.2.2:53/udp"
SERVER_IDS = {0x0A0B0C: "10.0.0.2", 7: "10.0.0.1", 0x1234: "10.0.0.3", 0xDEADBEEF: "10.0.0.2"}
V6_REALS = ["fc00::1", "fc00::2", "fc00::3"]
SOURCE_ROUTES = {"192.168.0.0/16": "10.0.0.1", "192.168.7.0/24": "10.0.0.3", "192.168.7.128/25": "fc00::1",
                 "fc00:2::/32": "fc00::2"}


def routing_state(down=(), **extra) -> LbState:
    reals = [{"address": a} for a in REALS]
    return LbState.model_validate({
        "settings": {"use_fib": False, "gateway_mac": "00:00:de:ad:be:af", "max_vips": 8, "max_reals": 16,
                     "conn_table_size": 1024},
        "vips": [
            {"address": "10.200.2.1", "port": 53, "protocol": "udp", "reals": reals, "flags": ["udp_flow_migration"]},
            {"address": "10.200.2.3", "port": 53, "protocol": "udp", "reals": reals},
            {"address": "10.200.2.2", "port": 53, "protocol": "udp", "reals": reals, "flags": ["udp_stable_routing"]},
            {"address": "10.200.2.4", "port": 80, "protocol": "tcp", "reals": reals, "flags": ["src_routing"]},
            {"address": "10.200.2.6", "port": 443, "protocol": "udp", "reals": reals, "flags": ["quic"]},
            {"address": "10.200.2.5", "port": 80, "protocol": "tcp", "reals": reals},
            {"address": "fc00:1::4", "port": 80, "protocol": "tcp", "reals": [{"address": a} for a in V6_REALS],
             "flags": ["src_routing"]},
        ],
        "source_routes": [{"prefix": p, "address": a} for p, a in SOURCE_ROUTES.items()],
        "server_ids": [{"id": sid, "address": a} for sid, a in SERVER_IDS.items()],
        "down_reals": [{"vip": vip, "address": a} for vip, a in down],
        **extra})


def hashed(client, sport, dport, down=()):
    """The real the ring picks for a flow when the reals in `down` are out of it."""
    ring = build_ring([(a, 0 if a in down else 1) for a in REALS])
    return REALS[ring[flow_hash(client, sport, dport) % 65537]]


def udp(dst, sport, data=b"katran test pkt", src="192.168.1.1", dport=53):
    return v4(dst, src=src) / UDP(sport=sport, dport=dport) / Raw(data)


def real_of(out: bytes) -> str:
    return Ether(out)[IP].dst


def counters(lb) -> dict[str, int]:
    return {name: v["packets"] for name, v in lb.dataplane.counters().items()}


def table(lb) -> dict[tuple, str]:
    """The connection table: (client, sport, VIP, dport, protocol) -> the real's address."""
    reals = lb.dataplane.tables.reals
    out = {}
    for key, conn in lb.dataplane.conn_table.items():
        src, dst = (ipaddress.ip_address(bytes(a)[:4] if key.family == 4 else bytes(a)) for a in (key.src, key.dst))
        out[(str(src), socket.ntohs(key.sport), str(dst), socket.ntohs(key.dport), key.proto)] = str(
            reals[conn.real_id])
    return out


@pytest.fixture
def lb():
    loaded = LoadedLb(routing_state())
    yield loaded
    loaded.close()


# --- down reals and UDP flow migration -----------------------------------------------------------

def test_udp_flow_on_a_down_real_migrates(lb):
    frame = udp("10.200.2.1", 40000)
    first = hashed("192.168.1.1", 40000, 53)
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, first)))
    lb.dataplane.apply(routing_state(down=[(MIGRATING, first)]))
    moved = hashed("192.168.1.1", 40000, 53, down={first})
    assert moved != first
    # the table still names the down real: the flow is hashed again, onto the reals left...
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, moved)))
    # ...and the entry now names its new real: the next packet is a plain hit
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, moved)))
    c = counters(lb)
    assert (c["udp_migrated"], c["conn_hit"], c["conn_miss"], c["ring"]) == (1, 1, 2, 2)


def test_without_the_flag_a_flow_stays_on_its_down_real(lb):
    frame = udp("10.200.2.3", 40000)
    first = hashed("192.168.1.1", 40000, 53)
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, first)))
    lb.dataplane.apply(routing_state(down=[(STAYING, first)]))
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, first)))
    # new flows avoid it: it is out of the ring
    assert {real_of(lb.run(udp("10.200.2.3", port, src="192.168.9.9"))[1]) for port in range(3000, 3100)} \
        == set(REALS) - {first}
    assert counters(lb)["udp_migrated"] == 0


def test_down_on_another_vip_does_not_move_the_flow(lb):
    frame = udp("10.200.2.1", 40000)
    first = hashed("192.168.1.1", 40000, 53)
    lb.run(frame)
    lb.dataplane.apply(routing_state(down=[(STAYING, first)]))  # down on the other VIP only
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, first)))
    assert counters(lb)["udp_migrated"] == 0


def test_down_set_follows_the_state(lb):
    first = hashed("192.168.1.1", 40000, 53)
    lb.dataplane.apply(routing_state(down=[(MIGRATING, first), (STAYING, first)]))
    tables = lb.dataplane.tables
    real_id = next(i for i, a in tables.reals.items() if str(a) == first)
    nums = {tables.vips[(ipaddress.ip_address(v), 53, 17)].vip_num for v in ("10.200.2.1", "10.200.2.3")}
    in_map = {(k.vip_num, k.real_id) for k in lb.dataplane.down_reals.keys()}
    assert in_map == {(num, real_id) for num in nums}
    lb.dataplane.apply(routing_state())
    assert list(lb.dataplane.down_reals.keys()) == []
    # a failing health check counts as down too
    lb.dataplane.apply(routing_state(), down={(MIGRATING, ipaddress.ip_address(first))})
    assert len(list(lb.dataplane.down_reals.keys())) == 1


def test_tcp_flows_never_migrate():
    with pytest.raises(ValueError, match="udp_flow_migration applies to UDP VIPs only"):
        LbState.model_validate({"vips": [{"address": "10.1.1.1", "port": 80, "protocol": "tcp",
                                          "flags": ["udp_flow_migration"]}]})


def test_down_real_must_be_listed():
    with pytest.raises(ValueError, match="VIP 10.200.2.1:53/udp has no real 10.0.0.9"):
        routing_state(down=[(MIGRATING, "10.0.0.9")])


# --- UDP stable routing --------------------------------------------------------------------------

def stable(server_id: int, tail=b"\x00\x00\x00\x00") -> bytes:
    return b"\x52" + server_id.to_bytes(3, "big") + tail


STABLE_CASES = [
    # (description, payload, real: None = the hash's, counter)
    ("header with a known server id -> its real", stable(0x0A0B0C), "10.0.0.2", "stable_routed"),
    ("other known server id", stable(7) + b"more payload", "10.0.0.1", "stable_routed"),
    ("unknown server id -> hash", stable(0x0A0B0D), None, "stable_unknown"),
    ("server id 0 -> hash", stable(0), None, "stable_no_id"),
    ("other first byte -> hash", b"\x51" + stable(7)[1:], None, "stable_no_id"),
    ("header shorter than 8 bytes -> hash", stable(7, tail=b"\x00\x00\x00"), None, "stable_no_id"),
    ("empty payload -> hash", b"", None, "stable_no_id"),
]


@pytest.mark.parametrize("description, data, real, counter", STABLE_CASES, ids=[c[0] for c in STABLE_CASES])
def test_stable_routing(lb, description, data, real, counter):
    frame = udp("10.200.2.2", 40001, data)
    want = real or hashed("192.168.1.1", 40001, 53)
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, want)))
    c = counters(lb)
    assert c[counter] == 1
    assert c["stable_routed"] + c["stable_unknown"] + c["stable_no_id"] == 1


def test_stable_routing_overrides_the_connection_table(lb):
    plain = udp("10.200.2.2", 40002, b"hello")
    hashed_real = hashed("192.168.1.1", 40002, 53)
    lb.run(plain)  # the flow is in the table now
    sid = next(s for s, a in SERVER_IDS.items() if a != hashed_real)
    routed = udp("10.200.2.2", 40002, stable(sid))
    assert lb.run(routed) == (XDP_TX, bytes(ipip(routed, SERVER_IDS[sid])))
    assert lb.run(plain) == (XDP_TX, bytes(ipip(plain, hashed_real)))  # the entry was left alone


def test_stable_routing_only_on_flagged_vips(lb):
    frame = udp("10.200.2.3", 40003, stable(7))
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, hashed("192.168.1.1", 40003, 53))))
    assert counters(lb)["stable_no_id"] == 0


def test_server_ids_follow_the_state(lb):
    frame = udp("10.200.2.2", 40004, stable(7))
    data = routing_state().model_dump(mode="json")
    data["server_ids"] = [{"id": 7, "address": "10.0.0.3"}]
    lb.dataplane.apply(LbState.model_validate(data))
    assert real_of(lb.run(frame)[1]) == "10.0.0.3"
    assert {k.value: v.value for k, v in lb.dataplane.server_ids.items()} == {
        7: next(i for i, a in lb.dataplane.tables.reals.items() if str(a) == "10.0.0.3")}
    data["server_ids"] = []
    lb.dataplane.apply(LbState.model_validate(data))
    assert real_of(lb.run(frame)[1]) == hashed("192.168.1.1", 40004, 53)


def test_a_server_id_real_outside_every_vip_gets_a_real_id(lb):
    data = routing_state().model_dump(mode="json")
    data["server_ids"] = [{"id": 9, "address": "10.0.0.99"}]
    lb.dataplane.apply(LbState.model_validate(data))
    frame = udp("10.200.2.2", 40005, stable(9))
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, "10.0.0.99")))




# --- source routing ------------------------------------------------------------------------------

def tcp(dst, src, sport=31337, flags="A"):
    make = v6 if ":" in dst else v4
    return make(dst, src=src) / TCP(sport=sport, dport=80, flags=flags) / payload()


def hashed_v6(client, sport, dport):
    ring = build_ring([(a, 1) for a in V6_REALS])
    return V6_REALS[ring[flow_hash(client, sport, dport) % 65537]]


SRC_CASES = [
    # (description, VIP, client, real: None = the hash's, counter or None)
    ("client in 192.168.0.0/16 -> 10.0.0.1", "10.200.2.4", "192.168.1.1", "10.0.0.1", "src_routed"),
    ("longest prefix: 192.168.7.0/24 -> 10.0.0.3", "10.200.2.4", "192.168.7.9", "10.0.0.3", "src_routed"),
    ("longest prefix to an IPv6 real: 4in6", "10.200.2.4", "192.168.7.200", "fc00::1", "src_routed"),
    ("no route for the client -> ring", "10.200.2.4", "10.1.1.1", None, "src_unrouted"),
    ("VIP without the flag -> ring", "10.200.2.5", "192.168.1.1", None, None),
    ("IPv6 client in fc00:2::/32 -> fc00::2", "fc00:1::4", "fc00:2::1", "fc00::2", "src_routed"),
    ("IPv6 client without a route -> ring", "fc00:1::4", "fc00:3::1", None, "src_unrouted"),
]


@pytest.mark.parametrize("description, vip, client, real, counter", SRC_CASES, ids=[c[0] for c in SRC_CASES])
def test_source_routing(lb, description, vip, client, real, counter):
    frame = tcp(vip, client)
    if real is None:
        real = hashed_v6(client, 31337, 80) if ":" in vip else hashed(client, 31337, 80)
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, real)))
    c = counters(lb)
    assert (c["src_routed"], c["src_unrouted"]) == (counter == "src_routed", counter == "src_unrouted")
    assert c["ring"] == (counter != "src_routed")


def test_source_routed_flow_keeps_its_real_through_the_table(lb):
    syn, ack = tcp("10.200.2.4", "192.168.7.9", flags="S"), tcp("10.200.2.4", "192.168.7.9")
    assert lb.run(syn) == (XDP_TX, bytes(ipip(syn, "10.0.0.3")))
    data = routing_state().model_dump(mode="json")
    data["source_routes"] = [r for r in data["source_routes"] if r["prefix"] != "192.168.7.0/24"]
    lb.dataplane.apply(LbState.model_validate(data))
    assert lb.run(ack) == (XDP_TX, bytes(ipip(ack, "10.0.0.3")))  # established: the table
    syn2 = tcp("10.200.2.4", "192.168.7.9", sport=31338, flags="S")
    assert lb.run(syn2) == (XDP_TX, bytes(ipip(syn2, "10.0.0.1")))  # new flow: the /16 now
    assert {(p, r) for p, r in lb.dataplane.tables.source_routes.items()} == {
        (ipaddress.ip_network(p), next(i for i, a in lb.dataplane.tables.reals.items() if str(a) == r))
        for p, r in SOURCE_ROUTES.items() if p != "192.168.7.0/24"}
    assert len(list(lb.dataplane.src_routes_v4.keys())) == 2 and len(list(lb.dataplane.src_routes_v6.keys())) == 1


def test_source_routes_are_read_back(lb):
    assert lb.dataplane.read_tables().source_routes == lb.dataplane.tables.source_routes


def test_ipv6_clients_need_ipv6_reals():
    with pytest.raises(ValueError, match="IPv6 clients need an IPv6 real"):
        routing_state(source_routes=[{"prefix": "fc00:9::/32", "address": "10.0.0.1"}])


# --- QUIC connection-id routing ------------------------------------------------------------------
# Connection-id layouts (the first 2 bits are the version):
#   v1: 01 | server id (16 bits) | ...     v2: 10 xxxxxx | server id (24 bits) | ...
#   v3: 11 xxxxxx | server id (32 bits) | ...


def cid_v1(server_id: int) -> bytes:
    bits = (0b01 << 22) | (server_id << 6) | 0b101010  # 24 bits: version, id, 6 bits of anything
    return bits.to_bytes(3, "big") + b"\x11\x22\x33\x44\x55"


def cid_v2(server_id: int) -> bytes:
    return bytes([0x80 | 0x15]) + server_id.to_bytes(3, "big") + b"\x66\x77\x88\x99"


def cid_v3(server_id: int) -> bytes:
    return bytes([0xC0 | 0x2A]) + server_id.to_bytes(4, "big") + b"\xaa\xbb\xcc"


def short_header(cid: bytes) -> bytes:
    return bytes([0x40 | 0x01]) + cid + b"encrypted payload"


def long_header(packet_type: int, cid: bytes, cid_len: int | None = None) -> bytes:
    """packet_type: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry."""
    first = 0x80 | 0x40 | (packet_type << 4)
    length = len(cid) if cid_len is None else cid_len
    return bytes([first]) + b"\x00\x00\x00\x01" + bytes([length]) + cid + b"\x08scid1234" + b"payload"


QUIC_CASES = [
    # (description, UDP payload, real: None = the hash's, outcome counter, layout counter or None)
    ("short header, CID v1 -> server id 0x1234", short_header(cid_v1(0x1234)), "10.0.0.3", "quic_cid_routed",
     "quic_cid_v1"),
    ("short header, CID v2 -> server id 0x0a0b0c", short_header(cid_v2(0x0A0B0C)), "10.0.0.2",
     "quic_cid_routed", "quic_cid_v2"),
    ("short header, CID v3 -> server id 0xdeadbeef", short_header(cid_v3(0xDEADBEEF)), "10.0.0.2",
     "quic_cid_routed", "quic_cid_v3"),
    ("long header Handshake, CID v2 -> its real", long_header(2, cid_v2(7)), "10.0.0.1", "quic_cid_routed",
     "quic_cid_v2"),
    ("long header Retry type, CID v1 -> its real", long_header(3, cid_v1(7)), "10.0.0.1", "quic_cid_routed",
     "quic_cid_v1"),
    ("long header Initial -> hash (client's CID)", long_header(0, cid_v2(7)), None, "quic_initial", None),
    ("long header 0-RTT -> hash", long_header(1, cid_v2(7)), None, "quic_initial", None),
    ("unknown server id -> hash", short_header(cid_v2(0x0A0B0D)), None, "quic_cid_unknown", "quic_cid_v2"),
    ("CID version 0 -> hash", short_header(bytes([0x3F]) + cid_v2(7)[1:]), None, "quic_no_cid", "quic_cid_v0"),
    ("server id 0 -> hash", short_header(cid_v3(0)), None, "quic_no_cid", "quic_cid_v3"),
    ("Handshake with a 4-byte DCID -> hash", long_header(2, cid_v2(7)[:4], 4), None, "quic_no_cid", None),
    ("short header cut inside the CID -> hash", short_header(cid_v2(7))[:6], None, "quic_no_cid", None),
    ("empty payload -> hash", b"", None, "quic_no_cid", None),
]
QUIC_OUTCOMES = ("quic_initial", "quic_cid_routed", "quic_cid_unknown", "quic_no_cid")


@pytest.mark.parametrize("description, data, real, outcome, layout", QUIC_CASES, ids=[c[0] for c in QUIC_CASES])
def test_quic(lb, description, data, real, outcome, layout):
    frame = udp("10.200.2.6", 50000, data, dport=443)
    want = real or hashed("192.168.1.1", 50000, 443)
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, want)))
    c = counters(lb)
    assert {name: c[name] for name in QUIC_OUTCOMES} == {name: int(name == outcome) for name in QUIC_OUTCOMES}
    layouts = [f"quic_cid_v{v}" for v in range(4)]
    assert {name: c[name] for name in layouts} == {name: int(name == layout) for name in layouts}


def test_quic_connection_follows_its_server_id_not_the_table(lb):
    """Initial packets are hashed (and tabled); once the server's CID is in use, packets go to the
    server id's real whatever the table or the client's address and port say (a migrated client)."""
    initial = udp("10.200.2.6", 50001, long_header(0, cid_v2(7)), dport=443)
    first = hashed("192.168.1.1", 50001, 443)
    assert lb.run(initial) == (XDP_TX, bytes(ipip(initial, first)))
    sid = next(s for s, a in SERVER_IDS.items() if a != first and s < 1 << 24)
    for src, sport in (("192.168.1.1", 50001), ("172.20.0.9", 61000)):  # same flow, then a new path
        frame = udp("10.200.2.6", sport, short_header(cid_v2(sid)), src=src, dport=443)
        assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, SERVER_IDS[sid])))
    c = counters(lb)
    assert (c["quic_initial"], c["quic_cid_routed"], c["conn_miss"]) == (1, 2, 1)
    # the routed packets entered their flows on the id's real (Katran's check_and_update_real_index_in_lru):
    # the Initial's entry moved, the client's new path got one
    assert table(lb) == {("192.168.1.1", 50001, "10.200.2.6", 443, 17): SERVER_IDS[sid],
                         ("172.20.0.9", 61000, "10.200.2.6", 443, 17): SERVER_IDS[sid]}
    assert (c["sid_conn_moved"], c["sid_conn_new"]) == (1, 1)
    assert all(conn.atime_ns for _, conn in lb.dataplane.conn_table.items())  # UDP entries are stamped


def test_quic_packet_without_a_cid_follows_the_routed_flow(lb):
    """After a CID-routed packet, a packet of the same flow with no usable server id (CID version 0)
    finds the flow's entry: the id's real, not the hash's."""
    first = hashed("192.168.1.1", 50003, 443)
    sid = next(s for s, a in SERVER_IDS.items() if a != first and s < 1 << 24)
    routed = udp("10.200.2.6", 50003, short_header(cid_v2(sid)), dport=443)
    assert lb.run(routed) == (XDP_TX, bytes(ipip(routed, SERVER_IDS[sid])))
    assert table(lb) == {("192.168.1.1", 50003, "10.200.2.6", 443, 17): SERVER_IDS[sid]}
    no_cid = udp("10.200.2.6", 50003, short_header(bytes([0x3F]) + cid_v2(sid)[1:]), dport=443)
    assert lb.run(no_cid) == (XDP_TX, bytes(ipip(no_cid, SERVER_IDS[sid])))
    c = counters(lb)
    assert (c["sid_conn_new"], c["quic_no_cid"], c["conn_hit"], c["ring"]) == (1, 1, 1, 0)


def test_quic_routed_packets_leave_an_lru_bypass_vips_table_alone():
    data = routing_state().model_dump(mode="json")
    data["vips"].append({"address": "10.200.2.7", "port": 443, "protocol": "udp",
                         "reals": [{"address": a} for a in REALS], "flags": ["quic", "lru_bypass"]})
    loaded = LoadedLb(LbState.model_validate(data))
    try:
        frame = udp("10.200.2.7", 50004, short_header(cid_v2(7)), dport=443)
        assert loaded.run(frame) == (XDP_TX, bytes(ipip(frame, "10.0.0.1")))
        assert table(loaded) == {}
        assert counters(loaded)["quic_cid_routed"] == 1
    finally:
        loaded.close()


def test_quic_only_on_flagged_vips(lb):
    frame = udp("10.200.2.3", 50002, short_header(cid_v2(7)))
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, hashed("192.168.1.1", 50002, 53))))
    assert sum(counters(lb)[name] for name in QUIC_OUTCOMES) == 0


def test_quic_flag_is_udp_only():
    with pytest.raises(ValueError, match="flag quic applies to UDP VIPs only"):
        LbState.model_validate({"vips": [{"address": "10.1.1.1", "port": 443, "protocol": "tcp", "flags": ["quic"]}]})


# --- TCP server-id routing (TPR) -----------------------------------------------------------------

def tpr(server_id: int, length: int = 6) -> tuple[int, bytes]:
    """The TPR option as scapy takes it: kind 0xB7, then the id little-endian (length counts kind+len)."""
    return 0xB7, server_id.to_bytes(4, "little")[:length - 2]


@pytest.fixture
def tpr_lb():
    data = routing_state().model_dump(mode="json")
    data["settings"]["tcp_server_id_routing"] = True
    loaded = LoadedLb(LbState.model_validate(data))
    yield loaded
    loaded.close()


def tcp_opts(options, flags="A", sport=31337, dst="10.200.2.5"):
    return v4(dst, src="192.168.1.1") / TCP(sport=sport, dport=80, flags=flags, options=options) / payload()


TPR_CASES = [
    # (description, TCP flags, options, real: None = the hash's, counter or None)
    ("option alone -> server id 7's real", "A", [tpr(7)], "10.0.0.1", "tpr_routed"),
    ("after NOPs, MSS and a timestamp", "PA", [("NOP", None), ("NOP", None), ("MSS", 1460),
                                               ("Timestamp", (1, 2)), tpr(0x1234)], "10.0.0.3", "tpr_routed"),
    ("32-bit id, little-endian on the wire", "A", [tpr(0xDEADBEEF)], "10.0.0.2", "tpr_routed"),
    ("the id read big-endian is not it", "A", [(0xB7, (7).to_bytes(4, "big"))], None, "tpr_unknown"),
    ("unknown server id -> table and ring", "A", [tpr(0x777)], None, "tpr_unknown"),
    ("option of length 5 -> no id", "A", [tpr(7, length=5)], None, "tpr_no_id"),
    ("end of options before it -> no id", "A", [("EOL", None), tpr(7)], None, "tpr_no_id"),
    ("no options -> no id", "A", [], None, "tpr_no_id"),
    ("SYN: never read (a new flow takes the ring)", "S", [tpr(7)], None, None),
]
TPR_OUTCOMES = ("tpr_routed", "tpr_unknown", "tpr_no_id")


@pytest.mark.parametrize("description, flags, options, real, counter", TPR_CASES, ids=[c[0] for c in TPR_CASES])
def test_tcp_server_id(tpr_lb, description, flags, options, real, counter):
    frame = tcp_opts(options, flags)
    want = real or hashed("192.168.1.1", 31337, 80)
    assert tpr_lb.run(frame) == (XDP_TX, bytes(ipip(frame, want)))
    c = counters(tpr_lb)
    assert {name: c[name] for name in TPR_OUTCOMES} == {name: int(name == counter) for name in TPR_OUTCOMES}
    if real is not None:  # routed by the option: the table is not read, but now holds the flow on that real
        assert (c["conn_hit"], c["conn_miss"], c["sid_conn_new"]) == (0, 0, 1)
        assert table(tpr_lb) == {("192.168.1.1", 31337, "10.200.2.5", 80, 6): real}
    else:
        assert c["sid_conn_new"] == 0


def test_tcp_server_id_overrides_the_table(tpr_lb):
    syn = tcp_opts([], flags="S", sport=31340)
    first = hashed("192.168.1.1", 31340, 80)
    assert tpr_lb.run(syn) == (XDP_TX, bytes(ipip(syn, first)))
    sid = next(s for s, a in SERVER_IDS.items() if a != first)
    ack = tcp_opts([tpr(sid)], sport=31340)
    assert tpr_lb.run(ack) == (XDP_TX, bytes(ipip(ack, SERVER_IDS[sid])))
    # the routed segment moved the flow's entry to the id's real (Katran's TPR does the same), so a
    # segment without the option (or with an id whose mapping went away) stays there
    assert table(tpr_lb) == {("192.168.1.1", 31340, "10.200.2.5", 80, 6): SERVER_IDS[sid]}
    plain = tcp_opts([], sport=31340)
    assert tpr_lb.run(plain) == (XDP_TX, bytes(ipip(plain, SERVER_IDS[sid])))
    c = counters(tpr_lb)
    assert (c["sid_conn_new"], c["sid_conn_moved"], c["conn_hit"], c["ring"]) == (0, 1, 1, 1)


def test_tcp_server_id_routed_flow_survives_its_id(tpr_lb):
    """A flow first seen with the option (the LB restarted, or another LB had it) is entered on the
    id's real; once the server id leaves the map, the table still holds the flow there."""
    ack = tcp_opts([tpr(0x1234)], sport=31341)
    assert tpr_lb.run(ack) == (XDP_TX, bytes(ipip(ack, "10.0.0.3")))
    assert table(tpr_lb) == {("192.168.1.1", 31341, "10.200.2.5", 80, 6): "10.0.0.3"}
    data = tpr_lb.state.model_dump(mode="json")
    data["server_ids"] = [e for e in data["server_ids"] if e["id"] != 0x1234]
    tpr_lb.dataplane.apply(LbState.model_validate(data))
    again = tcp_opts([tpr(0x1234)], sport=31341, flags="PA")
    assert tpr_lb.run(again) == (XDP_TX, bytes(ipip(again, "10.0.0.3")))
    c = counters(tpr_lb)
    assert (c["tpr_routed"], c["tpr_unknown"], c["sid_conn_new"], c["conn_hit"]) == (1, 1, 1, 1)


def test_tcp_server_id_rst_creates_no_entry(tpr_lb):
    rst = tcp_opts([tpr(7)], flags="RA", sport=31342)
    assert tpr_lb.run(rst) == (XDP_TX, bytes(ipip(rst, "10.0.0.1")))
    assert table(tpr_lb) == {}
    assert counters(tpr_lb)["sid_conn_new"] == 0


def test_tcp_server_id_is_off_by_default(lb):
    frame = tcp_opts([tpr(7)])
    assert lb.run(frame) == (XDP_TX, bytes(ipip(frame, hashed("192.168.1.1", 31337, 80))))
    assert sum(counters(lb)[name] for name in TPR_OUTCOMES) == 0


# --- inline decapsulation ------------------------------------------------------------------------

DECAP_V4, DECAP_V6, REMOTE_V4, REMOTE_V6 = "10.200.9.1", "fc00:9::1", "10.50.0.1", "fc00:50::1"


@pytest.fixture
def decap_lb():
    data = routing_state().model_dump(mode="json")
    data["settings"]["decap_addresses"] = [DECAP_V4, DECAP_V6]
    loaded = LoadedLb(LbState.model_validate(data))
    yield loaded
    loaded.close()


INNER_V4 = v4("10.200.2.5", src="192.168.1.1") / TCP(sport=31337, dport=80, flags="A") / payload()
INNER_V6 = v6("fc00:1::4", src="fc00:3::1") / TCP(sport=31337, dport=80, flags="A") / payload()
INNER_OTHER = v4("10.77.0.1", src="192.168.1.1") / UDP(sport=5000, dport=5001) / payload()


def outer(dst, inner, gue_port=None, **ip):
    """`inner` (a client frame) as a remote LB would send it to `dst`: IP-in-IP, or GUE to gue_port."""
    head = Ether(src=CLIENT_MAC, dst=LB_MAC)
    header = IP(src=REMOTE_V4, dst=dst, **ip) if ":" not in dst else IPv6(src=REMOTE_V6, dst=dst)
    if gue_port is not None:
        return head / header / UDP(sport=40000, dport=gue_port) / Raw(bytes(inner.payload))
    header.setfieldval("proto" if ":" not in dst else "nh", 4 if inner.payload.version == 4 else 41)
    return head / header / Raw(bytes(inner.payload))


def decapsulated(inner):
    """The inner client frame behind the outer frame's MACs."""
    return Ether(src=CLIENT_MAC, dst=LB_MAC, type=Ether(bytes(inner)).type) / Raw(bytes(inner.payload))


def hopped(inner):
    """`inner` one router hop on: TTL / hop limit less one, the IPv4 header checksum computed afresh."""
    frame = Ether(bytes(inner))
    if IP in frame:
        frame[IP].ttl -= 1
        del frame[IP].chksum
    else:
        frame[IPv6].hlim -= 1
    return Ether(bytes(frame))


def balanced(inner, real):
    """Decapsulated, then forwarded to the real as a router would: one hop less."""
    return ipip(Ether(bytes(decapsulated(hopped(inner)))), real)


DECAP_CASES = [
    # (description, frame, verdict, expected (None = unchanged), counter or None)
    ("IPIP to the LB, inner to a VIP -> decapsulated and balanced", outer(DECAP_V4, INNER_V4), XDP_TX,
     balanced(INNER_V4, hashed("192.168.1.1", 31337, 80)), "decap_ipip"),
    ("IP6IP6 to the LB, inner to an IPv6 VIP", outer(DECAP_V6, INNER_V6), XDP_TX,
     balanced(INNER_V6, hashed_v6("fc00:3::1", 31337, 80)), "decap_ipip"),
    ("4in6 to the LB", outer(DECAP_V6, INNER_V4), XDP_TX, balanced(INNER_V4, hashed("192.168.1.1", 31337, 80)),
     "decap_ipip"),
    ("GUE to the LB", outer(DECAP_V4, INNER_V4, gue_port=6080), XDP_TX,
     balanced(INNER_V4, hashed("192.168.1.1", 31337, 80)), "decap_gue"),
    ("GUE over IPv6 to the LB, inner IPv6", outer(DECAP_V6, INNER_V6, gue_port=6080), XDP_TX,
     balanced(INNER_V6, hashed_v6("fc00:3::1", 31337, 80)), "decap_gue"),
    ("IPIP to the LB, inner not for a VIP -> decapsulated and passed", outer(DECAP_V4, INNER_OTHER), 2,
     decapsulated(INNER_OTHER), "decap_ipip"),
    ("IPIP to another address -> passed untouched", outer("10.200.9.2", INNER_V4), 2, None, None),
    ("UDP to the LB on another port -> passed untouched", outer(DECAP_V4, INNER_V4, gue_port=6081), 2, None, None),
    ("IPIP fragment to the LB -> passed untouched", outer(DECAP_V4, INNER_V4, flags="MF"), 2, None, None),
]


@pytest.mark.parametrize("description, frame, verdict, expected, counter", DECAP_CASES,
                         ids=[c[0] for c in DECAP_CASES])
def test_inline_decap(decap_lb, description, frame, verdict, expected, counter):
    got, out = decap_lb.run(frame)
    assert got == verdict
    assert out.hex() == bytes(frame if expected is None else expected).hex()
    c = counters(decap_lb)
    assert (c["decap_ipip"], c["decap_gue"]) == (counter == "decap_ipip", counter == "decap_gue")


def inner_v4(**ip):
    return v4("10.200.2.5", src="192.168.1.1", **ip) / TCP(sport=31337, dport=80, flags="A") / payload()


def inner_v6(hlim):
    return v6("fc00:1::4", src="fc00:3::1", hlim=hlim) / TCP(sport=31337, dport=80, flags="A") / payload()


def other_v4(ttl):
    return v4("10.77.0.1", src="192.168.1.1", ttl=ttl) / UDP(sport=5000, dport=5001) / payload()


def ones_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


V4_HASHED = hashed("192.168.1.1", 31337, 80)
TTL_CASES = [
    # (description, frame, verdict, expected output, drop_ttl count)
    ("inner TTL 2 -> forwarded with TTL 1, checksum updated", outer(DECAP_V4, inner_v4(ttl=2)), XDP_TX,
     balanced(inner_v4(ttl=2), V4_HASHED), 0),
    ("checksum update with an end-around carry (TTL 255, id 0xfffe, ToS 0xfc)",
     outer(DECAP_V4, inner_v4(ttl=255, id=0xFFFE, tos=0xFC)), XDP_TX,
     balanced(inner_v4(ttl=255, id=0xFFFE, tos=0xFC), V4_HASHED), 0),
    ("GUE, inner TTL 7 -> 6", outer(DECAP_V4, inner_v4(ttl=7), gue_port=6080), XDP_TX,
     balanced(inner_v4(ttl=7), V4_HASHED), 0),
    ("4in6, inner TTL 64 -> 63", outer(DECAP_V6, inner_v4(ttl=64)), XDP_TX, balanced(inner_v4(ttl=64), V4_HASHED), 0),
    ("inner TTL 1 -> dropped (it would reach 0)", outer(DECAP_V4, inner_v4(ttl=1)), 1,
     decapsulated(inner_v4(ttl=1)), 1),
    ("inner TTL 0 -> dropped", outer(DECAP_V4, inner_v4(ttl=0)), 1, decapsulated(inner_v4(ttl=0)), 1),
    ("inner hop limit 2 -> 1", outer(DECAP_V6, inner_v6(2)), XDP_TX,
     balanced(inner_v6(2), hashed_v6("fc00:3::1", 31337, 80)), 0),
    ("inner hop limit 1 -> dropped", outer(DECAP_V6, inner_v6(1)), 1, decapsulated(inner_v6(1)), 1),
    ("inner TTL 1 not for a VIP -> decapsulated and passed, TTL kept (the stack routes it)",
     outer(DECAP_V4, other_v4(1)), 2, decapsulated(other_v4(1)), 0),
]


@pytest.mark.parametrize("description, frame, verdict, expected, drops", TTL_CASES, ids=[c[0] for c in TTL_CASES])
def test_inline_decap_ttl(decap_lb, description, frame, verdict, expected, drops):
    got, out = decap_lb.run(frame)
    assert (got, out.hex()) == (verdict, bytes(expected).hex())
    c = counters(decap_lb)
    assert c["drop_ttl"] == drops
    if verdict == XDP_TX and out[12:14] == b"\x08\x00" and out[23] == 4:  # inner IPv4 checks as a receiver checks it
        assert ones_sum(out[34:54]) == 0xFFFF
    if drops:  # dropped before the connection table could take the flow
        assert table(decap_lb) == {}


def hop(ip: bytes) -> bytes:
    """An IP packet one hop on, for the fuzz (TTL / hop limit less one; IPv4: RFC 1624 update of the
    checksum as it was, right or wrong). Too short or TTL 0: not a packet the LB forwards."""
    if len(ip) < 40 or ip[7 if ip[0] >> 4 == 6 else 8] == 0:
        return b""
    if ip[0] >> 4 == 6:
        return ip[:7] + bytes([ip[7] - 1]) + ip[8:]
    old, new = ip[8] << 8 | ip[9], (ip[8] - 1) << 8 | ip[9]
    check = ones_sum(struct.pack("!3H", ~struct.unpack_from("!H", ip, 10)[0] & 0xFFFF, ~old & 0xFFFF, new))
    check = ~check & 0xFFFF or 0xFFFF
    return ip[:8] + bytes([ip[8] - 1]) + ip[9:10] + struct.pack("!H", check) + ip[12:]


def test_inline_decap_is_off_without_addresses(lb):
    frame = outer(DECAP_V4, INNER_V4)
    lb.dataplane.apply(routing_state())
    assert lb.run(frame) == (2, bytes(frame))


def test_decap_addresses_follow_the_state(decap_lb):
    assert {k.address() for k in decap_lb.dataplane.decap_addrs.keys()} == {
        ipaddress.ip_address(DECAP_V4), ipaddress.ip_address(DECAP_V6)}
    data = decap_lb.state.model_dump(mode="json")
    data["settings"]["decap_addresses"] = [DECAP_V6]
    decap_lb.dataplane.apply(LbState.model_validate(data))
    assert [k.address() for k in decap_lb.dataplane.decap_addrs.keys()] == [ipaddress.ip_address(DECAP_V6)]
    frame = outer(DECAP_V4, INNER_V4)
    assert decap_lb.run(frame) == (2, bytes(frame))


# --- fuzz: every feature on, random and mutated frames -------------------------------------------

def test_fuzz_with_every_feature_on():
    data = routing_state().model_dump(mode="json")
    data["settings"].update(tcp_server_id_routing=True, decap_addresses=[DECAP_V4, DECAP_V6])
    state = LbState.model_validate(data)
    loaded = LoadedLb(state)
    reals = {ipaddress.ip_address(a).packed for a in REALS + V6_REALS + list(SERVER_IDS.values())
             + list(SOURCE_ROUTES.values())}
    ours = {vip.address.packed for vip in state.vips} | {ipaddress.ip_address(a).packed
                                                          for a in (DECAP_V4, DECAP_V6)}
    bases = [bytes(udp("10.200.2.2", 1, c[1])) for c in STABLE_CASES]
    bases += [bytes(udp("10.200.2.6", 2, c[1], dport=443)) for c in QUIC_CASES]
    bases += [bytes(tcp_opts(c[2], c[1])) for c in TPR_CASES] + [bytes(tcp(c[1], c[2])) for c in SRC_CASES]
    bases += [bytes(c[1]) for c in DECAP_CASES]
    rng = random.Random(20261207)
    seen = {1: 0, 2: 0, 3: 0}
    try:
        for i in range(20_000):
            frame = random_frame(rng) if i % 4 == 0 else mutate(rng, rng.choice(bases))
            verdict, out = loaded.run(frame)
            assert verdict in seen, frame.hex()
            seen[verdict] += 1
            if verdict == 2 and out == frame:
                continue
            assert destination(frame) in ours, f"{frame.hex()}: {verdict} for an address not ours"
            if verdict == 1 and out == frame:
                continue
            stripped = len(frame) - len(out)
            if verdict != 3:  # decapsulated, then passed or dropped: MACs kept, one outer header gone
                assert stripped in (20, 40, 28, 48) and out[:12] == frame[:12] and out[14:] == frame[14 + stripped:]
                continue
            if len(out) == len(frame) and out[:6] == frame[6:12]:
                continue  # an ICMP echo answered
            ethertype = struct.unpack_from("!H", out, 12)[0]
            real, inner = (out[30:34], out[34:]) if ethertype == 0x0800 else (out[38:54], out[54:])
            assert real in reals, frame.hex()
            # forwarded after a decapsulation: one hop less (TTL / hop limit, IPv4 checksum)
            assert inner == frame[14:] or any(inner == hop(frame[14 + n:]) for n in (20, 40, 28, 48)), frame.hex()
        assert all(count > 100 for count in seen.values()), seen
        c = counters(loaded)
        assert (c["rx"], c["drop"], c["pass"], c["tx"]) == (20_000, seen[1], seen[2], seen[3])
    finally:
        loaded.close()
