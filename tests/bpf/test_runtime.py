"""The runtime binding against the kernel: objects, constants, maps, test runs, attach, pins."""

import ctypes
import os
import socket
import struct
import subprocess
import uuid

import pytest

from bpfnet.ebpf import (
    POSSIBLE_CPUS,
    AttachType,
    BpfError,
    LayoutError,
    Map,
    MapType,
    ObjectSpec,
    Program,
    ProgType,
    VerifierError,
    cgroup2_root,
    pins,
)
from bpfnet.ebpf.ringbuf import RingBuffer

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2
FRAME = bytes(range(64))


@pytest.fixture
def check():
    with ObjectSpec.builtin("runtime_check").load() as obj:
        yield obj


def test_constants_change_the_program_before_load():
    spec = ObjectSpec.builtin("runtime_check")
    spec.constants["verdict"] = XDP_DROP
    with spec.load() as obj:
        assert obj.programs["xdp_check"].test_run(FRAME).retval == XDP_DROP
    with ObjectSpec.builtin("runtime_check").load() as obj:
        assert obj.programs["xdp_check"].test_run(FRAME).retval == XDP_PASS


def test_unknown_constant_and_map_are_named():
    spec = ObjectSpec.builtin("runtime_check")
    spec.constants["nope"] = 1
    with pytest.raises(KeyError, match="nope.*constants: marker, verdict"):
        spec.load()
    spec = ObjectSpec.builtin("runtime_check")
    spec.set_max_entries("missing", 4)
    with pytest.raises(KeyError, match="no map 'missing'"):
        spec.load()


def test_max_entries_is_applied():
    spec = ObjectSpec.builtin("runtime_check")
    spec.set_max_entries("table", 7)
    with spec.load() as obj:
        assert obj.maps["table"].max_entries == 7


def test_test_run_returns_data_and_per_cpu_counters(check):
    program = check.programs["xdp_check"]
    result = program.test_run(FRAME, repeat=5)
    assert (result.retval, result.data) == (XDP_PASS, FRAME)
    per_cpu = check.maps["packets"].lookup(struct.pack("<I", 0))
    assert len(per_cpu) == POSSIBLE_CPUS
    assert sum(struct.unpack("<Q", v)[0] for v in per_cpu) == 5


def test_ring_buffer_delivers_every_record(check):
    spec_marker = 0xABCDEF
    spec = ObjectSpec.builtin("runtime_check")
    spec.constants["marker"] = spec_marker
    with spec.load() as obj, RingBuffer(obj.maps["events"]) as ring:
        for size in (60, 61, 62):
            obj.programs["xdp_check"].test_run(bytes(size))
        records = ring.poll(100)
        assert [struct.unpack("<QI", r[:12]) for r in records] == [(spec_marker, n) for n in (60, 61, 62)]
        assert ring.consume() == []


def test_map_operations_and_batches(check):
    table = check.maps["table"]
    key = lambda i: struct.pack("<I", i)  # noqa: E731
    value = lambda i: struct.pack("<Q", i * 10)  # noqa: E731
    table.update(key(1), value(1))
    assert table.lookup(key(1)) == value(1)
    assert table.lookup(key(2)) is None
    table.update_batch([key(i) for i in range(2, 102)], [value(i) for i in range(2, 102)])
    assert dict(table.items_batch(chunk=16)) == {key(i): value(i) for i in range(1, 102)}
    assert sorted(table.keys()) == sorted(key(i) for i in range(1, 102))
    table.delete_batch([key(i) for i in range(2, 102)])
    assert list(table.keys()) == [key(1)]
    assert table.delete(key(1)) and not table.delete(key(1))
    with pytest.raises(BpfError, match="update of map table"):
        table.update(key(1), value(1), flags=2)  # BPF_EXIST on a missing key
    with pytest.raises(LayoutError, match="key is 2 bytes, the map wants 4"):
        table.lookup(b"ab")


