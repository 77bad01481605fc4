"""Rule and state validation, id assignment, expiry, durations, rule-set layout, sample decoding."""

import struct

import pytest
from pydantic import ValidationError

from bpfnet.ddos import ruleset
from bpfnet.ddos.config import DdosState, Rule, parse_duration
from bpfnet.ddos.pcap import compile_filter
from bpfnet.ddos.ruleset import Action, CompiledRule, chunk_slot, split_chunks
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
    ({"expr": "udp", "action": "reject"}, "Input should be 'drop', 'pass' or 'limit'"),
    ({"expr": "udp", "id": 4096}, "less than 4096"),
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

def _rules(n: int) -> list[CompiledRule]:
    cbpf = tuple(compile_filter("udp"))
    return [CompiledRule(i, Action.DROP, cbpf) for i in range(1, n + 1)]


def test_rules_are_split_in_order_into_chunks_of_256():
    chunks = split_chunks(_rules(1000))
    assert [len(c) for c in chunks] == [256, 256, 256, 232]
    assert [r.id for c in chunks for r in c] == list(range(1, 1001))
    assert split_chunks([]) == []


def test_too_many_rules_for_the_banks_is_refused():
    with pytest.raises(ValueError, match="holds 16"):
        split_chunks(_rules(20), per_chunk=1)


def test_banks_do_not_overlap():
    slots = {(b, i): chunk_slot(b, i) for b in (0, 1) for i in range(ruleset.MAX_CHUNKS)}
    assert len(set(slots.values())) == 2 * ruleset.MAX_CHUNKS
    assert min(slots.values()) == ruleset.SLOT_BANKS and max(slots.values()) == ruleset.PROG_SLOTS - 1
    with pytest.raises(ValueError):
        chunk_slot(2, 0)


def test_match_word_packs_id_action_and_per_source():
    rule = CompiledRule(300, Action.LIMIT, (), per_source=True)
    assert rule.match_word == 300 | 3 << 16 | 1 << 24


def test_each_chunk_tail_calls_within_its_bank():
    """The next-chunk slot is an immediate (mov32 r3, slot) right before each tail call."""
    code = ruleset.chunk_program(_rules(3), bank=1, index=2, last=False, match_map_fd=3, progs_fd=4)
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    calls = [i for i, insn in enumerate(insns) if insn[0] == 0x85 and struct.unpack_from("<i", insn, 4)[0] == 12]
    slots = [struct.unpack_from("<i", insns[i - 1], 4)[0] for i in calls]
    assert slots == [chunk_slot(1, 3), ruleset.SLOT_VERDICT]


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
