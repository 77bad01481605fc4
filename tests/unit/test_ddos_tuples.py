"""Tuple runs (grouping.rule_conjunctions, ruleset.TupleRun): which rules are unions of
conjunctions, their shapes, the first-match entries of a run, and when a stretch becomes one."""

from ipaddress import IPv4Network, IPv6Network

import pytest

from bpfnet.ddos.grouping import rule_conjunctions
from bpfnet.ddos.pcap import compile_filter
from bpfnet.ddos.ruleset import Action, CompiledRule, PrefixRun, TupleRun, ValueRun, straight_items, tuple_key


def rule(number: int, expr: str, action: Action = Action.DROP) -> CompiledRule:
    return CompiledRule(number, action, tuple(compile_filter(expr)))


def v4(network: str) -> tuple[int, int]:
    net = IPv4Network(network)
    return int(net.network_address) << 96, net.prefixlen


def test_a_network_with_a_port_is_one_shape_per_protocol_value():
    found = rule_conjunctions(tuple(compile_filter("src net 10.0.0.0/8 and dst port 53")))
    assert found is not None and len(found) == 3  # TCP, UDP, SCTP
    assert len({c.shape for c in found}) == 1
    assert {(c.prefix, c.length) for c in found} == {v4("10.0.0.0/8")}
    assert {c.shape.address for c in found} == {26} and {c.shape.words for c in found} == {1}


def test_an_ipv6_network_reads_the_words_its_prefix_covers():
    found = rule_conjunctions(tuple(compile_filter("ip6 src net 2001:db8:1::/48 and tcp dst port 443")))
    assert found is not None and len(found) == 1
    (c,) = found
    net = IPv6Network("2001:db8:1::/48")
    assert (c.shape.address, c.shape.words, c.prefix, c.length) == (22, 2, int(net.network_address), 48)


def test_a_destination_network_is_the_address_when_no_source_is_tested():
    (c,) = rule_conjunctions(tuple(compile_filter("dst net 192.0.2.0/24 and tcp"))) or ()
    assert c.shape.address == 30 and (c.prefix, c.length) == v4("192.0.2.0/24")


@pytest.mark.parametrize("expr", ["not src net 10.0.0.0/8", "port 53", "udp dst portrange 1-5",
                                  "tcp[tcpflags] & tcp-syn != 0", "len > 100", "src net 10.0.0.0/8 or ip[8] < 5"])
def test_rules_that_are_not_equalities_have_none(expr):
    assert rule_conjunctions(tuple(compile_filter(expr))) is None


def test_an_entry_holds_the_first_rule_among_its_supernets():
    run = TupleRun(0, (rule(1, "src net 10.0.0.0/8 and udp"), rule(2, "src net 10.1.0.0/16 and udp"),
                       rule(3, "src net 10.2.0.0/16 and udp", Action.PASS)))
    words = {length: value for (_, _, _, length), value in run.entries.items()}
    assert set(words) == {8, 16} and len(run.shapes) == 1
    assert all(value >> 32 == 0 and value & 0xFFFF == 1 for value in run.entries.values())  # /8 comes first
    later = TupleRun(1, (rule(2, "src net 10.1.0.0/16 and udp"), rule(1, "src net 10.0.0.0/8 and udp")))
    assert sorted((v >> 32, v & 0xFFFF) for v in later.entries.values()) == [(0, 2), (1, 1)]


def test_a_key_packs_the_fields_widest_first_and_the_address_after():
    run = TupleRun(0, (rule(1, "src net 10.0.0.0/8 and udp"), rule(2, "src net 10.1.0.0/16 and udp")))
    shape = run.shapes[0][0]
    (values, prefix, length), *_ = [(v, p, n) for (_, v, p, n) in run.entries]
    key = tuple_key(run.run_id(1, 0), shape, values, prefix, length)
    assert len(key) == 48
    # prefix length: run 32 + ethertype and protocol padded to 4 bytes, then the network's bits
    assert int.from_bytes(key[:4], "little") == 32 + 32 + length
    assert int.from_bytes(key[4:8], "little") == 1 << 31  # bank 1, run 0, shape 0
    assert key[8:12] == b"\x08\x00\x11\x00" and key[12] == 10


