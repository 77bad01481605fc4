"""Rule and state validation, id assignment, expiry, durations, rule-set layout, sample decoding."""

import ipaddress
import struct

import pytest
from pydantic import ValidationError

from bpfnet.ddos import ruleset
from bpfnet.ddos.config import DdosState, Rule, parse_duration
from bpfnet.ddos.pcap import compile_filter
from bpfnet.ddos.ruleset import Action, CompiledRule, bank_slot, plan_layout
from bpfnet.ddos.samples import RECORD, decode


def test_bad_expression_is_refused_with_libpcaps_message_and_the_rule():
    with pytest.raises(ValidationError, match=r"rule 7: expression 'udp port fifty': unknown port 'fifty'"):
        Rule(id=7, expr="udp port fifty")
    with pytest.raises(ValidationError, match="syntax error"):
        DdosState(rules=[{"expr": "udp"}, {"expr": "tcp and and"}])


@pytest.mark.parametrize("rule, message", [
    ({"expr": "udp", "action": "limit"}, "needs a rate"),
    ({"expr": "udp", "action": "drop", "rate": 5}, "only apply to action limit"),
    ({"expr": "udp", "action": "pass", "per_source": True}, "only apply to action limit"),
    ({"expr": "udp", "action": "reject"}, "Input should be 'drop', 'pass', 'limit' or 'syncookie'"),
    ({"expr": "udp", "id": 65536}, "less than 65536"),
    ({"expr": "dst port 80", "action": "syncookie"}, "action syncookie needs an expression that matches TCP only"),
    ({"expr": "tcp or udp", "action": "syncookie"}, "matches TCP only"),
    ({"expr": "tcp", "action": "syncookie", "rate": 5}, "only apply to action limit"),
    ({"expr": "udp", "action": "limit", "rate": -1}, "greater than or equal to 0"),
    ({"expr": "udp", "colour": "red"}, "Extra inputs are not permitted"),
])
def test_invalid_rules_name_the_problem(rule, message):
    with pytest.raises(ValidationError, match=message):
        Rule.model_validate(rule)


def test_missing_ids_are_assigned_after_the_highest_and_duplicates_refused():
    state = DdosState(rules=[{"expr": "udp"}, {"id": 5, "expr": "tcp"}, {"expr": "icmp"}])
    assert [r.id for r in state.rules] == [6, 5, 7]
    with pytest.raises(ValidationError, match="duplicate id 5"):
        DdosState(rules=[{"id": 5, "expr": "udp"}, {"id": 5, "expr": "tcp"}])


def test_assigned_ids_survive_a_round_trip():
    dumped = DdosState(rules=[{"expr": "udp"}]).model_dump(mode="json")
    assert DdosState.model_validate(dumped).rules[0].id == 1


def test_expired_rules_are_not_live():
    state = DdosState(rules=[{"expr": "udp", "expires": 100.0}, {"expr": "tcp"}])
    assert [r.expr for r in state.live_rules(99.9)] == ["udp", "tcp"]
    assert [r.expr for r in state.live_rules(100.0)] == ["tcp"]


def test_limit_bucket_defaults_to_the_rate():
    assert Rule(expr="udp", action="limit", rate=50).bucket_size == 50
    assert Rule(expr="udp", action="limit", rate=0).bucket_size == 1
    assert Rule(expr="udp", action="limit", rate=50, burst=7).bucket_size == 7


def test_interface_names_are_checked():
    with pytest.raises(ValidationError, match="interface name"):
        DdosState(interfaces=["eth0; rm -rf /"])


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                           ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration():
    with pytest.raises(ValueError, match="10 minutes"):
        parse_duration("10 minutes")


# --- rule-set layout --------------------------------------------------------------------------

def _rules(n: int, expr: str = "udp") -> list[CompiledRule]:
    cbpf = tuple(compile_filter(expr))
    return [CompiledRule(i, Action.DROP, cbpf) for i in range(1, n + 1)]


def test_any_key_rules_form_one_group_cut_into_chunks_of_256():
    layout = plan_layout(_rules(1000))
    assert [len(c.rules) for c in layout.chunks] == [256, 256, 256, 232]
    assert [c.next_index for c in layout.chunks] == [1, 2, 3, None]
    assert [r.id for c in layout.chunks for r in c.rules] == list(range(1, 1001))
    assert layout.entries == {None: 0} and layout.groups == 0
    assert plan_layout([]).chunks == []


