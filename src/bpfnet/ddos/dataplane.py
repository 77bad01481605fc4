"""The ddos stage in the kernel: the loaded object, its maps (mirrored from ddos/structs.h) and the
deployment of rule sets into the idle bank followed by one atomic flip of the head packets enter."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

from bpfnet.app.counters import Counter
from bpfnet.ddos.compiler import compile_standalone
from bpfnet.ddos.config import Rule
from bpfnet.ddos.pcap import compile_cached
from bpfnet.ddos.ruleset import (
    BANK_SLOTS,
    CHAIN_SLOTS,
    FILTER_RUNS,
    FILTER_SHAPES,
    FILTER_WORDS,
    HASH_KEY_SIZES,
    MAX_PREFIXES,
    MAX_TUPLE_ENTRIES,
    RULES_PER_CHUNK,
    SLOT_HEAD,
    SLOT_VERDICT,
    VALUE_RUN_SIZE,
    VALUE_RUNS,
    Action,
    Chunk,
    CompiledRule,
    Item,
    Layout,
    PrefixRun,
    StageMaps,
    TupleRun,
    ValueRun,
    bank_slot,
    chunk_program,
    filter_index,
    hashed_overflow,
    head_program,
    plan_layout,
    prefix_key,
    rule_keys,
    straight_items,
    straight_program,
    tuple_key,
)
from bpfnet.ddos.synproxy import Advertised
from bpfnet.ebpf import Link, Map, Object, Objects, ObjectSpec, Program, ProgType, TypedMap, VerifierError, asm
from bpfnet.ebpf.chain import SLOTS as CHAIN_STAGES
from bpfnet.ebpf.chain import XdpChain
from bpfnet.errors import BpfnetError

TOTALS = ["pass_no_match", "pass_rule", "drop_rule", "pass_limit", "drop_limit", "drop_limit_source",
          "sampled", "samples_lost", "captured", "captures_lost"]
# what syncookie rules did (enum ddos_syncookie_id; in TOTALS they count as pass_rule or drop_rule)
SYNCOOKIE_TOTALS = ["syncookie_sent", "syncookie_valid", "syncookie_invalid", "syncookie_tracked",
                    "syncookie_not_tcp"]
CAPTURE_DROP, CAPTURE_PASS = 1, 2


STRAIGHT_ITEMS = 8  # rules or runs a set of up to RULES_PER_CHUNK rules runs in order rather than grouped


class DeployError(BpfnetError):
    """A rule set was refused (verifier, too many rules); the previous set is still in force."""


# --- mirrors of ddos/structs.h ---------------------------------------------------------------

class RuleStats(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("last_jiffies", ctypes.c_uint64)]


class Limit(ctypes.Structure):
    _fields_ = [("rate_pps", ctypes.c_uint64), ("burst", ctypes.c_uint64)]


class Bucket(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


class RuleBucket(ctypes.Structure):
    _fields_ = [("lock", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bucket", Bucket)]


class Config(ctypes.Structure):
    _fields_ = [("sample_every", ctypes.c_uint32), ("capture", ctypes.c_uint32)]


class SynackParams(ctypes.Structure):
    _fields_ = [("mss4", ctypes.c_uint16), ("mss6", ctypes.c_uint16), ("wscale", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class Meta(ctypes.Structure):
    _fields_ = [("chunks", ctypes.c_uint32), ("groups", ctypes.c_uint32), ("generation", ctypes.c_uint64)]


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


@dataclass(frozen=True)
class ActiveSet:
    bank: int
    chunks: int       # programs the rules run in (1: one straight program; a grouped set's head not counted)
    groups: int       # keyed groups (0 for a straight program)
    generation: int   # rule sets deployed so far


@dataclass(frozen=True)
class RuleCounters:
    packets: int
    bytes: int
    last_ns: int  # monotonic ns (time.monotonic_ns) of the last match, to a jiffy; 0 = never


_JIFFIES = asm.Assembler()
_JIFFIES.emit(asm.call(asm.Helper.jiffies64), asm.exit_insn())
KNOWN_HZ = (100, 250, 300, 1000)  # the kernel's CONFIG_HZ choices


@functools.cache
def _jiffies_program() -> Program:
    return Program.load_raw(ProgType.XDP, _JIFFIES.assemble(), name="ddos_jiffies")


def _jiffies_now() -> int:
    """The low 32 bits of the kernel's jiffies (a test run of a program that returns them)."""
    return _jiffies_program().test_run(bytes(64)).retval & 0xFFFFFFFF


