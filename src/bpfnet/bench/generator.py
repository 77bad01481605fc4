"""The traffic generator's own rate, per backend: frames a second that reach an XDP program on the
other side of a veth (its NAPI in a thread on the other CPU, so the receiver never slows the
sender down), against plain AF_PACKET `send()` of one frame per call as the reference."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable

from bpfnet.bench.baseline import Bench
from bpfnet.bench.harness import Scenario
from bpfnet.bench.trafficgen import Backend, Flows, TrafficGenerator, live_frames_denied
from bpfnet.netns import inside

FLOWS = Flows(first_address="198.51.100.1", addresses=256)
PLAIN_SEND = "AF_PACKET send(), one frame a call"


class GeneratorBench:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.generators = {backend: bench.traffic(FLOWS) if backend is bench.backend else
                           TrafficGenerator(bench.template(), FLOWS, backend)
                           for backend in Backend if backend is not Backend.LIVE or not live_frames_denied()}

    def backend(self, backend: Backend, frames: int) -> float:
        with self.bench.xdp("xdp_count_drop"):
            return self.bench.rate(self.generators[backend], frames, self.bench.seen).value

    def plain_send(self, frames: int) -> float:
        """The reference: a Python loop of send() on an AF_PACKET socket, one frame a call."""
        packet = self.generators[Backend.PACKET]
        batch = [packet.frame(i) for i in range(FLOWS.count)]
        with self.bench.xdp("xdp_count_drop"):
            self.bench.cpu.pin_sender()
            before = self.bench.seen()
            with inside(self.bench.gen):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.bind(("g0", 0))
                start = time.perf_counter()
                for i in range(frames):
                    while True:
                        try:
                            sock.send(batch[i % len(batch)])
                            break
                        except OSError as err:  # the veth's ring was full: send it again
                            if err.errno != errno.ENOBUFS:
                                raise
                elapsed = time.perf_counter() - start
            finally:
                sock.close()
            time.sleep(0.02)
            return (self.bench.seen() - before) / elapsed / 1e6

    def close(self) -> None:
        for generator in self.generators.values():
            generator.close()


def scenarios(bench: GeneratorBench, frames: int) -> list[Scenario]:
    result = [Scenario(PLAIN_SEND, lambda: bench.plain_send(frames), note="reference")]
    notes = {Backend.LIVE: "XDP live frames: BPF_PROG_TEST_RUN, XDP_TX",
             Backend.PACKET: "AF_PACKET sendmmsg() of 1,024, qdisc bypass, frames computed once"}

    def send_with(backend: Backend) -> Callable[[], float]:
        return lambda: bench.backend(backend, frames)
    return result + [Scenario(f"{backend.value} backend", send_with(backend), note=notes[backend])
                     for backend in bench.generators]
