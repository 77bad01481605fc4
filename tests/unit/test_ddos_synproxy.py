"""The nftables side of syncookie rules: which destination ports a rule protects (proved by
libpcap), and the table bpfnet installs for them."""

import pytest

from bpfnet.ddos.config import Rule, tcp_only
from bpfnet.ddos.synproxy import (
    TABLE,
    Advertised,
    Synproxy,
    SynproxyError,
    advertised,
    conjuncts,
    interface_mtu,
    protected_ports,
    rule_ports,
    ruleset,
)


@pytest.mark.parametrize("expr, ports", [
    ("tcp dst port 80", {80}),
    ("tcp and (dst port 80 or dst port 443)", {80, 443}),
    ("tcp dst port 8080 and src net 10.0.0.0/8", {8080}),
    ("tcp[tcpflags] & tcp-syn != 0 and dst port 80", {80}),
    ("ip6 and tcp dst port 22", {22}),
    ("tcp dst port 80 or 443", {80, 443}),
    # libpcap proves no port set for the whole; its conjunct (dst port 80 or 443) it does
    ("dst host 10.0.0.1 and tcp and (tcp dst port 80 or tcp dst port 443) "
     "and tcp[tcpflags] & (tcp-syn|tcp-ack) = (tcp-syn)", {80, 443}),
    ("tcp and port 80", None),            # a source port 80 matches any destination port
    ("tcp dst portrange 80-90", None),    # no equality to find the ports by
    ("tcp", None),
])
def test_the_ports_a_rule_protects_are_proved_or_any(expr, ports):
    assert tcp_only(expr)
    assert rule_ports(expr) == (None if ports is None else frozenset(ports))


@pytest.mark.parametrize("expr, terms", [
    ("a and (b or c) and d", ["a", "(b or c)", "d"]),
    ("tcp && tcp[13]&2!=0 && (port 80)", ["tcp", "tcp[13]&2!=0", "(port 80)"]),
    ("tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn and dst port 80", ["tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn",
                                                                     "dst port 80"]),
    ("a and b or c", ["a and b or c"]),        # one precedence, left to right: (a and b) or c
    ("a || b and c", ["a || b and c"]),
    ("host android and portland", ["host android", "portland"]),  # words, not parts of words
])
def test_conjuncts_split_a_conjunction_only(expr, terms):
    assert conjuncts(expr) == terms


def test_protected_ports_are_the_union_or_any_when_one_rule_can_match_any_port():
    assert protected_ports(["tcp dst port 80", "tcp dst port 443"]) == {80, 443}
    assert protected_ports(["tcp dst port 80", "tcp"]) is None


def test_tcp_only_is_a_proof_not_a_guess():
    assert tcp_only("tcp dst port 80") and tcp_only("ip6 and tcp")
    assert not tcp_only("dst port 80") and not tcp_only("ip") and not tcp_only("tcp or udp")
    assert Rule(expr="tcp dst port 80", action="syncookie").action == "syncookie"


