"""Samples per second the detector sustains on one core. A benchmark, not a test.

    .venv/bin/python bench/detector_throughput.py [--windows 80] [--per-window 4000] [--json]

The sample streams are the unit tests' synthetic pools (tests/unit/test_detector_shapes.py):
scapy-built frames parsed into PacketFields. Each scenario feeds `--per-window` samples per
0.25 s window of simulated time and times observe() + decide() with the wall clock; "parse"
adds PacketFields.from_frame on the sampled 128 bytes, as the agent does per ring record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

from bpfnet.ddos.detector import Detector, DetectorConfig
from bpfnet.ddos.fingerprint import PacketFields

WINDOW = 0.25


def load_pools():
    path = Path(__file__).resolve().parent.parent / "tests" / "unit" / "test_detector_shapes.py"
    spec = importlib.util.spec_from_file_location("detector_shapes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run(name: str, mix, windows: int, per_window: int, parse: bool, attack_from: int) -> dict:
    """`mix(window_index)` -> list of (pool, share); returns samples/s over all windows."""
    detector = Detector(DetectorConfig(sample_every=100, window=WINDOW, learning_time=5 * WINDOW))
    rng = random.Random(1)
    batches = []
    for w in range(windows):
        batch = []
        for pool, share in mix(w >= attack_from):
            picks = rng.choices(range(len(pool.frames)), k=int(per_window * share))
            batch += [pool.frames[i][:128] for i in picks] if parse else [pool.fields[i] for i in picks]
        rng.shuffle(batch)
        batches.append(batch)
    start = time.perf_counter()
    events = 0
    for w, batch in enumerate(batches):
        now = (w + 1) * WINDOW
        samples = [PacketFields.from_frame(frame) for frame in batch] if parse else batch
        detector.observe(samples, now)
        events += len(detector.decide(now))
    elapsed = time.perf_counter() - start
    total = sum(len(b) for b in batches)
    return {"scenario": name, "parse": parse, "samples": total, "seconds": round(elapsed, 3),
            "samples_per_s": round(total / elapsed), "events": events,
            "rules": len(detector.status()["rules"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=80)
    parser.add_argument("--per-window", type=int, default=4000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pools = load_pools()
    legit, syn, refl = pools.legit_pool(), pools.syn_flood_pool(), pools.dns_reflection_pool(53)
    attack_from = args.windows // 2
    # Attacks add 9x the legitimate volume in the second half (90% of the samples then).
    scenarios = {
        "normal traffic": lambda attacked: [(legit, 1.0)],
        "syn flood": lambda attacked: [(legit, 0.1), (syn, 0.9)] if attacked else [(legit, 0.1)],
        "udp reflection, random ports": lambda attacked: ([(legit, 0.1), (refl, 0.9)] if attacked
                                                          else [(legit, 0.1)]),
    }
    results = [run(name, mix, args.windows, args.per_window, parse, attack_from)
               for name, mix in scenarios.items() for parse in (False, True)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'scenario':<32} {'parse':>5} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'rules':>5}")
    for r in results:
        print(f"{r['scenario']:<32} {str(r['parse']):>5} {r['samples']:>8} {r['seconds']:>8} "
              f"{r['samples_per_s']:>10} {r['rules']:>5}")


if __name__ == "__main__":
    main()