def test_typed_map_checks_sizes(check):
    class Key(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint32)]

    class Value(ctypes.Structure):
        _fields_ = [("count", ctypes.c_uint64)]

    class Wrong(ctypes.Structure):
        _fields_ = [("count", ctypes.c_uint32)]

    typed = check.maps["table"].typed(Key, Value)
    typed.update(Key(3), Value(33))
    assert typed.lookup(Key(3)).count == 33
    assert [(k.id, v.count) for k, v in typed.items()] == [(3, 33)]
    with pytest.raises(LayoutError, match="value 4 bytes.*value 8"):
        check.maps["table"].typed(Key, Wrong)


def test_queue_map_and_created_maps():
    with Map.create(MapType.QUEUE, 0, 4, 8, name="q") as queue:
        for i in range(3):
            queue.push(struct.pack("<I", i))
        assert [queue.pop() for _ in range(4)] == [struct.pack("<I", i) for i in range(3)] + [None]


def test_load_raw_and_verifier_error():
    # r0 = 1 (XDP_DROP); exit
    insns = struct.pack("<BBhi", 0xB7, 0, 0, XDP_DROP) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    with Program.load_raw(ProgType.XDP, insns, name="drop") as program:
        assert program.test_run(FRAME).retval == XDP_DROP
    with pytest.raises(VerifierError, match="R0 !read_ok") as info:
        Program.load_raw(ProgType.XDP, struct.pack("<BBhi", 0x95, 0, 0, 0), name="bad")
    assert "loading program 'bad'" in str(info.value)


def test_pins_and_reuse_of_pinned_maps(check):
    directory = pins.pin_dir("test-runtime", uuid.uuid4().hex[:8])
    try:
        with ObjectSpec.builtin("runtime_check").load(pin_dir=directory) as first:
            first.maps["table"].update(struct.pack("<I", 9), struct.pack("<Q", 99))
        assert (directory / "table").exists()
        with ObjectSpec.builtin("runtime_check").load(pin_dir=directory) as second:
            assert second.maps["table"].lookup(struct.pack("<I", 9)) == struct.pack("<Q", 99)
        spec = ObjectSpec.builtin("runtime_check")
        spec.set_max_entries("table", 5)
        with pytest.raises(LayoutError, match="map table"):
            spec.load(pin_dir=directory)
        assert Map.from_pin(directory / "table").key_size == 4
    finally:
        pins.unpin(directory.parent)


@pytest.fixture
def veth():
    name = f"rt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    subprocess.run(["ip", "link", "set", name + "p", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_attach_xdp_tcx_and_atomic_replace(check, veth):
    ifindex = socket.if_nametoindex(veth)
    program = check.programs["xdp_check"]
    with program.attach_xdp(ifindex) as link:
        shown = subprocess.run(["ip", "link", "show", veth], capture_output=True, text=True).stdout
        assert "xdp" in shown
        with ObjectSpec.builtin("bench_sink").load() as sink:
            link.update(sink.programs["xdp_drop"])
            assert link.program_id == sink.programs["xdp_drop"].id
    assert "xdp" not in subprocess.run(["ip", "link", "show", veth], capture_output=True, text=True).stdout
    with check.programs["tc_check"].attach_tcx(ifindex, "ingress"):
        pass
    with pytest.raises(ValueError, match="'sideways'"):
        program.attach_tcx(ifindex, "sideways")


def test_pinned_link_outlives_its_fd(check, veth):
    ifindex = socket.if_nametoindex(veth)
    directory = pins.pin_dir("test-runtime", uuid.uuid4().hex[:8])
    try:
        link = check.programs["xdp_check"].attach_xdp(ifindex)
        link.pin(directory / "link")
        link.close()
        assert "xdp" in subprocess.run(["ip", "link", "show", veth], capture_output=True, text=True).stdout
        os.unlink(directory / "link")
    finally:
        pins.unpin(directory.parent)


def test_attach_cgroup(check, tmp_path):
    group = cgroup2_root() / f"bpfnet-test-{uuid.uuid4().hex[:6]}"
    group.mkdir()
    try:
        with check.programs["connect4_check"].attach_cgroup(group, AttachType.CGROUP_INET4_CONNECT):
            pass
    finally:
        group.rmdir()
