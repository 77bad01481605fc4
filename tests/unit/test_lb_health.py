"""Health tracking (rise/fall with the clock passed in) and the probes, against loopback servers."""

import ipaddress
import socket
import threading

import pytest

from bpfnet.lb.config import HealthCheck, LbState
from bpfnet.lb.health import HealthTracker, probe

REAL = ipaddress.ip_address("10.0.0.1")
TARGET = ("10.200.0.1:80/tcp", REAL)


def state(check=None, reals=("10.0.0.1", "10.0.0.2")):
    return LbState.model_validate({"vips": [
        {"address": "10.200.0.1", "port": 80, "reals": [{"address": a} for a in reals],
         "health_check": check or {"kind": "tcp", "interval": 1, "rise": 2, "fall": 3}},
        {"address": "10.200.0.2", "port": 80, "reals": [{"address": "10.0.0.9"}]}]})


def test_sync_tracks_checked_vips_only():
    tracker = HealthTracker()
    tracker.sync(state(), now=0)
    assert set(tracker.targets) == {TARGET, ("10.200.0.1:80/tcp", ipaddress.ip_address("10.0.0.2"))}
    tracker.sync(state(reals=("10.0.0.2",)), now=1)
    assert TARGET not in tracker.targets


def test_fall_and_rise_counts():
    tracker = HealthTracker()
    tracker.sync(state(), now=0)
    assert {t for t, _ in tracker.due(0)} == set(tracker.targets)
    assert tracker.due(0) == []  # in flight
    changes = [tracker.record(TARGET, False, "refused", now) for now in (1, 2)]
    assert changes == [False, False] and TARGET not in tracker.down()
    assert tracker.record(TARGET, False, "refused", 3) is True  # third failure in a row
    assert tracker.down() == {TARGET}
    assert tracker.record(TARGET, True, None, 4) is False
    assert tracker.record(TARGET, False, "refused", 5) is False  # a failure resets the rise streak
    assert tracker.record(TARGET, True, None, 6) is False
    assert tracker.record(TARGET, True, None, 7) is True
    assert tracker.down() == frozenset()
    assert tracker.targets[TARGET].changes == 2


def test_next_probe_waits_for_the_interval():
    tracker = HealthTracker()
    tracker.sync(state(), now=0)
    tracker.due(0)
    tracker.record(TARGET, True, None, now=10)
    assert TARGET not in {t for t, _ in tracker.due(10.5)}
    assert TARGET in {t for t, _ in tracker.due(11)}


def test_changed_check_starts_over():
    tracker = HealthTracker()
    tracker.sync(state(), now=0)
    for now in (1, 2, 3):
        tracker.record(TARGET, False, "x", now)
    assert TARGET in tracker.down()
    tracker.sync(state({"kind": "http", "interval": 1}), now=4)
    assert TARGET not in tracker.down()


def test_result_for_a_removed_target_is_ignored():
    tracker = HealthTracker()
    assert tracker.record(TARGET, False, "x", 1) is False


@pytest.fixture
def tcp_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    replies = {"/ok": b"HTTP/1.0 200 OK\r\n\r\nfine", "/bad": b"HTTP/1.0 503 Unavailable\r\n\r\n"}

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    request = conn.recv(1024).split(b" ")
                except OSError:
                    continue
                if len(request) > 1:
                    conn.sendall(replies.get(request[1].decode(), b"garbage\r\n"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()


LOCAL = ipaddress.ip_address("127.0.0.1")


def test_tcp_probe(tcp_server):
    assert probe(HealthCheck(kind="tcp"), LOCAL, tcp_server) == (True, None)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    ok, error = probe(HealthCheck(kind="tcp", timeout=1), LOCAL, closed_port)
    assert not ok and "ConnectionRefusedError" in error


def test_http_probe(tcp_server):
    assert probe(HealthCheck(kind="http", path="/ok"), LOCAL, tcp_server) == (True, None)
    assert probe(HealthCheck(kind="http", path="/bad"), LOCAL, tcp_server) == (False, "HTTP 503")
    assert probe(HealthCheck(kind="http", path="/other"), LOCAL, tcp_server) == (False, "no HTTP status line")


def test_udp_probe():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer():
            data, peer = server.recvfrom(100)
            server.sendto(b"pong:" + data, peer)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert probe(HealthCheck(kind="udp", send="ping", expect="pong", timeout=2), LOCAL, port) == (True, None)
        thread.join()
        ok, error = probe(HealthCheck(kind="udp", timeout=0.2), LOCAL, port)  # nobody answers now
        assert not ok and "timed out" in error
