"""`bpfnet bench cluster`: from a write on one host to enforcement on every host of a fleet.

A fleet of N hosts (`bpfnet.testing.fleet`: namespaces, an agent process each, one three-member
etcd) takes a write through host 0's API — a ddos rule, a NetworkPolicy, a VIP's real weight —
and the time runs until every host's agent has applied it to its data plane (its app revision
reaches the write's: an agent moves its revision only after the controller wrote the maps). Every
host is polled by its own thread, so a slow host is not hidden behind the others. The same writes
against one agent on SQLite (no watch: the answer comes after its own maps are written) are the
reference. Identity numbers are derived from the labels on every host (no allocation round trip):
their rate is measured as the pure function every agent runs.
"""

from __future__ import annotations

import itertools
import secrets
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bpfnet.bench.harness import Result
from bpfnet.podnet.identity import LabelSet, allocate_identities
from bpfnet.testing.etcd import EtcdCluster
from bpfnet.testing.fleet import Fleet, Host

VIP = "10.140.0.1:80/tcp"
POLL_TIMEOUT = 30.0
WRITES = ("ddos rule", "policy", "VIP real weight")


class ClusterRig:
    """A fleet of `size` hosts on `store` ("etcd" with three members, or "sqlite" for one host)."""

    def __init__(self, size: int, store: str) -> None:
        self.prefix = "bc" + secrets.token_hex(2)
        self.fleet = Fleet(self.prefix, size, net=96, apps="ddos,lb,podnet")
        self.etcd: EtcdCluster | None = None
        self.store = store
        self.counter = itertools.count()

    def start(self) -> ClusterRig:
        self.fleet.build()
        if self.store == "etcd":
            self.etcd = EtcdCluster(3, host=self.fleet.store_address).start()
        for host in self.fleet.hosts:
            url = self.etcd.url if self.etcd else f"sqlite://{self.fleet.dir}/{host.name}.db"
            started = self.fleet.start_agent(host, url)
            if started.returncode != 0:
                raise RuntimeError(f"agent on {host.name}: {started.stdout}{started.stderr}")
        with self.fleet.client(self.fleet.hosts[0]) as client:
            client.put_object("podnet", "namespaces", "bench", {"name": "bench"})
            client.put_object("lb", "vips", VIP, {"address": VIP.split(":")[0], "port": 80})
            client.put_object("lb", "reals", f"{VIP}/10.141.0.1", {"address": "10.141.0.1"})
            revision = client.put_object("lb", "reals", f"{VIP}/10.141.0.2", {"address": "10.141.0.2"})["revision"]
        self._applied_everywhere("lb", revision)
        return self

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            if self.etcd is not None:
                self.etcd.close()

    def _applied_everywhere(self, app: str, revision: int) -> float:
        """Wait until every host applied `app` at `revision`; the monotonic time the last one did."""
        def watch(host: Host) -> float:
            deadline = time.monotonic() + POLL_TIMEOUT
            with self.fleet.client(host) as client:
                while time.monotonic() < deadline:
                    if client.health()["apps"][app]["revision"] >= revision:
                        return time.monotonic()
            raise TimeoutError(f"{host.name} did not apply {app} revision {revision} in {POLL_TIMEOUT} s")
        with ThreadPoolExecutor(len(self.fleet.hosts)) as pool:
            return max(pool.map(watch, self.fleet.hosts))

    def timed(self, app: str, write: Callable[[], int], undo: Callable[[], int] | None = None) -> float:
        """ms from sending the write to the last host applying it."""
        start = time.monotonic()
        revision = write()
        elapsed = (self._applied_everywhere(app, revision) - start) * 1000
        if undo is not None:
            self._applied_everywhere(app, undo())
        return elapsed

    def measure(self, what: str) -> float:
        n = next(self.counter)
        with self.fleet.client(self.fleet.hosts[0]) as client:
            if what == "ddos rule":
                key: dict = {}

                def add() -> int:
                    answer = client.create_object("ddos", "rules", {"expr": f"udp dst port {20000 + n % 20000}"})
                    key["rule"] = answer["key"]
                    return answer["revision"]
                return self.timed("ddos", add, lambda: client.delete_object("ddos", "rules", key["rule"])["revision"])
            if what == "policy":
                policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": f"p{n}", "namespace": "bench"},
                          "spec": {"podSelector": {"matchLabels": {"app": f"a{n}"}}, "policyTypes": ["Ingress"]}}
                return self.timed("podnet", lambda: client.put_object("podnet", "policies", f"bench/p{n}", policy)
                                  ["revision"],
                                  lambda: client.delete_object("podnet", "policies", f"bench/p{n}")["revision"])
            return self.timed("lb", lambda: client.put_object("lb", "reals", f"{VIP}/10.141.0.1",
                                                               {"address": "10.141.0.1", "weight": 1 + n % 7})
                              ["revision"])


def identity_rate(label_sets: int = 10_000) -> float:
    """Identities derived per second for `label_sets` distinct label sets (what each host runs)."""
    sets = [LabelSet.of({"app": f"a{i}", "tier": str(i % 7)}, {"ns": f"n{i % 50}"}) for i in range(label_sets)]
    start = time.perf_counter()
    allocate_identities(sets)
    return label_sets / (time.perf_counter() - start)


def run(sizes: tuple[int, ...], rounds: int, progress: Callable[[str], None]) -> list[Result]:
    """Rows: '<write>, SQLite 1 agent' (the reference of each write), then '<write>, etcd N hosts'."""
    results: list[Result] = []
    plans = [(1, "sqlite")] + [(size, "etcd") for size in sizes]
    for size, store in plans:
        progress(f"{size} host(s) on {store}: starting the agents")
        rig = ClusterRig(size, store).start()
        try:
            label = "SQLite, 1 agent" if store == "sqlite" else f"etcd, {size} host{'s' if size > 1 else ''}"
            rows = {what: Result(f"{what}: {label}", "ms") for what in WRITES}
            for round_ in range(rounds):
                for what in WRITES:  # interleaved: each round writes each kind once
                    progress(f"{label}: {what} (round {round_ + 1}/{rounds})")
                    rows[what].add(rig.measure(what))
            results += rows.values()
        finally:
            rig.close()
    rate = Result("identities derived per second (10,000 label sets, every host)", "ids/s",
                  note="a pure function of the labels: no store round trip")
    for _ in range(rounds):
        rate.add(identity_rate())
    results.append(rate)
    return results


def summary(results: list[Result]) -> str:
    """Each write's median on etcd against its SQLite reference, one line a row."""
    reference = {r.name.split(":")[0]: r.median for r in results if r.name.endswith("SQLite, 1 agent")}
    lines = []
    for r in results:
        what = r.name.split(":")[0]
        if what in reference and not r.name.endswith("SQLite, 1 agent"):
            lines.append(f"{r.name}: median {r.median:.1f} ms (p90 {_p90(r.samples):.1f}), "
                         f"{r.median / reference[what]:.1f}x the single agent on SQLite")
    return "\n".join(lines)


def _p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]