def test_a_mixed_stretch_is_a_tuple_run_and_single_shapes_keep_their_cheaper_runs():
    mixed = [rule(i + 1, [f"src net 10.{i}.0.0/16 and udp", f"src net 10.{i}.1.0/24 and tcp dst port 80",
                          f"ip6 src net 2001:db8:{i}::/48"][i % 3]) for i in range(90)]
    items = straight_items(mixed)
    assert len(items) == 1 and isinstance(items[0], TupleRun) and len(items[0].shapes) == 3
    ports = [rule(i + 1, f"udp dst port {1000 + i}") for i in range(90)]
    assert [type(item) for item in straight_items(ports)] == [ValueRun]
    nets = [rule(i + 1, f"src net 10.{i}.0.0/16") for i in range(90)]
    assert [type(item) for item in straight_items(nets)] == [PrefixRun]
    few = mixed[:3]  # three rules cost less as code than three lookups
    assert all(isinstance(item, CompiledRule) for item in straight_items(few))


def test_a_shape_of_one_prefix_length_is_hashed_and_a_few_shorter_prefixes_expand_to_it():
    run = TupleRun(0, (rule(1, "src net 10.0.1.0/24 and udp dst port 53"),
                       rule(2, "src net 10.0.2.0/23 and udp dst port 53", Action.PASS),
                       rule(3, "src net 10.0.3.0/24 and udp dst port 80")))
    assert len(run.shapes) == 1 and set(run.hashed) == {0}
    length, expanded = run.hashed[0]
    assert length == 24
    blocks = {(values, address >> 96): value for (values, address), value in expanded.items()}
    net = int(IPv4Network("10.0.0.0/24").network_address)
    # 10.0.2.0/23 is two /24s: 10.0.2.0 its own (rule 2), 10.0.3.0 also rule 2's for port 53 only
    ports = {values: [v for v in values if v in (53, 80)][0] for values, _ in blocks}
    by_port = {(ports[values], (address - net) >> 8): (value >> 32, value & 0xFFFF)
               for (values, address), value in blocks.items()}
    assert by_port == {(53, 1): (0, 1), (53, 2): (1, 2), (53, 3): (1, 2), (80, 3): (2, 3)}
    assert run.table_entries == 4 and not run.trie_entries


def test_a_shape_whose_prefixes_would_expand_too_far_stays_in_the_trie():
    run = TupleRun(0, (rule(1, "src net 10.0.0.0/8 and udp"), rule(2, "src net 10.1.2.0/24 and udp"),
                       rule(3, "ip6 src net 2001:db8::/64")))
    assert len(run.shapes) == 2
    v4 = next(number for number, (shape, _) in enumerate(run.shapes) if shape.words == 1)
    assert v4 not in run.hashed and len(run.trie_entries) == 2  # a /8 is 65,536 /24s
    assert set(run.hashed) == {1 - v4} and run.table_entries == 3


def test_a_hash_key_leaves_out_the_fields_of_one_value_and_masks_the_address():
    run = TupleRun(0, (rule(1, "src net 10.0.1.0/24 and dst port 53"), rule(2, "src net 10.0.2.0/24 and dst port 80")))
    (number, values, prefix, _), *_ = run.entries
    kept = [run.shapes[number][0].fields[index] for index in run.hash_fields(number)]
    assert kept == [("ind", ("msh", 14), 16, 2), ("abs", 23, 1)]  # the port, the protocol (TCP, UDP, SCTP)
    key = run.hash_key(1, number, values, prefix)
    assert len(key) == run.hash_key_size(number) == 12
    assert int.from_bytes(key[:4], "little") == run.run_id(1, number)
    assert key[4:6] in (b"\x00\x35", b"\x00\x50") and key[6] in (6, 17, 132) and key[7] == 0
    assert key[8:12] == IPv4Network("10.0.1.0/24").network_address.packed or key[8:11] == b"\x0a\x00\x02"


def test_hashed_shapes_stay_within_a_bank_of_their_map(monkeypatch):
    from bpfnet.ddos import ruleset
    rules = tuple(rule(i + 1, f"src net 10.{i}.0.0/16 and udp dst port {53 + i % 2}") for i in range(40))
    assert set(TupleRun(0, rules).hashed) == {0}
    monkeypatch.setattr(ruleset, "MAX_TUPLE_HASHED", 2 * 39)  # a bank's half: one entry short
    run = TupleRun(1, rules)
    assert not run.hashed and len(run.trie_entries) == 40  # (the shape stays in the trie)
    monkeypatch.setattr(ruleset, "MAX_TUPLE_HASHED", 2 * 40)
    assert ruleset.hashed_overflow(40, [TupleRun(2, rules)]) is None
    assert ruleset.hashed_overflow(80, [TupleRun(3, rules), TupleRun(4, rules)]) == \
        "80 rules need 80 entries of ddos_tuple_h12; a bank holds 40"