@functools.cache
def _jiffy_ns() -> int:
    """ns per jiffy: CONFIG_HZ, measured once (user space cannot read it) and rounded to a choice."""
    first, start = _jiffies_now(), time.monotonic_ns()
    time.sleep(0.1)
    ticks, elapsed = (_jiffies_now() - first) & 0xFFFFFFFF, time.monotonic_ns() - start
    hz = min(KNOWN_HZ, key=lambda known: abs(known - ticks * 1e9 / elapsed))
    return 1_000_000_000 // hz


def jiffies_to_monotonic_ns(jiffies: int) -> int:
    """time.monotonic_ns() at the jiffy `jiffies` (within a jiffy; jiffies less than 2^32 ago)."""
    jiffy = _jiffy_ns()
    now_ns, now = time.monotonic_ns(), _jiffies_now()
    return now_ns - ((now - jiffies) & 0xFFFFFFFF) * jiffy


def compile_rule(rule: Rule) -> CompiledRule:
    return CompiledRule(rule.number, Action[rule.action.upper()], compile_cached(rule.expr), rule.per_source)


def rule_tag(rule: Rule) -> int:
    """Identity of a rule's content (never 0): an id whose tag changes gets fresh counters and buckets."""
    return int.from_bytes(hashlib.sha256(repr((rule.id, rule.content_key())).encode()).digest()[:8],
                          "little") | 1


class DdosObjects(Objects):
    """ddos.bpf.c: the stage's maps, its entry program and the verdict program rule sets end in."""

    source = "ddos"
    progs: Annotated[Map, "ddos_progs"]                 # prog array: verdict, then two banks of rule sets
    match: Annotated[Map, "ddos_match"]
    rule_stats: Annotated[TypedMap[ctypes.c_uint32, RuleStats], "ddos_rule_stats"]
    totals: Annotated[TypedMap[ctypes.c_uint32, Counter], "ddos_totals"]
    syncookies: Annotated[TypedMap[ctypes.c_uint32, Counter], "ddos_syncookies"]
    synack: Annotated[TypedMap[ctypes.c_uint32, SynackParams], "ddos_synack"]
    limits: Annotated[TypedMap[ctypes.c_uint32, Limit], "ddos_limits"]
    buckets: Annotated[TypedMap[ctypes.c_uint32, RuleBucket], "ddos_buckets"]
    source_buckets: Annotated[Map, "ddos_src_bkts"]
    config: Annotated[TypedMap[ctypes.c_uint32, Config], "ddos_config"]
    meta: Annotated[TypedMap[ctypes.c_uint32, Meta], "ddos_meta"]
    samples: Annotated[Map, "ddos_samples"]              # ring buffers
    captures: Annotated[Map, "ddos_captures"]
    tags: Annotated[Map, "ddos_rule_tags"]
    active_map: Annotated[Map, "ddos_active"]
    prefixes: Annotated[Map, "ddos_prefixes"]
    values: Annotated[Map, "ddos_values"]
    tuples: Annotated[Map, "ddos_tuples"]
    tuple_filter: Annotated[Map, "ddos_tuple_filter"]
    tuple_h12: Annotated[Map, "ddos_tuple_h12"]
    tuple_h16: Annotated[Map, "ddos_tuple_h16"]
    tuple_h32: Annotated[Map, "ddos_tuple_h32"]
    tuple_h48: Annotated[Map, "ddos_tuple_h48"]
    sampler: Annotated[Map, "ddos_sampler"]
    chain_map: Annotated[Map, "xdp_chain"]
    verdict: Annotated[Program, "xdp_ddos_verdict"]