def test_port_rules_are_grouped_by_key_keeping_rule_order():
    dns = CompiledRule(1, Action.PASS, tuple(compile_filter("udp dst port 53 and src net 10.0.0.0/8")))
    anything = CompiledRule(2, Action.DROP, tuple(compile_filter("ip[8] < 5")))
    web = CompiledRule(3, Action.DROP, tuple(compile_filter("tcp dst port 80")))
    dns_drop = CompiledRule(4, Action.DROP, tuple(compile_filter("ip and udp dst port 53")))
    layout = plan_layout([dns, anything, web, dns_drop])
    groups = {key: [r.id for r in layout.chunks[index].rules] for key, index in layout.entries.items()}
    assert groups == {(0x0800, 17, 53): [1, 2, 4], (0x0800, 6, 80): [2, 3], (0x86DD, 6, 80): [2, 3], None: [2]}
    assert len(layout.chunks) == 3  # the two port 80 keys share one program


def test_too_many_groups_fall_back_to_one_list():
    rules = [CompiledRule(i, Action.DROP, tuple(compile_filter(f"udp dst port {i}"))) for i in range(1, 101)]
    rules += _rules(200, "ip[8] = 1")  # any-key rules repeated in 100 groups: over the limit
    rules = [CompiledRule(i + 1, r.action, r.cbpf) for i, r in enumerate(rules)]
    layout = plan_layout(rules)
    assert layout.entries == {None: 0} and sum(len(c.rules) for c in layout.chunks) == len(rules)


def _net_rule(rule_id: int, expr: str, action: Action = Action.DROP) -> CompiledRule:
    return CompiledRule(rule_id, action, tuple(compile_filter(expr)))


def test_consecutive_source_network_rules_become_one_prefix_run_shared_by_groups():
    rules = [_net_rule(1, "src net 10.1.0.0/16"), _net_rule(2, "src host 192.0.2.7"),
             _net_rule(3, "udp dst port 53"), _net_rule(4, "ip src net 10.2.0.0/16"),
             _net_rule(5, "tcp"), _net_rule(6, "src net 10.3.0.0/16"), _net_rule(7, "src net 10.4.0.0/16")]
    layout = plan_layout(rules)
    groups = {key: layout.chunks[index].items for key, index in layout.entries.items()}
    runs = {run.number: [r.id for r in run.rules] for run in layout.runs}
    # the DNS group's own rule 3 splits 1, 2 from 4 (alone, it stays code); elsewhere 1, 2, 4 are one run
    assert runs == {0: [1, 2], 1: [6, 7], 2: [1, 2, 4]}

    def shape(items):
        return [f"run{item.number}" if isinstance(item, ruleset.PrefixRun) else item.id for item in items]
    assert shape(groups[(0x0800, 17, 53)]) == ["run0", 3, 4, 5, "run1"]
    assert shape(groups[None]) == ["run2", 5, "run1"]
    assert groups[None][-1] is groups[(0x0800, 17, 53)][-1]  # one run (one set of entries) for both
    assert [r.id for r in layout.chunks[layout.entries[None]].rules] == [1, 2, 4, 5, 6, 7]


def test_a_prefix_run_finds_the_first_rule_among_nested_networks():
    run = ruleset.PrefixRun(0, (_net_rule(1, "ip src net 10.0.0.0/8", Action.PASS),
                                _net_rule(2, "ip src net 10.1.0.0/16"),
                                _net_rule(3, "ip src net 10.1.2.0/24", Action.LIMIT),
                                _net_rule(4, "ip src net 192.168.0.0/16"),
                                _net_rule(5, "ip src net 192.168.1.0/24", Action.PASS)))
    words = {str(network): word & 0xFFFF for (_, network), word in run.entries.items()}
    # 10.1.2.x is in all three 10/8 networks: the first rule (1) decides, whatever the longest is
    assert words == {"10.0.0.0/8": 1, "10.1.0.0/16": 1, "10.1.2.0/24": 1, "192.168.0.0/16": 4,
                     "192.168.1.0/24": 4}
    assert run.entries[(0x0800, ipaddress.IPv4Network("10.1.2.0/24"))] == run.rules[0].match_word


def test_prefix_keys_match_the_c_struct():
    key = ruleset.prefix_key(1 << 16 | 5, 0x0806, ipaddress.IPv4Network("10.1.2.0/24"))
    assert key == struct.pack("<II", 88, 0x10005) + bytes([0x08, 0x06, 0, 0, 10, 1, 2, 0])


def test_banks_do_not_overlap():
    slots = {(b, i): bank_slot(b, i) for b in (0, 1) for i in range(ruleset.BANK_SLOTS)}
    assert len(set(slots.values())) == 2 * ruleset.BANK_SLOTS
    assert min(slots.values()) == ruleset.SLOT_BANKS and max(slots.values()) == ruleset.PROG_SLOTS - 1
    with pytest.raises(ValueError):
        bank_slot(2, 0)


def test_match_word_packs_id_action_and_per_source():
    rule = CompiledRule(300, Action.LIMIT, (), per_source=True)
    assert rule.match_word == 300 | 3 << 16 | 1 << 24


