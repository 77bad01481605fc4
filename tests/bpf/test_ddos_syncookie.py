"""Syncookie rules in the kernel (BPF_PROG_TEST_RUN): a SYN becomes, in place, the exact cookie
SYN-ACK netfilter's SYNPROXY expects (every field but the cookie and the clock compared byte for
byte, checksums by scapy); the cookie is checked by the kernel's own helper through the client's
ACK (valid passes, anything else drops); flows conntrack knows pass; counters are exact."""

import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from bpfnet.ddos.config import DdosState, Rule
from bpfnet.ddos.dataplane import CAPTURE_DROP, DdosDataplane
from bpfnet.ddos.samples import SampleReader
from bpfnet.ddos.synproxy import Advertised
from bpfnet.netns import Topology, cleanup, inside

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
CLIENT_MAC, SERVER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
V4 = ("198.51.100.7", "192.0.2.1")
V6 = ("2001:db8::7", "2001:db8::1")
FULL_OPTIONS = [("MSS", 1400), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 9)]
RULE = 5
LOOPBACK = 1  # the ifindex a test run's packet arrives on (the namespace's loopback device)


@pytest.fixture
def dp():
    with DdosDataplane.load() as plane:
        plane.deploy(DdosState(rules=[Rule(id=RULE, expr="tcp dst port 80", action="syncookie")]).rules)
        yield plane


def ip_layer(family: int, src: str | None = None, dst: str | None = None, reply: bool = False, **fields):
    client, server = V4 if family == 4 else V6
    src, dst = src or client, dst or server
    if reply:
        src, dst = dst, src
    if family == 4:
        return IP(src=src, dst=dst, **fields)
    return IPv6(src=src, dst=dst, **fields)


def syn(family: int, options=(), flags: str = "S", vlan: int | None = None) -> Ether:
    eth = Ether(src=CLIENT_MAC, dst=SERVER_MAC)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    return eth / ip_layer(family) / TCP(sport=40000, dport=80, flags=flags, seq=1000, window=64240,
                                        options=list(options))


def ack(family: int, cookie: int, flags: str = "A") -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / ip_layer(family)
                 / TCP(sport=40000, dport=80, flags=flags, seq=1001, ack=(cookie + 1) & 0xFFFFFFFF, window=502))