class DdosDataplane(DdosObjects):
    """The loaded ddos object. Loaded with `pin_dir`, its maps are pinned there and adopted on
    the next start; with `chain=` an XdpChain, the stage runs in the chain's ddos slot.

    The stage's entry point is the head of the rule set in force, a generated program: deploying a
    set replaces it in the chain's slot and in every link `attach` made (each an atomic swap), and
    in the head slot of ddos_progs, where the next agent finds it."""

    KEPT_HEADS = 4  # earlier heads stay open a while: a caller may have one in hand (`entry`)

    def __init__(self, obj: Object, chain: XdpChain | None = None) -> None:
        super().__init__(obj)
        self.progs.update(_u32(SLOT_VERDICT), _u32(self.verdict.fd))
        # where passing packets go after this stage (generated programs tail-call it themselves)
        self.chain_slot = CHAIN_STAGES["ddos"] if chain is not None else CHAIN_SLOTS
        self._written_values: dict[int, list[int] | None] = {0: None, 1: None}  # ddos_values set per bank
        self._written_filters: dict[int, list[int] | None] = {0: None, 1: None}  # ddos_tuple_filter words
        self._heads: list[Program] = []
        self._links: list[Link] = []
        self._tags = self._read_tags()
        raw = self.progs.lookup(_u32(SLOT_HEAD))
        if raw is not None:  # a previous agent's set keeps running until this one deploys
            self._install(Program.from_id(struct.unpack("<I", raw)[0]))
        else:
            self.deploy([])

    @property
    def entry(self) -> Program:
        """The program packets enter the stage by: the head of the rule set in force."""
        return self._heads[-1]

    def _install(self, head: Program) -> None:
        """Make `head` the stage's entry everywhere packets come in (the flip)."""
        self.progs.update(_u32(SLOT_HEAD), _u32(head.fd))
        if self.chain_slot < CHAIN_SLOTS:
            self.chain_map.update(_u32(self.chain_slot), _u32(head.fd))
        self._links = [link for link in self._links if not link.closed]
        for link in self._links:
            link.update(head)
        self._heads.append(head)
        while len(self._heads) > self.KEPT_HEADS:
            self._heads.pop(0).close()

    def close(self) -> None:
        for head in self._heads:
            head.close()
        self._heads.clear()
        super().close()

    @classmethod
    def load(cls, spec: ObjectSpec | None = None, pin_dir: Path | None = None, **kwargs: Any) -> Self:
        spec = spec or cls.spec()
        chain = kwargs.get("chain")
        if chain is not None:
            chain.stage(spec, CHAIN_STAGES["ddos"])
        return super().load(spec, pin_dir, **kwargs)

    # --- rule sets ----------------------------------------------------------------------------
    def deploy(self, rules: list[Rule]) -> None:
        """Make `rules` (in order) the rule set. Nothing changes if any step before the flip fails.

        A set whose grouped layout is one program, or that grouping cannot hold but value and
        prefix runs fold into one program, runs as one straight program; any other set as a head
        that dispatches on the packet's key to the chunks of its group."""
        compiled = [compile_rule(rule) for rule in rules]
        try:
            layout = plan_layout(compiled)
        except ValueError as err:
            layout = None
            failure = str(err)
        items = self._straight(compiled, layout)
        if layout is None and items is None:
            raise DeployError(failure) from None
        bank = 1 - self._active_bank()
        maps = self._stage_maps()
        if items is not None:
            chunks: list[Chunk] = []
            runs = [item for item in items if isinstance(item, PrefixRun)]
            prefixes = sum(len(run.entries) for run in runs)
            if prefixes > MAX_PREFIXES // 2:
                raise DeployError(f"{len(rules)} rules need {prefixes} source-network entries; a bank holds "
                                  f"{MAX_PREFIXES // 2}")
            value_runs = [item for item in items if isinstance(item, ValueRun)]
            tuple_runs = [item for item in items if isinstance(item, TupleRun)]
            entries = sum(run.table_entries for run in tuple_runs)
            if entries > MAX_TUPLE_ENTRIES // 2:
                raise DeployError(f"{len(rules)} rules need {entries} entries of ddos_tuples; a bank holds "
                                  f"{MAX_TUPLE_ENTRIES // 2}")
            overflow = hashed_overflow(len(rules), tuple_runs)
            if overflow:
                raise DeployError(overflow)
            programs = [self._load(straight_program(items, maps, bank), f"ddos_b{bank}",
                                   [rule for item in items for rule in _rules_of(item)])]
            shape = (1, 0)
        else:
            assert layout is not None
            chunks, runs, value_runs, tuple_runs = layout.chunks, layout.runs, [], layout.tuple_runs
            programs = self._load_chunks(chunks, bank, maps)
            try:
                programs.append(self._load(head_program(layout, bank, maps), f"ddos_b{bank}head", []))
            except BaseException:
                for program in programs:
                    program.close()
                raise
            shape = (len(chunks), layout.groups)
        try:
            self._prepare_rules(rules)
            self._clear_bank(bank)  # the set before last, which no packet can reach any more
            for run in runs:
                for (ethertype, network), word in run.entries.items():
                    self.prefixes.update(prefix_key(run.run_id(bank), ethertype, network), _u32(word))
            self._write_values(bank, value_runs)
            self._write_tuples(bank, tuple_runs)
            for chunk, program in zip(chunks, programs, strict=False):
                self.progs.update(_u32(bank_slot(bank, chunk.index)), _u32(program.fd))
            head = programs.pop()
            self._install(head)  # the flip: new packets start in the new set
            self.active_map.update(_u32(0), _u32(bank))
        finally:
            for program in programs:  # the prog array holds its own references
                program.close()
        meta = self.meta.lookup(_u32(0))
        self.meta.update(_u32(0), Meta(shape[0], shape[1], meta.generation + 1))

    @staticmethod
    def _straight(compiled: list[CompiledRule], layout: Layout | None) -> list[Item] | None:
        """The items of a straight program when the set runs as one, else None: when its grouped
        layout is one program anyway; when it has at most a chunk's worth of rules folding into a
        few items (running them in order costs less than finding a group: the key, the search and
        a tail call), or a keyed set of any size that value runs fold into a few items; or when
        grouping cannot hold it and the runs fold it into one program."""
        if layout is not None and len(layout.chunks) <= 1:
            return straight_items(compiled)
        items = straight_items(compiled)
        long_groups = layout is not None and any(chunk.next_index is not None for chunk in layout.chunks)
        if len(items) <= STRAIGHT_ITEMS and (len(compiled) <= RULES_PER_CHUNK or layout is None or (
                layout.groups > 0 and (any(isinstance(item, ValueRun) for item in items)
                                       or long_groups and any(isinstance(item, TupleRun) for item in items)))):
            # a few items, or a keyed set that value runs fold, or whose groups are long lists
            # (many rules that can match any key) that tuple runs fold: a few lookups in order cost
            # less than the key, the head's search and a tail call (1,000 port rules: one value run)
            return items
        gave_up = layout is None or (layout.groups == 0 and any(rule_keys(r.cbpf) for r in compiled))
        if gave_up:
            items = straight_items(compiled, keyed=True)
            if len(items) <= RULES_PER_CHUNK:
                return items
        return None

    def _stage_maps(self) -> StageMaps:
        return StageMaps(match=self.match.fd, progs=self.progs.fd, prefixes=self.prefixes.fd, values=self.values.fd,
                         sampler=self.sampler.fd, tuples=self.tuples.fd, rule_stats=self.rule_stats.map.fd,
                         totals=self.totals.map.fd, chain=self.chain_map.fd if self.chain_slot < CHAIN_SLOTS else None,
                         chain_slot=self.chain_slot, tuple_filter=self.tuple_filter.fd,
                         tuple_hashes=tuple(table.fd for table in self._tuple_hashes()))

    def _tuple_hashes(self) -> list[Map]:
        """The ddos_tuple_h* maps, in HASH_KEY_SIZES order."""
        return [self.tuple_h12, self.tuple_h16, self.tuple_h32, self.tuple_h48]

    def _write_values(self, bank: int, runs: list[ValueRun]) -> None:
        """Fill the bank's value tables for `runs` after emptying what the bank's previous set wrote
        (the whole bank the first time this process writes it: an earlier process may have)."""
        stale = self._written_values[bank]
        if stale is None:
            stale = list(range(bank * VALUE_RUNS * VALUE_RUN_SIZE, (bank + 1) * VALUE_RUNS * VALUE_RUN_SIZE))
        if stale:
            self.values.update_batch([_u32(i) for i in stale], [_u32(0)] * len(stale))
        written = [(run.base(bank) + value, word) for run in runs for value, word in run.entries.items()]
        if written:
            self.values.update_batch([_u32(i) for i, _ in written], [_u32(w) for _, w in written])
        self._written_values[bank] = [index for index, _ in written]

    def _write_tuples(self, bank: int, runs: list[TupleRun]) -> None:
        keys, values = [], []
        hashed: dict[int, tuple[list[bytes], list[bytes]]] = {size: ([], []) for size in HASH_KEY_SIZES}
        for run in runs:
            for (shape, field_values, prefix, length), value in run.trie_entries.items():
                keys.append(tuple_key(run.run_id(bank, shape), run.shapes[shape][0], field_values, prefix, length))
                values.append(struct.pack("<Q", value))
            for shape, (_, expanded) in run.hashed.items():
                size = run.hash_key_size(shape)
                for (field_values, address), value in expanded.items():
                    hashed[size][0].append(run.hash_key(bank, shape, field_values, address))
                    hashed[size][1].append(struct.pack("<Q", value))
        for table, (entries, packed) in [(self.tuples, (keys, values)),
                                        *zip(self._tuple_hashes(), hashed.values(), strict=True)]:
            for start in range(0, len(entries), 4096):
                table.update_batch(entries[start:start + 4096], packed[start:start + 4096])
        # the address filters: empty what the bank's previous set wrote (all of it the first time)
        per_bank = FILTER_RUNS * FILTER_SHAPES * FILTER_WORDS
        stale = self._written_filters[bank]
        if stale is None:
            stale = list(range(bank * per_bank, (bank + 1) * per_bank))
        if stale:
            self.tuple_filter.update_batch([_u32(i) for i in stale], [_u32(0)] * len(stale))
        words: dict[int, int] = {}
        for run in runs:
            for slot, _, _, window in run.filters.values():
                for value in window:
                    index = filter_index(bank, slot, value)
                    words[index] = words.get(index, 0) | 1 << (value & 31)
        if words:
            self.tuple_filter.update_batch([_u32(i) for i in words], [_u32(w) for w in words.values()])
        self._written_filters[bank] = list(words)

    def _active_bank(self) -> int:
        return struct.unpack("<I", self.active_map.lookup(_u32(0)))[0]

    def _clear_bank(self, bank: int) -> None:
        for index in range(BANK_SLOTS):
            self.progs.delete(_u32(bank_slot(bank, index)))
        # (the bank's value tables are rewritten by _write_values)
        for raw in list(self.prefixes.keys()):
            if struct.unpack_from("<I", raw, 4)[0] >> 16 == bank:  # the run id's bank
                self.prefixes.delete(raw)
        for raw in list(self.tuples.keys()):
            if struct.unpack_from("<I", raw, 4)[0] >> 31 == bank:
                self.tuples.delete(raw)
        for table in self._tuple_hashes():
            for raw in list(table.keys()):
                if struct.unpack_from("<I", raw, 0)[0] >> 31 == bank:
                    table.delete(raw)

    def _load_chunks(self, chunks: list[Chunk], bank: int, maps: StageMaps) -> list[Program]:
        programs: list[Program] = []
        try:
            for chunk in chunks:
                next_slot = None if chunk.next_index is None else bank_slot(bank, chunk.next_index)
                code = chunk_program(chunk.items, next_slot, maps.match, maps.progs, bank, maps.prefixes, maps)
                programs.append(self._load(code, f"ddos_b{bank}c{chunk.index}", chunk.rules))
        except BaseException:
            for program in programs:
                program.close()
            raise
        return programs

    def _load(self, code: bytes, name: str, rules: list[CompiledRule]) -> Program:
        try:
            return Program.load_raw(ProgType.XDP, code, name=name)
        except VerifierError as err:
            if not rules:
                raise DeployError(f"the generated program {name} was refused by the verifier: {err}") from None
            raise DeployError(self._explain(rules, err)) from None

    @staticmethod
    def _explain(chunk: list[CompiledRule], err: VerifierError) -> str:
        """Name the first rule of a refused chunk that the verifier refuses on its own."""
        for rule in chunk:
            try:
                Program.load_raw(ProgType.XDP, compile_standalone(list(rule.cbpf)), name="ddos_check").close()
            except VerifierError as single:
                return f"rule {rule.id} refused by the verifier: {single}"
        ids = f"{chunk[0].id}..{chunk[-1].id}"
        return f"rules {ids} refused by the verifier together: {err}"

    def _prepare_rules(self, rules: list[Rule]) -> None:
        """Fresh counters and buckets for ids that are new or whose content changed; limits for
        limit rules. The old set never refers to such an id with other content (ids are never
        edited in place), so this is safe before the flip. A removed rule's counters stay until its
        id is reused for another rule, so a rule removed and added back unchanged continues."""
        for rule in rules:
            tag = rule_tag(rule)
            if self._tags.get(rule.number) != tag:
                self._reset_rule(rule.number)
                self._tags[rule.number] = tag
            if rule.action == "limit":
                self.limits.update(_u32(rule.number), Limit(rule.rate, rule.bucket_size))
        self._store_tags()

    def _reset_rule(self, rule_id: int) -> None:
        self.rule_stats.update(_u32(rule_id), RuleStats())
        self.buckets.update(_u32(rule_id), RuleBucket())
        self.limits.update(_u32(rule_id), Limit())
        for key in list(self.source_buckets.keys()):
            if struct.unpack_from("<I", key)[0] == rule_id:
                self.source_buckets.delete(key)

    # The content tag of each id lives in a pinned map so an adopting agent keeps the counters.
    def _read_tags(self) -> dict[int, int]:
        return {struct.unpack("<I", key)[0]: struct.unpack("<Q", value)[0]
                for key, value in self.tags.items() if value != bytes(8)}

    def _store_tags(self) -> None:
        for rule_id, tag in self._tags.items():
            self.tags.update(_u32(rule_id), struct.pack("<Q", tag))

    # --- settings and counters ----------------------------------------------------------------
    def set_config(self, sample_every: int | None = None, capture: int | None = None) -> None:
        current = self.config.lookup(_u32(0))
        self.config.update(_u32(0), Config(current.sample_every if sample_every is None else sample_every,
                                           current.capture if capture is None else capture))
        if (sample_every is not None and sample_every != current.sample_every
                or capture is not None and capture != current.capture):
            # every CPU: the next packet goes to the verdict program, which draws a gap at the new
            # rate and flags the countdown while a capture runs
            self.sampler.update(_u32(0), _u32(1))

    def set_synack(self, advertised: dict[int, Advertised]) -> None:
        """What cookie SYN-ACKs advertise per ingress ifindex; other interfaces get the defaults."""
        for ifindex, said in advertised.items():
            self.synack.update(ctypes.c_uint32(ifindex), SynackParams(said.mss4, said.mss6, said.wscale))
        for ifindex in [key.value for key in self.synack.keys() if key.value not in advertised]:
            self.synack.delete(ctypes.c_uint32(ifindex))

    def counters(self, rule_id: int) -> RuleCounters:
        per_cpu = self.rule_stats.lookup(_u32(rule_id))
        last = max(c.last_jiffies for c in per_cpu)
        return RuleCounters(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu),
                            jiffies_to_monotonic_ns(last) if last else 0)

    def total_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for counters, names in ((self.totals, TOTALS), (self.syncookies, SYNCOOKIE_TOTALS)):
            for index, name in enumerate(names):
                per_cpu = counters.lookup(_u32(index))
                out[name] = {"packets": sum(c.packets for c in per_cpu), "bytes": sum(c.bytes for c in per_cpu)}
        return out

    def active(self) -> ActiveSet:
        meta = self.meta.lookup(_u32(0))
        return ActiveSet(self._active_bank(), meta.chunks, meta.groups, meta.generation)

    # --- attaching ----------------------------------------------------------------------------
    def attach(self, ifindex: int, mode: str = "native") -> Link:
        """Attach the stage alone (without an XDP chain) to an interface; later deploys swap the
        link's program."""
        link = self.entry.attach_xdp(ifindex, mode)
        self._links.append(link)
        return link


def _rules_of(item: Item) -> list[CompiledRule]:
    return list(item.rules) if isinstance(item, PrefixRun | ValueRun | TupleRun) else [item]


__all__ = ["DdosDataplane", "DeployError", "RuleCounters", "TOTALS", "CAPTURE_DROP", "CAPTURE_PASS"]