def test_the_table_replaces_itself_atomically_and_scopes_to_interfaces_and_ports():
    text = ruleset({"eth0": Advertised(), "eth1": Advertised()}, frozenset({443, 80}), "1")
    lines = [line.strip() for line in text.splitlines()]
    # create-then-delete-then-create in one nft -f transaction: no window without the table
    assert lines[:3] == [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    assert 'comment "bpfnet ddos syncookie rules; nf_conntrack_tcp_loose was 1"' in lines
    match = 'iifname { "eth0", "eth1" } tcp dport { 80, 443 } '
    assert f"{match}tcp flags & (fin | syn | rst | ack) == syn notrack" in lines
    assert (f"meta nfproto ipv4 {match}ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm"
            in lines)
    assert (f"meta nfproto ipv6 {match}ct state invalid,untracked synproxy mss 1440 wscale 7 timestamp sack-perm"
            in lines)
    assert f"{match}ct state invalid drop" in lines
    assert 'iifname { "eth0" } meta l4proto tcp ct state invalid drop' in ruleset({"eth0": Advertised()}, None, "0")


def test_a_draining_table_tracks_syns_again_and_keeps_synproxy_for_its_connections():
    text = ruleset({"eth0": Advertised()}, frozenset({80}), "1", draining=True)
    assert "notrack" not in text and "prerouting" not in text
    assert 'comment "bpfnet ddos syncookie rules (draining); nf_conntrack_tcp_loose was 1"' in text
    assert 'iifname { "eth0" } tcp dport { 80 } ct state invalid,untracked synproxy mss 1460' in text


def test_the_mss_follows_the_mtu_and_the_scale_the_servers_receive_space():
    # Linux 6.18's defaults: tcp_rmem max 32 MiB (ilog2 25) over rmem_max 4 MiB: scale 10
    assert advertised(1500, 32 << 20) == Advertised(mss4=1460, mss6=1440, wscale=10)
    assert advertised(1500, 6 << 20) == Advertised(1460, 1440, 7)  # older kernels' 6 MiB
    assert advertised(1450, (32 << 20) - 1) == Advertised(1410, 1390, 9)  # a VXLAN MTU; just under 2^25
    assert advertised(9000, 1 << 40) == Advertised(8960, 8940, 14)  # jumbo frames; the scale's cap
    assert advertised(576, 65535) == Advertised(536, 1220, 0)  # IPv6 never under its minimum MTU's
    assert advertised(65535, 1 << 16) == Advertised(65495, 65475, 1)
    assert advertised(65536, 1 << 16) == Advertised(65495, 65476, 1)  # lo: as the kernel advertises there


def test_interfaces_that_advertise_alike_share_a_synproxy_rule():
    small, jumbo = Advertised(1360, 1340, 10), Advertised(8960, 8940, 10)
    lines = [line.strip() for line in ruleset({"eth0": small, "eth1": jumbo, "eth2": small}, frozenset({80}),
                                              "1").splitlines()]
    proxied = [line for line in lines if "synproxy mss" in line]
    assert proxied == [
        'meta nfproto ipv4 iifname { "eth0", "eth2" } tcp dport { 80 } ct state invalid,untracked '
        "synproxy mss 1360 wscale 10 timestamp sack-perm",
        'meta nfproto ipv6 iifname { "eth0", "eth2" } tcp dport { 80 } ct state invalid,untracked '
        "synproxy mss 1340 wscale 10 timestamp sack-perm",
        'meta nfproto ipv4 iifname { "eth1" } tcp dport { 80 } ct state invalid,untracked '
        "synproxy mss 8960 wscale 10 timestamp sack-perm",
        'meta nfproto ipv6 iifname { "eth1" } tcp dport { 80 } ct state invalid,untracked '
        "synproxy mss 8940 wscale 10 timestamp sack-perm"]
    # notrack and the drop of what SYNPROXY called invalid cover every interface
    assert 'iifname { "eth0", "eth1", "eth2" } tcp dport { 80 } ct state invalid drop' in lines


def test_the_measure_reads_the_namespaces_buffers_and_names_a_bad_value(tmp_path):
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/core").mkdir(parents=True)
    (tmp_path / "net/ipv4/tcp_rmem").write_text("4096\t131072\t1048576\n")
    (tmp_path / "net/core/rmem_max").write_text("8388608\n")
    proxy = Synproxy(proc=str(tmp_path))
    assert proxy.measure(["lo"]) == {"lo": advertised(interface_mtu("lo"), 8 << 20)}
    assert proxy.measure(["lo"])["lo"].wscale == 8  # rmem_max is the larger here
    (tmp_path / "net/ipv4/tcp_rmem").write_text("4096 131072\n")
    with pytest.raises(SynproxyError, match="net/ipv4/tcp_rmem or net/core/rmem_max"):
        proxy.measure(["lo"])
    (tmp_path / "net/ipv4/tcp_rmem").unlink()
    with pytest.raises(SynproxyError, match="reading net.ipv4.tcp_rmem"):
        proxy.measure(["lo"])
    (tmp_path / "net/ipv4/tcp_rmem").write_text("4096\t131072\t1048576\n")
    with pytest.raises(SynproxyError, match="no interface 'nosuch0'"):
        proxy.measure(["nosuch0"])


def _proc(tmp_path, loose: str = "1"):
    for key, value in (("net/netfilter/nf_conntrack_tcp_loose", loose), ("net/ipv4/tcp_rmem", "4096 131072 6291456"),
                       ("net/core/rmem_max", "212992")):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text(value + "\n")
    return tmp_path / "net/netfilter/nf_conntrack_tcp_loose"


def test_loose_tracking_is_off_before_the_table_comes_and_back_if_nft_refuses(tmp_path, monkeypatch):
    """Were loose tracking on for a moment after the table, a cookie ACK would be picked up as a new
    flow and miss SYNPROXY. If nft refuses the table, the sysctl is as it was."""
    loose = _proc(tmp_path)
    proxy = Synproxy(proc=str(tmp_path))
    seen = []
    monkeypatch.setattr(Synproxy, "_adopt", staticmethod(lambda ports: 0))  # (no conntrack here)
    monkeypatch.setattr(proxy, "_table_comment", lambda: None)

    def refuse(args, stdin=None):
        seen.append(loose.read_text().strip())
        raise SynproxyError("nft -f -: Error: Could not process rule")

    monkeypatch.setattr(proxy, "_nft", refuse)
    with pytest.raises(SynproxyError, match="Could not process rule"):
        proxy.sync(["lo"], ["tcp dst port 80"])
    assert seen == ["0"] and loose.read_text().strip() == "1" and proxy.installed is None

    monkeypatch.setattr(proxy, "_nft", lambda args, stdin=None: seen.append(loose.read_text().strip()))
    proxy.sync(["lo"], ["tcp dst port 80"])
    assert seen == ["0", "0"] and loose.read_text().strip() == "0"
    assert proxy.status()["ports"] == [80] and proxy.installed is not None
