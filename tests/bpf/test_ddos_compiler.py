"""The cBPF -> eBPF compiler in the kernel: for every expression of a corpus and every frame of
a seeded set, the verdict of the compiled XDP program (BPF_PROG_TEST_RUN) equals libpcap's
`pcap_offline_filter` on the same bytes.

Up to 32 filters share one program, which returns a bit mask of the filters that matched, so a
test run checks 32 expressions at once. Frames are built with scapy from small pools of addresses
and ports that the expressions mention (so both verdicts occur often), then varied cheaply:
truncated, with a flipped byte, or with random bytes appended. Everything is seeded, so a failure reproduces.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from bpfnet.ddos import compiler, pcap
from bpfnet.ebpf import Program, ProgType

pytestmark = pytest.mark.root

V4 = ["10.0.0.1", "10.0.0.2", "10.1.0.5", "192.168.1.1", "192.168.200.3", "8.8.8.8", "224.0.0.5"]
V6 = ["2001:db8::1", "2001:db8::2", "fe80::1", "2001:db9::5", "ff02::1"]
PORTS = [22, 53, 80, 123, 443, 1024, 1500, 2000, 5353, 5500, 8080, 11211]
MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:05"]
PAYLOADS = [b"", b"\xde\xad\xbe\xef" + b"x" * 8, b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x00\xa5",
            b"\x12\x34" + bytes(30), b"A" * 300, b"N" * 468]

_BASE = [
    # hosts and nets
    "host 10.0.0.1", "src host 10.0.0.1", "dst host 10.0.0.2", "ip host 192.168.1.1",
    "net 10.0.0.0/8", "src net 192.168.0.0/16", "dst net 10.1.0.0/24", "net 8.8.8.0/24",
    "ip src 10.0.0.1 and ip dst 10.0.0.2", "ip6 host 2001:db8::1", "src net 2001:db8::/32",
    "dst host 2001:db8::2", "ip6 net fe80::/10", "ether host 02:00:00:00:00:01",
    "ether src 02:00:00:00:00:02", "ether broadcast", "ether multicast", "ip multicast",
    "ip6 multicast",
    # ports
    "port 53", "tcp port 80", "udp port 53", "src port 1024", "dst port 443", "tcp dst port 22",
    "udp src port 123", "portrange 1000-2000", "tcp portrange 1-1023", "udp src portrange 5000-6000",
    "dst portrange 8000-9000", "ip6 and port 80", "ip6 and udp dst port 5353", "udp dst port 53",
    "tcp dst port 80 and tcp[tcpflags] & tcp-syn != 0", "ip6 and tcp dst port 443",
    "udp dst port 123 and len > 100", "dst port 53 and ip[8] < 64",
    # protocols
    "tcp", "udp", "icmp", "icmp6", "ip", "ip6", "arp", "ip proto 47", "ip6 proto 17",
    "ether proto 0x88cc", "vlan", "vlan 100", "vlan and tcp", "vlan 10 and udp port 53",
    "vlan and vlan", "vlan 100 and vlan 200", "ip proto \\tcp", "proto \\udp",
    # tcp flags and fields
    "tcp[tcpflags] & tcp-syn != 0", "tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn",
    "tcp[tcpflags] = tcp-rst", "tcp[13] & 0x3f = 0x12", "tcp[tcpflags] & tcp-fin != 0",
    "tcp[14:2] = 0", "tcp[14:2] > 1000", "tcp[4:4] = 0", "tcp[12] & 0xf0 > 0x50",
    # byte and bit tests
    "ip[8] < 64", "ip[8] = 128", "ip[1] & 0xfc = 0xb8", "ip[2:2] > 1000", "ip[6:2] & 0x1fff != 0",
    "ip[6] & 0x20 != 0", "ip[6:2] & 0x3fff != 0", "ip[0] & 0xf > 5", "ip[9] = 17",
    "udp[8:4] = 0xdeadbeef", "udp[4:2] = 476", "udp[4:2] > 100", "udp[8:2] = 0x1234",
    "tcp[20:4] = 0x47455420", "icmp[icmptype] = icmp-echo", "icmp[0] = 8 and icmp[1] = 0",
    "icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply",
    "ip6[7] < 64", "ip6[6] = 17", "ip6[6] = 44", "icmp6 and ip6[40] = 128", "ip6[4:2] > 100",
    "arp[6:2] = 1", "arp[6:2] = 2", "arp host 10.0.0.1", "rarp", "ether[0] & 1 != 0",
    "ether[12:2] = 0x0800", "ether[6:4] = 0x02000000",
    # arithmetic and lengths
    "len > 100", "len <= 64", "greater 200", "less 80", "len = 60",
    "ip[2:2] - ((ip[0] & 0xf) << 2) > 100", "ip[8] * 2 > 100", "ip[8] / 3 = 21",
    "ip[8] % 7 = 1", "ip[2:2] / (ip[8] - 64) > 3", "ip[8] % (ip[9] - 6) = 9",
    "ip[0] << ip[1] = 0", "(ip[16] >> (ip[9] & 7)) = 5", "ip[8] ^ 0xff = 191",
    "-ip[8] & 0xff = 192", "ip[8] + ip[9] = 70", "ip[8] - ip[9] = 58", "ip[8] | 1 = 65",
    "ip[8] & ip[9] = 0", "len - 14 = ip[2:2]", "ip[2:2] * 4 / 2 % 1000 > 500",
    "(ip[8] << 24) >> 25 = 32", "4 * (ip[0] & 0xf) = 24",
    # variable header lengths and indirect loads
    # the detector's bit patterns, ranges and new fields (issue 19)
    "tcp[tcpflags] & (tcp-fin|tcp-syn) = (tcp-fin|tcp-syn)", "tcp[tcpflags] & (tcp-rst|tcp-ack) = 0",
    "ip[2:2] >= 300 and ip[2:2] <= 520", "tcp[14:2] >= 1024 and tcp[14:2] <= 4096", "ip[6] & 0x40 = 0x0",
    "udp[4:2] != ip[2:2] - ((ip[0] & 0xf) << 2)", "ip6[6] = 44 and ip6[42:2] & 0xfff8 = 0",
    "ip6[6] = 17 and ip6[44:2] != ip6[4:2]", "icmp[icmpcode] = 0", "tcp[12] & 0xf0 = 0xa0",
    "ip[6:2] & 0x1fff >= 185 and ip[6:2] & 0x1fff <= 1000",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420", "tcp[(tcp[12] >> 2)] = 0x16",
    "tcp[tcp[12] >> 2:2] = 0x1603", "udp[udp[4:2] - 2] = 0", "ip[ip[0] & 0xf] = 0",
    "ip[(ip[0] & 0xf) * 4:2] = 53", "tcp[1000:2] = 0", "udp[60000] = 0", "ip[65530:4] = 0",
    "ether[65534] = 0", "tcp[tcp[0] * 256 + tcp[1]] != 0xff", "ether[ip[8]:2] > 0",
]

_COMBINERS = ["{a} and {b}", "{a} or {b}", "not {a}", "not ({a} or {b})", "{a} and not {b}",
              "({a} or {b}) and ({b} or {c})"]


def expressions(count: int = 240, seed: int = 1) -> list[str]:
    """The base expressions plus seeded combinations of them with and/or/not."""
    rng = random.Random(seed)
    out = list(_BASE)
    seen = set(out)
    while len(out) < count:
        a, b, c = rng.sample(_BASE, 3)
        expr = rng.choice(_COMBINERS).format(a=f"({a})", b=f"({b})", c=f"({c})")
        if expr not in seen:
            seen.add(expr)
            out.append(expr)
    return out


def _l4(rng: random.Random, v6: bool):
    kind = rng.choice(["tcp", "tcp", "udp", "udp", "icmp", "gre", "other"])
    payload = Raw(rng.choice(PAYLOADS)) if rng.random() < 0.8 else Raw(b"")
    sport, dport = rng.choice(PORTS + [rng.randrange(65536)]), rng.choice(PORTS + [rng.randrange(65536)])
    if kind == "tcp":
        options = rng.choice([[], [("MSS", 1460)], [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)),
                                                     ("NOP", None), ("WScale", 7)]])
        flags = rng.choice(["S", "SA", "A", "PA", "R", "F", "FA", "SF", "", "U"])
        return TCP(sport=sport, dport=dport, flags=flags, options=options,
                   window=rng.choice([0, 512, 64240, 1024])) / payload
    if kind == "udp":
        return UDP(sport=sport, dport=dport) / payload
    if kind == "icmp":
        return (ICMPv6EchoRequest() if v6 else ICMP(type=rng.choice([0, 3, 8, 11]))) / payload
    if kind == "gre":
        return Raw(b"\x00\x00\x08\x00") / payload
    return payload


def _frame(rng: random.Random) -> bytes:
    eth = Ether(src=rng.choice(MACS), dst=rng.choice(MACS))
    tags = rng.choice([[], [], [], [100], [10], [100, 200]])
    for vid in tags:
        eth = eth / Dot1Q(vlan=vid)
    l3 = rng.choice(["ip", "ip", "ip", "ip6", "ip6", "arp", "other"])
    if l3 == "ip":
        options = rng.choice([[], [], [IPOption_NOP() for _ in range(4)], [IPOption_RR()]])
        ip = IP(src=rng.choice(V4), dst=rng.choice(V4), ttl=rng.choice([1, 32, 63, 64, 128, 255]),
                tos=rng.choice([0, 0xB8]), flags=rng.choice([0, 1, 2]),
                frag=rng.choice([0, 0, 0, 185]), options=options)
        l4 = _l4(rng, False)
        if isinstance(l4, Raw) and l4.load[:4] == b"\x00\x00\x08\x00":
            ip.proto = 47
        pkt = eth / ip / l4
    elif l3 == "ip6":
        ip6 = IPv6(src=rng.choice(V6), dst=rng.choice(V6), hlim=rng.choice([1, 63, 64, 255]))
        if rng.random() < 0.15:
            ip6 = ip6 / IPv6ExtHdrFragment()
        pkt = eth / ip6 / _l4(rng, True)
    elif l3 == "arp":
        pkt = eth / ARP(op=rng.choice([1, 2]), psrc=rng.choice(V4), pdst=rng.choice(V4))
    else:
        eth.type = rng.choice([0x88CC, 0x8035, 0x8847, 0x1234])
        pkt = eth / Raw(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))))
    return bytes(pkt)


def _vary(rng: random.Random, frame: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.25 and len(frame) > 14:  # truncated (XDP frames are at least 14 bytes)
        return frame[:rng.randrange(14, len(frame))]
    if choice < 0.5:
        pos = rng.randrange(len(frame))
        return frame[:pos] + bytes([rng.randrange(256)]) + frame[pos + 1:]
    if choice < 0.6:
        return frame + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return frame


def frames(count: int = 10_000, templates: int = 2_000, seed: int = 2) -> list[bytes]:
    """`templates` scapy-built frames, each also varied, up to `count` frames in total."""
    rng = random.Random(seed)
    base = [_frame(rng) for _ in range(templates)]
    out = list(base)
    while len(out) < count:
        out.append(_vary(rng, rng.choice(base)))
    out.append(bytes(14))  # the smallest frame test_run accepts
    return out


def _corpus() -> list[tuple[str, list[pcap.CbpfInsn]]]:
    """Compiled expressions; combinations libpcap proves empty ("rejects all packets") drop out."""
    out = []
    for expr in expressions(260):
        try:
            out.append((expr, pcap.compile_filter(expr)))
        except pcap.PcapError as err:
            assert "rejects all packets" in str(err), (expr, err)
    return out


CORPUS = _corpus()
FRAMES = frames()


def test_corpus_is_large_and_both_verdicts_occur():
    assert len(CORPUS) >= 200
    assert len(FRAMES) >= 10_000
    for expr, prog in CORPUS:
        if expr not in _BASE:
            continue
        matcher, verdicts = pcap.CompiledFilter(prog), set()
        for frame in FRAMES:
            verdicts.add(matcher.matches(frame))
            if len(verdicts) == 2:
                break
        assert verdicts == ({False} if expr in NEVER_MATCH else {False, True}), expr


# expressions that only address bytes no frame here has (the out-of-bounds paths)
NEVER_MATCH = {"tcp[1000:2] = 0", "udp[60000] = 0", "ip[65530:4] = 0", "ether[65534] = 0"}


@pytest.mark.parametrize("group", range(0, len(CORPUS), 32), ids=lambda g: f"exprs{g}-{g + 31}")
def test_kernel_verdicts_equal_libpcap(group):
    batch = CORPUS[group:group + 32]
    code = compiler.compile_multi([prog for _, prog in batch], [1 << bit for bit in range(len(batch))])
    references = [pcap.CompiledFilter(prog) for _, prog in batch]
    mismatches = []
    with Program.load_raw(ProgType.XDP, code, name="dd_equiv") as program:
        for frame in FRAMES:
            mask = program.test_run(frame).retval
            for bit, ((expr, _), ref) in enumerate(zip(batch, references, strict=False)):
                if bool(mask >> bit & 1) != ref.matches(frame):
                    mismatches.append((expr, frame.hex()))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_standalone_program_returns_drop_on_match():
    code = compiler.compile_standalone(pcap.compile_filter("udp dst port 53"))
    udp53 = bytes(Ether() / IP(dst="10.0.0.1") / UDP(dport=53))
    udp54 = bytes(Ether() / IP(dst="10.0.0.1") / UDP(dport=54))
    with Program.load_raw(ProgType.XDP, code, name="dd_single") as program:
        assert program.test_run(udp53).retval == 1
        assert program.test_run(udp54).retval == 2
        assert program.test_run(udp53).data == udp53  # the packet is never modified


def test_grouping_keys_are_sound_on_the_corpus():
    """Whenever libpcap accepts a frame, the frame's key is among the rule's keys (or the rule is
    any-key): grouping by key never hides a rule from a packet it matches."""
    from bpfnet.ddos.grouping import match_keys, packet_key

    finite = 0
    for expr, prog in CORPUS:
        keys = match_keys(prog)
        if keys is None:
            continue
        finite += 1
        reference = pcap.CompiledFilter(prog)
        for frame in FRAMES:
            if reference.matches(frame):
                assert packet_key(frame) in keys, (expr, frame.hex())
    assert finite >= 10  # the destination-port rules of the corpus do get keys


def test_source_prefixes_are_exact_on_the_corpus():
    """Where a rule counts as source networks, libpcap accepts a frame exactly when its ethertype and
    source address fall in one of them: a prefix lookup decides every frame as the rule would."""
    from bpfnet.ddos.grouping import SOURCE_ADDRESS, source_prefixes

    extra = ["src net 10.0.0.0/8", "src host 192.0.2.1", "ip src net 198.51.100.0/24",
             "arp src host 10.0.0.1", "ip src host 10.0.0.1 or arp src net 10.0.0.0/24"]
    def inside(prefixes, frame: bytes) -> bool:
        ethertype = int.from_bytes(frame[12:14], "big")
        offset = SOURCE_ADDRESS.get(ethertype)
        return offset is not None and len(frame) >= offset + 4 and any(
            e == ethertype and ipaddress.IPv4Address(frame[offset:offset + 4]) in network for e, network in prefixes)

    assert _exact_on_corpus(extra, source_prefixes, inside) >= len(extra)


def _exact_on_corpus(extra: list[str], summarize, decides) -> int:
    """Checks, for each corpus expression (and `extra`) that `summarize` can summarise, that
    `decides(summary, frame)` is libpcap's verdict on every frame; returns how many it summarised."""
    exact = 0
    for expr, prog in CORPUS + [(e, pcap.compile_filter(e)) for e in extra]:
        summary = summarize(prog)
        if summary is None:
            continue
        exact += 1
        reference = pcap.CompiledFilter(prog)
        for frame in FRAMES:
            assert reference.matches(frame) == decides(summary, frame), (expr, frame.hex())
    return exact


def _field_value(field, frame: bytes) -> int | None:
    """A conjunction's field as libpcap computes it from `frame` (None: the load fails)."""
    mask = None
    if field[0] == "and":
        field, mask = field[1], field[2]
    size = field[-1]
    if field[0] == "abs":
        offset = field[1]
    else:  # ("ind", ("msh", m), k, size)
        if len(frame) <= field[1][1]:
            return None
        offset = 4 * (frame[field[1][1]] & 0xF) + field[2]
    if offset + size > len(frame):
        return None
    value = int.from_bytes(frame[offset:offset + size], "big")
    return value if mask is None else value & mask


def _holds(conjunction, frame: bytes) -> bool:
    shape = conjunction.shape
    for field, value in zip(shape.fields, conjunction.values, strict=True):
        if _field_value(field, frame) != value:
            return False
    if shape.address is None:
        return True
    end = shape.address + 4 * shape.words
    if end > len(frame):
        return False
    address = int.from_bytes(frame[shape.address:end], "big") << (128 - 32 * shape.words)
    return address >> (128 - conjunction.length) == conjunction.prefix >> (128 - conjunction.length)


def test_conjunctions_are_exact_on_the_corpus():
    """Where a rule counts as a union of conjunctions (tuple runs), libpcap accepts a frame exactly
    when one of them holds on it (fields as libpcap loads them, the address by prefix, a frame too
    short for a field matching nothing of that conjunction)."""
    from bpfnet.ddos.grouping import rule_conjunctions

    extra = ["src net 10.0.0.0/8 and udp", "src net 2001:db8::/36 and udp", "ip6 src net 2001:db8::/64 and tcp",
             "dst net 10.1.0.0/24 and tcp dst port 80", "src host 10.0.0.1 and dst net 10.0.0.0/30",
             "ip6 dst net 2001:db8::/127", "src net 0.0.0.0/1 and icmp", "arp dst host 10.0.0.2"]
    exact = _exact_on_corpus(extra, rule_conjunctions,
                             lambda conjunctions, frame: any(_holds(c, frame) for c in conjunctions))
    assert exact >= 60 + len(extra)