def monotonic_ms() -> int:
    return (time.monotonic_ns() // 1_000_000) & 0xFFFFFFFF


def answer(dp: DdosDataplane, frame: bytes) -> tuple[Ether, int, int]:
    """The SYN-ACK the stage sends for `frame` (XDP_TX), and the clock around the run."""
    before = monotonic_ms()
    result = dp.entry.test_run(frame)
    after = monotonic_ms()
    assert result.retval == XDP_TX
    return Ether(result.data), before, after


def expected_synack(family: int, cookie: int, options: list, vlan: int | None = None, ecn: bool = False) -> bytes:
    """The frame byte for byte; scapy fills the lengths and checksums."""
    eth = Ether(src=SERVER_MAC, dst=CLIENT_MAC)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    ip = (ip_layer(4, reply=True, ttl=64, id=0, flags="DF", tos=0) if family == 4
          else ip_layer(6, reply=True, hlim=64, tc=0, fl=0))
    return bytes(eth / ip / TCP(sport=80, dport=40000, seq=cookie, ack=1001, flags="SAE" if ecn else "SA",
                                window=0, options=options))


@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_with_options_becomes_the_exact_cookie_synack(dp, family):
    out, before, after = answer(dp, bytes(syn(family, FULL_OPTIONS)))
    cookie = out[TCP].seq
    tsval = dict(out[TCP].options)["Timestamp"][0]
    # the timestamp: the clock in ms, its low 6 bits the client's window scale (9) and SACK (bit 4)
    assert tsval & 0x3F == 9 | 1 << 4
    assert before & ~0x3F <= tsval & ~0x3F <= after
    mss = 1460 if family == 4 else 1440
    options = [("MSS", mss), ("SAckOK", b""), ("Timestamp", (tsval, 123456)), ("NOP", None), ("WScale", 7)]
    assert bytes(out) == expected_synack(family, cookie, options)
    # the kernel's helper accepts the client's ACK of that cookie and refuses others (the low bits
    # hold the index of the MSS, so an ACK a few higher can still be valid: +16 is not)
    assert dp.entry.test_run(ack(family, cookie)).retval == XDP_PASS
    assert dp.entry.test_run(ack(family, cookie + 16)).retval == XDP_DROP
    assert dp.entry.test_run(ack(family, cookie ^ 0x01000000)).retval == XDP_DROP


@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_without_options_gets_the_mss_only(dp, family):
    out, _, _ = answer(dp, bytes(syn(family)))
    cookie = out[TCP].seq
    assert bytes(out) == expected_synack(family, cookie, [("MSS", 1460 if family == 4 else 1440)])
    assert dp.entry.test_run(ack(family, cookie)).retval == XDP_PASS


@pytest.mark.parametrize("family", [4, 6])
def test_the_synack_advertises_what_its_interface_was_measured_to_allow(dp, family):
    """A test run's packet arrives on the loopback device (ifindex 1): its entry in ddos_synack
    sets the MSS and window scale; an entry for another interface does not, and without one the
    defaults hold."""
    said = Advertised(mss4=1360, mss6=1340, wscale=10)
    dp.set_synack({LOOPBACK: said})
    out, _, _ = answer(dp, bytes(syn(family, FULL_OPTIONS)))
    tsval = dict(out[TCP].options)["Timestamp"][0]
    options = [("MSS", said.mss4 if family == 4 else said.mss6), ("SAckOK", b""), ("Timestamp", (tsval, 123456)),
               ("NOP", None), ("WScale", 10)]
    assert bytes(out) == expected_synack(family, out[TCP].seq, options)
    assert dp.entry.test_run(ack(family, out[TCP].seq)).retval == XDP_PASS
    dp.set_synack({LOOPBACK + 1: said})
    assert [key.value for key in dp.synack.keys()] == [LOOPBACK + 1]
    out, _, _ = answer(dp, bytes(syn(family, FULL_OPTIONS)))
    assert dict(out[TCP].options)["MSS"] == (1460 if family == 4 else 1440)
    assert dict(out[TCP].options)["WScale"] == 7


def test_without_timestamps_window_scale_sack_and_ecn_cannot_be_kept(dp):
    # nothing would carry them to SYNPROXY: the answer is MSS only, no ECE
    out, _, _ = answer(dp, bytes(syn(4, [("MSS", 1400), ("SAckOK", b""), ("WScale", 5)], flags="SEC")))
    assert bytes(out) == expected_synack(4, out[TCP].seq, [("MSS", 1460)])


def test_ecn_is_answered_and_carried_in_the_timestamp(dp):
    out, _, _ = answer(dp, bytes(syn(4, [("Timestamp", (7, 0))], flags="SEC")))
    tsval = dict(out[TCP].options)["Timestamp"][0]
    assert tsval & 0x3F == 0xF | 1 << 5  # no window scale, no SACK, ECN
    options = [("MSS", 1460), ("NOP", None), ("NOP", None), ("Timestamp", (tsval, 7))]
    assert bytes(out) == expected_synack(4, out[TCP].seq, options, ecn=True)


def test_vlan_tags_stay_and_padding_is_cut(dp):
    dp.deploy(DdosState(rules=[Rule(id=RULE, expr="vlan and tcp dst port 80", action="syncookie")]).rules)
    frame = bytes(syn(6, [("Timestamp", (1, 0)), ("SAckOK", b"")], vlan=42)) + bytes(20)  # trailing padding
    out, _, _ = answer(dp, frame)
    tsval = dict(out[TCP].options)["Timestamp"][0]
    options = [("MSS", 1440), ("SAckOK", b""), ("Timestamp", (tsval, 1))]
    assert bytes(out) == expected_synack(6, out[TCP].seq, options, vlan=42)


def test_what_cannot_be_a_handshake_is_dropped_and_other_traffic_untouched(dp):
    cases = [
        (bytes(syn(4, flags="SF")), XDP_DROP),           # SYN+FIN
        (bytes(syn(4, flags="SR")), XDP_DROP),           # SYN+RST
        (ack(4, 0, flags="R"), XDP_DROP),                # RST of no known flow
        (ack(4, 0, flags="FA"), XDP_DROP),               # FIN of no known flow, bad cookie
        (bytes(Ether(src=CLIENT_MAC, dst=SERVER_MAC) / IP(src=V4[0], dst=V4[1], options=b"\x01\x01\x01\x00")
               / TCP(dport=80, flags="S")), XDP_DROP),  # IP options: not answered
        (bytes(syn(4, flags="S")).replace(b"\x00\x50", b"\x00\x51", 1), XDP_PASS),  # port 81: no rule
    ]
    for frame, verdict in cases:
        assert dp.entry.test_run(frame).retval == verdict, Ether(frame).summary()


def test_counters_are_exact(dp):
    frames = {4: bytes(syn(4, FULL_OPTIONS)), 6: bytes(syn(6))}
    cookies = {family: answer(dp, frame)[0][TCP].seq for family, frame in frames.items()}
    for family, cookie in cookies.items():
        assert dp.entry.test_run(ack(family, cookie)).retval == XDP_PASS
        assert dp.entry.test_run(ack(family, cookie + 5)).retval == XDP_DROP
    totals = dp.total_counts()
    sent = sum(len(frame) for frame in frames.values())  # bytes as received
    acks = len(ack(4, 0)) + len(ack(6, 0))
    assert totals["syncookie_sent"] == {"packets": 2, "bytes": sent}
    assert totals["syncookie_valid"] == {"packets": 2, "bytes": acks}
    assert totals["syncookie_invalid"] == {"packets": 2, "bytes": acks}
    assert totals["syncookie_tracked"]["packets"] == totals["syncookie_not_tcp"]["packets"] == 0
    # in the outcome totals an answered SYN or a dropped packet is a drop, a passed one a pass
    assert totals["drop_rule"] == {"packets": 4, "bytes": sent + acks}
    assert totals["pass_rule"] == {"packets": 2, "bytes": acks}
    assert dp.counters(RULE).packets == 6


def test_packets_of_a_flow_conntrack_knows_pass():
    """A real connection over loopback in a fresh namespace with conntrack on: its ACKs (no
    cookie) pass as tracked, the same ACK from another port drops."""
    prefix = "sck"
    cleanup(prefix)
    with Topology(prefix) as topo:
        ns = topo.netns("ct")
        topo.run(ns, ["ip", "link", "set", "lo", "up"])
        topo.run(ns, ["nft", "-f", "-"], input="table inet sckct { chain input_ct { type filter hook input priority 0; "
                                               "ct state established accept; }; }\n")
        with inside(ns):
            server = socket.create_server(("127.0.0.1", 80))
            client = socket.create_connection(("127.0.0.1", 80))
            port = client.getsockname()[1]
            conn, _ = server.accept()
            try:
                with DdosDataplane.load() as dp:
                    dp.deploy(DdosState(rules=[Rule(id=RULE, expr="tcp dst port 80", action="syncookie")]).rules)
                    known = Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=port, dport=80, flags="A",
                                                                                  seq=1, ack=1)
                    unknown = Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=port + 1, dport=80,
                                                                                    flags="A", seq=1, ack=1)
                    assert dp.entry.test_run(bytes(known)).retval == XDP_PASS
                    assert dp.entry.test_run(bytes(unknown)).retval == XDP_DROP
                    totals = dp.total_counts()
                    assert totals["syncookie_tracked"]["packets"] == 1
                    assert totals["syncookie_invalid"]["packets"] == 1
            finally:
                for sock in (conn, client, server):
                    sock.close()