def test_each_chunk_tail_calls_its_next_chunk_then_the_verdict():
    """The next-chunk slot is an immediate (mov32 r3, slot) right before each tail call."""
    code = ruleset.chunk_program(_rules(3), bank_slot(1, 3), match_map_fd=3, progs_fd=4)
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    calls = [i for i, insn in enumerate(insns) if insn[0] == 0x85 and struct.unpack_from("<i", insn, 4)[0] == 12]
    slots = [struct.unpack_from("<i", insns[i - 1], 4)[0] for i in calls]
    assert slots == [bank_slot(1, 3), ruleset.SLOT_VERDICT]


# --- samples ----------------------------------------------------------------------------------

def test_sample_records_decode_with_header_fields():
    frame = bytes.fromhex("020000000002020000000001080045000024000000004011000"
                          "00a0000010a000002d431003500100000") + b"abcdefgh"
    raw = RECORD.pack(123, 9, 1, 1, len(frame), 600, 4) + frame + bytes(128 - len(frame))
    sample = decode(raw)
    assert (sample.ts_ns, sample.rule, sample.action, sample.verdict, sample.pkt_len, sample.ifindex) == (
        123, 9, "drop", "drop", 600, 4)
    assert sample.frame == frame and sample.dropped
    assert (str(sample.fields.src_address), sample.fields.src_port, sample.fields.dst_port) == ("10.0.0.1", 54321, 53)
    assert decode(RECORD.pack(1, 0, 0, 2, 3, 3, 1) + b"\x01\x02\x03").fields is None  # not IP
    with pytest.raises(ValueError, match="shorter"):
        decode(b"\x00" * 10)


def test_apply_keeps_the_ids_of_identical_rules():
    from bpfnet.ddos.cli import _keep_ids

    current = [{"id": 4, "expr": "udp", "action": "drop"}, {"id": 9, "expr": "tcp", "action": "pass"}]
    wanted = [{"expr": "tcp", "action": "pass"}, {"expr": "udp", "action": "pass"},
              {"expr": "udp", "action": "drop"}, {"expr": "udp", "action": "drop"}]
    assert [r.get("id") for r in _keep_ids(current, wanted)] == [9, None, 4, None]


@pytest.mark.parametrize("expr, keys", [
    ("udp dst port 53", {(0x0800, 17, 53), (0x86DD, 17, 53)}),
    ("ip6 and tcp dst port 443 and ip6[53] & 2 != 0", {(0x86DD, 6, 443)}),
    ("udp dst port 53 or tcp dst port 80", {(0x0800, 17, 53), (0x86DD, 17, 53), (0x0800, 6, 80), (0x86DD, 6, 80)}),
    ("port 53", None),                  # the source-port paths leave the destination port open
    ("udp", None),
    ("not udp dst port 53", None),
    ("vlan and udp dst port 53", None),  # read behind the tag, not where the key is read
    ("udp dst portrange 1-3", None),     # not an equality
])
def test_match_keys(expr, keys):
    from bpfnet.ddos.grouping import match_keys

    result = match_keys(compile_filter(expr))
    assert (None if result is None else set(result)) == keys


@pytest.mark.parametrize("expr, prefixes", [
    ("src net 10.1.2.0/24", {(0x0800, "10.1.2.0/24"), (0x0806, "10.1.2.0/24"), (0x8035, "10.1.2.0/24")}),
    ("src host 192.0.2.1", {(0x0800, "192.0.2.1/32"), (0x0806, "192.0.2.1/32"), (0x8035, "192.0.2.1/32")}),
    ("ip src net 10.0.0.0/8", {(0x0800, "10.0.0.0/8")}),
    ("ip src host 1.2.3.4 or arp src host 1.2.3.4", {(0x0800, "1.2.3.4/32"), (0x0806, "1.2.3.4/32")}),
    ("not src net 10.0.0.0/8", None),       # a negation: not a set of networks
    ("src net 10.0.0.0/8 and udp", None),   # tests more than the source
    ("src net 10.0.0.0/8 or src net 11.0.0.0/8", None),  # the second network's path negates the first
    ("dst net 10.0.0.0/8", None),
    ("ip6 src net 2001:db8::/32", None),
    ("udp dst port 53", None),
])
def test_source_prefixes(expr, prefixes):
    from bpfnet.ddos.grouping import source_prefixes

    result = source_prefixes(compile_filter(expr))
    assert (None if result is None else {(e, str(n)) for e, n in result}) == prefixes


def test_packet_key_reads_where_libpcap_reads():
    from bpfnet.ddos.grouping import packet_key

    v4 = bytes.fromhex("020000000002020000000001080046000020000000004011000"
                       "00a0000010a00000201010101d431003500080000")  # IHL 6: port after an option
    assert packet_key(v4) == (0x0800, 17, 53)
    assert packet_key(v4[:36]) is None  # the port is cut off
    assert packet_key(bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP
