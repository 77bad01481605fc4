"""Pure parts of the rule compiler: libpcap front end, pcap files, eBPF encoding, basic blocks."""

import io
import shutil
import struct
import subprocess

import pytest

from bpfnet.ddos import compiler, pcap
from bpfnet.ddos.compiler import CbpfError, split_blocks
from bpfnet.ddos.pcap import CbpfInsn as C
from bpfnet.ebpf import asm

UDP53 = bytes.fromhex(
    "020000000002" "020000000001" "0800"                       # ethernet
    "4500001c00000000401100000a0000010a000002"                 # ipv4 10.0.0.1 -> 10.0.0.2, udp
    "d43100350008" "0000")                                     # udp 54321 -> 53


def test_compile_filter_gives_classic_bpf():
    prog = pcap.compile_filter("udp")
    assert prog[0] == C(0x28, 0, 0, 12)  # ldh [12]: the ethertype
    assert prog[-1].code == 0x06         # ends with a return


def test_syntax_error_carries_libpcaps_message():
    with pytest.raises(pcap.PcapError, match="syntax error"):
        pcap.compile_filter("tcp port port")
    with pytest.raises(pcap.PcapError, match="unknown port 'nosuch'"):
        pcap.compile_filter("port nosuch")


def test_offline_filter_is_libpcaps_verdict():
    assert pcap.offline_filter("udp dst port 53 and src host 10.0.0.1", UDP53)
    assert not pcap.offline_filter("tcp", UDP53)
    assert not pcap.offline_filter("udp[8] = 0", UDP53)  # beyond the packet: no match


def test_pcap_file_round_trip(tmp_path):
    path = tmp_path / "x.pcap"
    pcap.write_pcap(path, [pcap.PcapRecord(1_500_000_123, UDP53, 100), UDP53[:20]])
    records = pcap.read_pcap(path)
    assert records == [pcap.PcapRecord(1_500_000_123, UDP53, 100), pcap.PcapRecord(0, UDP53[:20], 20)]


@pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump not installed")
def test_tcpdump_reads_written_files(tmp_path):
    path = tmp_path / "x.pcap"
    pcap.write_pcap(path, [UDP53, UDP53])
    out = subprocess.run(["tcpdump", "-nr", str(path), "udp port 53"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("10.0.0.1.54321 > 10.0.0.2.53") == 2


def test_reader_accepts_big_endian_microsecond_files():
    data = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack(">IIII", 2, 5, 3, 60) + b"abc"
    assert list(pcap.iter_pcap(io.BytesIO(data))) == [pcap.PcapRecord(2_000_005_000, b"abc", 60)]


def test_reader_rejects_other_formats():
    with pytest.raises(ValueError, match="not a pcap file"):
        list(pcap.iter_pcap(io.BytesIO(b"\x0a\x0d\x0d\x0a" + bytes(20))))


# --- eBPF encoding --------------------------------------------------------------------------

def test_instruction_encoding_matches_the_kernel_format():
    assert asm.mov64(asm.R0, 1).encode() == bytes.fromhex("b700000001000000")
    assert asm.ldx(4, asm.R7, asm.R6, 4).encode() == bytes.fromhex("6167040000000000")
    assert asm.alu32(asm.AND, asm.R4, 0xFFFFFFFF).encode() == bytes.fromhex("54040000ffffffff")
    assert asm.to_be(asm.R4, 16).encode() == bytes.fromhex("dc04000010000000")
    assert b"".join(i.encode() for i in asm.ld_map_fd(asm.R1, 7)) == bytes.fromhex(
        "1811000007000000" "0000000000000000")


def test_assembler_resolves_labels_and_drops_dead_code():
    out = asm.Assembler()
    end, unused = asm.Label("end"), asm.Label("unused")
    out.emit(asm.jmp(asm.JEQ, asm.R1, 0, end), asm.ja(end))  # the ja is a jump to the next insn
    out.place(unused)
    out.emit(asm.mov64(asm.R0, 5))                            # unreachable: dropped
    out.place(end)
    out.emit(asm.mov64(asm.R0, 2), asm.exit_insn())
    code = out.assemble()
    assert len(code) == 3 * 8
    assert code[:8] == asm.Insn(asm.JMP | asm.JEQ, 1, 0, 0, 0).encode()


def test_assembler_rejects_jump_to_unplaced_label():
    out = asm.Assembler()
    out.emit(asm.ja(asm.Label("nowhere")))
    with pytest.raises(ValueError, match="nowhere"):
        out.assemble()


# --- classic BPF analysis -------------------------------------------------------------------

def test_blocks_track_packet_bytes_already_checked():
    prog = pcap.compile_filter("ip and ip[8] < 64")  # ldh [12]; jeq #0x800; ldb [22]; jge ...
    blocks = split_blocks(prog)
    assert blocks[0].checked_out == 14
    second = blocks[2]
    assert second.checked_in == 14 and second.checked_out == 23


def test_code_after_an_impossible_load_is_unreachable():
    prog = [C(0x30, 0, 0, 70000), C(0x15, 0, 1, 1), C(0x06, 0, 0, 1), C(0x06, 0, 0, 0)]
    blocks = split_blocks(prog)
    assert list(blocks) == [0] and blocks[0].always_fails


def test_division_by_constant_zero_never_matches():
    prog = [C(0x00, 0, 0, 5), C(0x34, 0, 0, 0), C(0x16, 0, 0, 0)]
    assert split_blocks(prog)[0].always_fails


@pytest.mark.parametrize("prog, message", [
    ([], "empty"),
    ([C(0x15, 5, 0, 1), C(0x06, 0, 0, 0)], "past the end"),
    ([C(0x00, 0, 0, 1)], "does not end with a return"),
    ([C(0x61, 0, 0, 16), C(0x06, 0, 0, 0)], "scratch slot 16"),
    ([C(0xE4, 0, 0, 0), C(0x06, 0, 0, 0)], "unknown ALU"),
])
def test_malformed_programs_are_refused(prog, message):
    with pytest.raises(CbpfError, match=message):
        compiler.split_blocks(prog)


def test_translation_is_forward_only():
    code = compiler.compile_standalone(pcap.compile_filter("tcp port 80 or udp portrange 1000-2000"))
    for pos in range(0, len(code), 8):
        opcode, off = code[pos], struct.unpack_from("<h", code, pos + 2)[0]
        if opcode & 0x07 in (asm.JMP, asm.JMP32) and opcode & 0xF0 not in (asm.CALL, asm.EXIT):
            assert off >= 0