def test_samples_and_captures_hold_the_syn_not_the_answer(dp):
    frame = bytes(syn(4, FULL_OPTIONS))
    dp.set_config(sample_every=1, capture=CAPTURE_DROP)  # an answered SYN is stopped: a drop capture
    with SampleReader(dp.samples) as samples, SampleReader(dp.captures) as captures:
        answer(dp, frame)
        sampled, captured = samples.read(timeout_ms=1000), captures.read(timeout_ms=1000)
    assert [(s.rule, s.action, s.verdict, s.frame) for s in sampled] == [(RULE, "syncookie", "syncookie", frame)]
    assert [(c.rule, c.verdict, c.frame) for c in captured] == [(RULE, "syncookie", frame)]
    assert sampled[0].fields.tcp_flags == 0x02


def test_the_synproxy_table_is_ours_alone_and_a_later_agent_removes_it():
    """In a fresh namespace: the table and nf_conntrack_tcp_loose=0 go in, another table stays
    untouched, and an agent that did not install it (a restart) removes it and restores the sysctl."""
    from bpfnet.ddos.synproxy import TABLE, Synproxy

    prefix = "scs"
    cleanup(prefix)
    with Topology(prefix) as topo:
        ns = topo.netns("sp")
        topo.run(ns, ["nft", "add", "table", "inet", "operators"])
        loose = "net.netfilter.nf_conntrack_tcp_loose"
        assert topo.get_sysctl(loose, ns=ns) == "1"
        with inside(ns):
            Synproxy().sync(["lo"], ["tcp dst port 80", "tcp dst port 443"])
        listed = topo.run(ns, ["nft", "list", "table", "inet", TABLE]).stdout
        assert 'iifname "lo" tcp dport { 80, 443 } ct state invalid drop' in listed
        assert topo.get_sysctl(loose, ns=ns) == "0"
        with inside(ns):
            Synproxy().remove()  # a new agent: it knows the old value from the table's comment
        assert topo.run(ns, ["nft", "list", "tables"]).stdout.split() == ["table", "inet", "operators"]
        assert topo.get_sysctl(loose, ns=ns) == "1"
        # the last rule gone, the table drains (SYNs tracked again, SYNPROXY kept), then goes
        proxy = Synproxy(drain_s=30)
        with inside(ns):
            assert proxy.status() == {"state": "off"}
            proxy.sync(["lo"], ["tcp dst port 80", "tcp dst port 443"])
            [said] = proxy.status()["interfaces"]
            # what `ddos stats` shows; no server listens on the protected ports: both named
            assert proxy.status() == {"state": "on", "ports": [80, 443], "interfaces": [said], "adopted": 0,
                                      "ports_without_server": [80, 443]}
            # lo's MTU is 65536 (IPv4: its largest packet's)
            assert said == {"interface": "lo", "mss4": 65495, "mss6": 65476, "wscale": said["wscale"]}
            with socket.create_server(("::", 443), family=socket.AF_INET6, dualstack_ipv6=True):
                assert proxy.status()["ports_without_server"] == [80]
            proxy.sync(["lo"], [], now=100.0)
            assert proxy.status(now=110.0) == {"state": "draining", "seconds_left": 20}
            listed = topo.run(ns, ["nft", "list", "table", "inet", TABLE]).stdout
            assert "notrack" not in listed and "synproxy" in listed and "(draining)" in listed
            proxy.expire(129.0)
            assert "synproxy" in topo.run(ns, ["nft", "list", "tables"]).stdout
            proxy.expire(130.0)
        assert topo.run(ns, ["nft", "list", "tables"]).stdout.split() == ["table", "inet", "operators"]
        assert topo.get_sysctl(loose, ns=ns) == "1"


def test_the_connections_open_to_protected_ports_are_entered_into_conntrack():
    """sock_diag finds the open connections of the protected ports (an IPv4 client of a
    dual-stack socket as IPv4, as its packets are), and each goes into conntrack once."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

    from bpfnet.ddos.synproxy import Connection, adopt, open_connections

    prefix = "sca"
    cleanup(prefix)
    with Topology(prefix) as topo:
        ns = topo.netns("sp")
        topo.run(ns, ["ip", "link", "set", "lo", "up"])
        with inside(ns):
            dual = socket.create_server(("::", 80), family=socket.AF_INET6, dualstack_ipv6=True)
            other = socket.create_server(("127.0.0.1", 81))
            clients = [socket.create_connection(address) for address in (("127.0.0.1", 80), ("::1", 80),
                                                                         ("127.0.0.1", 81))]
            accepted = [server.accept()[0] for server in (dual, dual, other)]
            try:
                found = sorted(open_connections(frozenset({80})), key=lambda c: c.family)
                ports = [client.getsockname()[1] for client in clients]
                assert found == [Connection(socket.AF_INET, "127.0.0.1", ports[0], "127.0.0.1", 80),
                                 Connection(socket.AF_INET6, "::1", ports[1], "::1", 80)]
                assert len(open_connections(None)) == 3 * 2  # each connection's two ends
                assert adopt(found) == 2
                assert adopt(found) == 0  # known by now
                tracked = set()
                for family in (socket.AF_INET, socket.AF_INET6):
                    with NFCTSocket(nfgen_family=family) as ct:
                        for entry in ct.dump():
                            proto = entry.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO")
                            tracked.add((family, proto.get_attr("CTA_PROTO_SRC_PORT"),
                                         proto.get_attr("CTA_PROTO_DST_PORT")))
                assert tracked == {(socket.AF_INET, ports[0], 80), (socket.AF_INET6, ports[1], 80)}
            finally:
                for sock in [*clients, *accepted, dual, other]:
                    sock.close()


def test_syncookie_rules_in_a_value_run_and_after_other_rules(dp):
    """Consecutive `tcp dst port N` rules are one table lookup (a value run): its match word
    carries the action to the verdict program as a rule's own code does."""
    dp.deploy(DdosState(rules=[Rule(id=1, expr="udp", action="drop"),
                               Rule(id=2, expr="tcp dst port 80", action="syncookie"),
                               Rule(id=3, expr="tcp dst port 443", action="syncookie"),
                               Rule(id=4, expr="tcp dst port 22", action="pass")]).rules)
    assert dp.active().chunks == 1
    words = {struct.unpack("<I", v)[0] for _, v in dp.values.items_batch()} - {0}
    assert words == {2 | 4 << 16, 3 | 4 << 16, 4 | 2 << 16}  # (rule, action syncookie / pass) by port
    frame = bytes(syn(4)).replace(b"\x00\x50", b"\x01\xbb", 1)  # port 443
    out, _, _ = answer(dp, frame)
    assert out[TCP].sport == 443 and out[TCP].flags == "SA"
    assert dp.entry.test_run(bytes(syn(4)).replace(b"\x00\x50", b"\x00\x16", 1)).retval == XDP_PASS  # 22
    assert [dp.counters(i).packets for i in (1, 2, 3, 4)] == [0, 0, 1, 1]
