"""Every store backend keeps the semantics the agent relies on: commits are compare-and-swap on the
app's and each object's revision and all-or-nothing, revisions only grow, objects keep their order
and strict JSON, the audit log is newest first and bounded, and a watch tells every commit in order.
The same tests run on SQLite and on a real etcd member on loopback (started here, removed after);
the etcd-only tests below them kill and stop members of a three-member cluster."""

from __future__ import annotations

import base64
import contextlib
import math
import socket
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from bpfnet.agent.store import (
    AuditEntry,
    Changes,
    Resync,
    RevisionConflict,
    SQLiteStore,
    StoredObject,
    StoreError,
    open_store,
)
from bpfnet.agent.store_etcd import EtcdStore, StoreUnreachable
from bpfnet.app.objects import Obj
from bpfnet.testing.etcd import EtcdCluster

WAIT = 10.0  # seconds a watch has to deliver what a test waits for


def entry(app="lb", outcome="applied", summary="s", time=100.0):
    return AuditEntry(time=time, who="uid=0 pid=1", app=app, outcome=outcome, summary=summary)


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    """(kind, make) where make(**options) opens a store of that kind on one fresh keyspace."""
    kind = request.param
    opened = []
    prefix = f"/test/{uuid.uuid4().hex}"

    def make(**options):
        if kind == "sqlite":
            store = SQLiteStore(tmp_path / "state.db", **options)
        else:
            store = EtcdStore(request.getfixturevalue("etcd").endpoints, prefix=prefix, **options)
        opened.append(store)
        return store

    yield kind, make
    for store in opened:
        store.close()


@pytest.fixture
def store(backend):
    return backend[1]()


def objects_of(store, app="lb"):
    state = store.load(app)
    return {key: (o.value, o.order, o.revision) for key, o in state.objects.items()} if state else None


class Recorder:
    """A watch callback that keeps what it is told and lets a test wait for it."""

    def __init__(self):
        self.events = []
        self.changed = threading.Condition()

    def __call__(self, event):
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_for(self, revision, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self.events or self.events[-1].revision < revision:
                left = deadline - time.monotonic()
                assert left > 0, f"no event of revision {revision} within {timeout} s: {self.events}"
                self.changed.wait(left)
        return self.events


def follow(events, start=None):
    """The objects a watcher knows after these events: {key: StoredObject}."""
    known = dict(start or {})
    for event in events:
        if isinstance(event, Resync):
            known = dict(event.state.objects) if event.state else {}
            continue
        for key, obj in event.objects.items():
            if obj is None:
                known.pop(key, None)
            else:
                known[key] = obj
    return known


# -- commits ------------------------------------------------------------------------------------

def test_commits_take_growing_revisions_and_every_written_object_gets_the_commit_revision(store):
    assert store.load("lb") is None
    r1 = store.commit("lb", {"settings": Obj({"a": 1}, 0.0), "vips/x": Obj({"port": 1}, 0.0)}, [], entry(),
                      expected_revision=0)
    r2 = store.commit("lb", {"vips/y": Obj({"port": 2}, 1.5)}, [], entry(time=101.0), expected_revision=r1)
    r3 = store.commit("lb", {}, ["vips/x"], entry(time=102.0), expected_revision=r2)  # delete-only moves it too
    assert 0 < r1 < r2 < r3
    loaded = store.load("lb")
    assert (loaded.revision, loaded.updated_at) == (r3, 102.0)
    assert loaded.objects == {"settings": StoredObject({"a": 1}, 0.0, r1), "vips/y": StoredObject({"port": 2}, 1.5, r2)}
    assert loaded.revision >= max(o.revision for o in loaded.objects.values())


def test_a_stale_app_revision_is_a_conflict_that_changes_nothing(store):
    r1 = store.commit("lb", {"settings": Obj({"a": 1}, 0.0)}, [], entry(summary="first"), expected_revision=0)
    with pytest.raises(RevisionConflict, match=f"^state of lb is at revision {r1}, not 0$") as err:
        store.commit("lb", {"settings": Obj({"a": 2}, 0.0), "vips/x": Obj({}, 0.0)}, [], entry(summary="lost"),
                     expected_revision=0)
    assert err.value.key is None  # the app moved on, not one object: the agent reads it again and redoes
    assert objects_of(store) == {"settings": ({"a": 1}, 0.0, r1)}
    assert store.load("lb").revision == r1
    assert [e.summary for e in store.audit()] == ["first"]  # the refused commit left no audit entry


def test_each_expected_object_is_compared_on_its_own_revision(store):
    ra = store.commit("lb", {"vips/a": Obj({"n": 1}, 0.0)}, [], entry(), expected={"vips/a": 0})
    rb = store.commit("lb", {"vips/b": Obj({"n": 1}, 1.0)}, [], entry(), expected={"vips/b": 0})
    # a writer of vips/a based on its revision is not disturbed by the write of vips/b
    ra2 = store.commit("lb", {"vips/a": Obj({"n": 2}, 0.0)}, [], entry(), expected={"vips/a": ra})
    with pytest.raises(RevisionConflict, match=f"^lb object vips/a is at revision {ra2}, not {ra}: read it again$") \
            as err:
        store.commit("lb", {"vips/a": Obj({"n": 3}, 0.0)}, [], entry(), expected={"vips/a": ra})
    assert err.value.key == "vips/a"  # the agent answers 412 naming it
    with pytest.raises(RevisionConflict, match=rf"^lb object vips/b already exists \(revision {rb}\)$"):
        store.commit("lb", {"vips/b": Obj({"n": 3}, 0.0)}, [], entry(), expected={"vips/b": 0})
    with pytest.raises(RevisionConflict, match=r"^lb has no object vips/c \(it was expected at revision 4\)$"):
        store.commit("lb", {}, ["vips/c"], entry(), expected={"vips/c": 4})
    assert objects_of(store) == {"vips/a": ({"n": 2}, 0.0, ra2), "vips/b": ({"n": 1}, 1.0, rb)}
    assert store.load("lb").revision == ra2


def test_a_failed_compare_writes_nothing_at_all(store):
    r1 = store.commit("lb", {"vips/a": Obj({"n": 1}, 0.0), "vips/b": Obj({"n": 1}, 1.0)}, [], entry(summary="one"))
    before = objects_of(store)
    # the first expectation holds, the second does not: no put, no delete, no audit entry, same revision
    with pytest.raises(RevisionConflict, match="lb object vips/b is at revision"):
        store.commit("lb", {"vips/a": Obj({"n": 9}, 0.0), "vips/new": Obj({"n": 9}, 2.0)}, ["vips/b"],
                     entry(summary="two"), expected={"vips/a": r1, "vips/b": r1 + 1000})
    assert objects_of(store) == before
    assert store.load("lb").revision == r1
    assert [e.summary for e in store.audit(app="lb")] == ["one"]


def test_apps_are_apart(store):
    r_lb = store.commit("lb", {"settings": Obj({"lb": True}, 0.0)}, [], entry())
    r_ddos = store.commit("ddos", {"settings": Obj({"ddos": True}, 0.0)}, [], entry(app="ddos"))
    # revisions grow per app (SQLite counts each app apart, etcd has one counter for all)
    assert objects_of(store, "lb") == {"settings": ({"lb": True}, 0.0, r_lb)}
    assert objects_of(store, "ddos") == {"settings": ({"ddos": True}, 0.0, r_ddos)}
    assert store.load("lb").revision == r_lb  # another app's commit does not move lb's revision
    with pytest.raises(StoreError, match="app name 'a/b' cannot be stored"):
        store.commit("a/b", {}, [], entry(app="a/b"))


def test_objects_keep_their_order_values_and_keys_exactly(store):
    orders = [0.0, 1e-9, 0.5, 2.25, -3.0, 1e300]
    puts = {f"rules/{i}": Obj({"i": i, "nested": {"list": [1, "two", None, 3.5]}, "u": "é ☃"}, order)
            for i, order in enumerate(orders)}
    puts["pods/shop/db"] = Obj({"name": "db"}, 7.0)
    puts["reals/10.0.0.1:80/tcp/10.1.0.2"] = Obj({"address": "10.1.0.2"}, 0.0)
    revision = store.commit("lb", puts, [], entry())
    loaded = store.load("lb").objects
    assert {key: (o.value, o.order, o.revision) for key, o in loaded.items()} == \
        {key: (o.value, o.order, revision) for key, o in puts.items()}
    ranked = sorted((o.order, key) for key, o in loaded.items() if key.startswith("rules/"))
    assert [key for _, key in ranked] == ["rules/4", "rules/0", "rules/1", "rules/2", "rules/3", "rules/5"]


def test_many_commits_keep_strictly_growing_revisions(store):
    seen = [store.commit("lb", {f"rules/{i}": Obj({"i": i}, float(i))}, [], entry()) for i in range(30)]
    assert seen == sorted(set(seen))
    assert store.load("lb").revision == seen[-1]
    assert {key: o.revision for key, o in store.load("lb").objects.items()} == \
        {f"rules/{i}": seen[i] for i in range(30)}


def test_racing_writers_of_one_object_one_wins_and_writers_of_others_all_win(backend):
    """Several store objects on one store (two agents) and several threads each: creating the same
    key with expected 0 succeeds once; distinct keys never conflict."""
    _kind, make = backend
    stores = [make(), make()]
    wins, conflicts, failures = [], [], []

    def writer(n):
        store = stores[n % 2]
        try:
            wins.append(store.commit("lb", {"vips/same": Obj({"n": n}, 0.0)}, [], entry(), expected={"vips/same": 0}))
        except RevisionConflict as err:
            conflicts.append(str(err))
        try:
            store.commit("lb", {f"reals/x/{n}": Obj({"n": n}, float(n))}, [], entry(),
                         expected={f"reals/x/{n}": 0})
        except Exception as err:
            failures.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(wins), len(conflicts), failures) == (1, 15, [])
    assert all("lb object vips/same already exists" in c for c in conflicts)  # (each names the key)
    loaded = stores[0].load("lb")
    assert loaded.objects["vips/same"].revision == wins[0]
    assert {key for key in loaded.objects if key.startswith("reals/")} == {f"reals/x/{n}" for n in range(16)}
    assert len({o.revision for o in loaded.objects.values()}) == 17  # one commit each
    assert len(stores[1].audit(limit=100)) == 17


# -- strict JSON ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_values_are_strict_json_and_a_refused_value_writes_nothing(store, bad):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        store.commit("lb", {"settings": Obj({"ok": 1}, 0.0), "rules/1": Obj({"rate": bad}, 0.0)}, [], entry())
    assert store.load("lb") is None
    assert store.audit() == []


def corrupt(kind, store, app, key, raw: bytes):
    """Write `raw` as the stored value of object `key`, as a broken or foreign writer would."""
    if kind == "sqlite":
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE objects SET value = ? WHERE app = ? AND key = ?",
                       (raw.decode(errors="replace"), app, key))
        return
    httpx.post(f"http://{store.endpoints[0].partition('://')[2]}/v3/kv/put",
               json={"key": base64.b64encode(f"{store.prefix}apps/{app}/objects/{key}".encode()).decode(),
                     "value": base64.b64encode(raw).decode()}).raise_for_status()


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "is not valid JSON"),
    (b'{"value": {"rate": NaN}, "order": 0}', "is not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
])
def test_a_stored_value_that_is_not_a_json_object_is_an_error_naming_app_key_and_revision(backend, raw, words):
    kind, make = backend
    store = make()
    store.commit("lb", {"rules/7": Obj({"ok": 1}, 0.0)}, [], entry())
    if kind == "sqlite" and raw.startswith(b'{"value"'):
        raw = b'{"rate": NaN}'  # SQLite keeps the value itself, etcd the envelope with the order
    corrupt(kind, store, "lb", "rules/7", raw)
    with pytest.raises(StoreError) as err:
        store.load("lb")
    message = str(err.value)
    assert words in message and "state of lb (revision " in message and "rules/7" in message


# -- audit ---------------------------------------------------------------------------------------

def test_audit_is_newest_first_filtered_limited_and_carries_the_commit_revision(store):
    revision = store.commit("lb", {"settings": Obj({}, 0.0)}, [], entry(summary="first"))
    store.record(entry(outcome="invalid", summary="second"))
    store.record(entry(app="ddos", outcome="refused", summary="third"))
    assert [e.summary for e in store.audit()] == ["third", "second", "first"]  # same time: store order decides
    assert [e.summary for e in store.audit(app="lb")] == ["second", "first"]
    assert [e.summary for e in store.audit(limit=1)] == ["third"]
    assert store.audit(limit=0) == []
    assert store.audit(app="podnet") == []
    first = store.audit(app="lb")[1]
    assert (first.revision, first.outcome, first.who, first.time) == (revision, "applied", "uid=0 pid=1", 100.0)
    assert store.audit(app="lb")[0].revision is None


def test_audit_retention_keeps_the_newest_entries(backend):
    kind, make = backend
    options = {"audit_retention": 3} | ({"audit_trim_every": 1} if kind == "etcd" else {})
    store = make(**options)
    for i in range(8):
        store.record(entry(summary=f"e{i}"))
    kept = [e.summary for e in store.audit(limit=100, app="lb")]
    assert kept[:3] == ["e7", "e6", "e5"] and len(kept) <= 4  # etcd trims after the write: one more at most
    store.record(entry(summary="e8"))
    assert [e.summary for e in store.audit(limit=100, app="lb")][:3] == ["e8", "e7", "e6"]
    assert len(store.audit(limit=100, app="lb")) <= 4


# -- watch ---------------------------------------------------------------------------------------

def test_a_watch_tells_every_commit_in_order_with_its_revision(store):
    base = store.commit("lb", {"settings": Obj({"a": 0}, 0.0)}, [], entry())
    other = Recorder()
    recorder = Recorder()
    with store.watch("lb", base, recorder), store.watch("ddos", 0, other):
        revisions = []
        for i in range(12):
            puts = {f"rules/{i}": Obj({"i": i}, float(i))}
            deletes = [f"rules/{i - 2}"] if i % 3 == 2 else []
            revisions.append(store.commit("lb", puts, deletes, entry()))
        revisions.append(store.commit("lb", {}, ["rules/0"], entry()))  # delete-only (rules/0 was deleted already)
        store.commit("ddos", {"settings": Obj({"d": 1}, 0.0)}, [], entry(app="ddos"))
        events = recorder.wait_for(revisions[-1])
    assert all(isinstance(e, Changes) and e.app == "lb" for e in events)
    assert [e.revision for e in events] == revisions
    assert events[0].objects == {"rules/0": StoredObject({"i": 0}, 0.0, revisions[0])}
    assert events[2].objects == {"rules/2": StoredObject({"i": 2}, 2.0, revisions[2]), "rules/0": None}
    loaded = store.load("lb")
    assert follow(events, {"settings": loaded.objects["settings"]}) == loaded.objects
    assert all(e.app == "ddos" for e in other.events)  # lb's commits never reach a ddos watch


def test_a_watch_from_an_older_revision_catches_up_to_the_stored_state(store):
    r1 = store.commit("lb", {"rules/1": Obj({"n": 1}, 0.0)}, [], entry())
    store.commit("lb", {"rules/2": Obj({"n": 2}, 1.0)}, [], entry())
    r3 = store.commit("lb", {}, ["rules/1"], entry())
    recorder = Recorder()
    with store.watch("lb", r1, recorder) as watch:
        events = recorder.wait_for(r3)
        assert watch.revision == r3
    # etcd replays the commits after r1; SQLite, which keeps no history, sends a Resync
    assert follow(events, {"rules/1": StoredObject({"n": 1}, 0.0, r1)}) == store.load("lb").objects


def test_a_stopped_watch_tells_nothing_more(store):
    recorder = Recorder()
    watch = store.watch("lb", 0, recorder)
    first = store.commit("lb", {"settings": Obj({}, 0.0)}, [], entry())
    recorder.wait_for(first)
    watch.stop()
    store.commit("lb", {"settings": Obj({"x": 1}, 0.0)}, [], entry())
    time.sleep(0.3)
    assert [e.revision for e in recorder.events] == [first]


def test_a_callback_that_raises_does_not_stop_the_watch(store):
    seen = []

    def callback(event):
        seen.append(event.revision)
        if len(seen) == 1:
            raise RuntimeError("boom")

    with store.watch("lb", 0, callback):
        store.commit("lb", {"settings": Obj({}, 0.0)}, [], entry())
        last = store.commit("lb", {"settings": Obj({"x": 1}, 0.0)}, [], entry())
        deadline = time.monotonic() + WAIT
        while last not in seen and time.monotonic() < deadline:
            time.sleep(0.02)
    assert seen[-1] == last and len(seen) == 2


# -- store URLs ----------------------------------------------------------------------------------

def test_open_store_by_url(tmp_path, etcd):
    for url in (str(tmp_path / "a.db"), f"sqlite://{tmp_path}/b.db"):
        store = open_store(url)
        assert isinstance(store, SQLiteStore) and store.url.startswith(f"sqlite://{tmp_path}/")
        store.close()
    store = open_store(f"etcd://{etcd.endpoints[0]},127.0.0.1:1/custom/prefix")
    assert isinstance(store, EtcdStore)
    assert (store.endpoints, store.prefix) == ([f"http://{etcd.endpoints[0]}", "http://127.0.0.1:1"], "/custom/prefix/")
    assert store.url == f"etcd://{etcd.endpoints[0]},127.0.0.1:1/custom/prefix"
    store.close()
    assert open_store(f"etcd://{etcd.endpoints[0]}").url == f"etcd://{etcd.endpoints[0]}"


@pytest.mark.parametrize("url, words", [
    ("redis://h:1", "unknown scheme 'redis'"),
    ("sqlite://relative.db", "sqlite wants an absolute path"),
    ("etcd://", "no etcd endpoint given"),
    ("etcd://host", "is not host:port"),
    ("etcd://host:99999", "is not host:port"),
    ("etcd://https://h:1", "is not host:port"),
])
def test_a_bad_store_url_is_refused_naming_the_problem(url, words):
    with pytest.raises(StoreError, match=words):
        open_store(url)


# -- etcd only: history, members that die --------------------------------------------------------

def test_etcd_a_watch_from_a_compacted_revision_resyncs_then_goes_on(etcd):
    store = EtcdStore(etcd.endpoints, prefix=f"/test/{uuid.uuid4().hex}")
    try:
        r1 = store.commit("lb", {"rules/1": Obj({"n": 1}, 0.0)}, [], entry())
        store.commit("lb", {"rules/2": Obj({"n": 2}, 1.0)}, [], entry())
        r3 = store.commit("lb", {}, ["rules/1"], entry())
        store.compact(r3)
        recorder = Recorder()
        with store.watch("lb", r1, recorder):
            r4 = store.commit("lb", {"rules/4": Obj({"n": 4}, 2.0)}, [], entry())
            events = recorder.wait_for(r4)
        resync = events[0]
        assert isinstance(resync, Resync) and f"compacted the changes before revision {r3}" in resync.reason
        assert resync.revision >= r3
        assert set(resync.state.objects) >= {"rules/2"} and "rules/1" not in resync.state.objects
        assert [type(e) for e in events[1:]] == [Changes] * (len(events) - 1)
        assert follow(events) == store.load("lb").objects
    finally:
        store.close()


def test_etcd_a_commit_over_its_transaction_limit_is_refused_naming_the_flag_and_writes_nothing(etcd):
    store = EtcdStore(etcd.endpoints, prefix=f"/test/{uuid.uuid4().hex}")
    try:
        puts = {f"rules/{i}": Obj({"i": i}, float(i)) for i in range(200)}
        with pytest.raises(StoreError, match=r"refused the commit to ddos: etcdserver: too many operations in txn "
                                             r"request \(.*--max-txn-ops, default 128\)"):
            store.commit("ddos", puts, [], entry(app="ddos"), expected_revision=0)
        assert store.load("ddos") is None and store.audit() == []
        assert store.commit("ddos", dict(list(puts.items())[:120]), [], entry(app="ddos"), expected_revision=0)
    finally:
        store.close()


@pytest.fixture
def cluster():
    with EtcdCluster(3) as three:
        yield three


def test_etcd_one_member_killed_writes_go_on_and_nothing_is_lost(cluster):
    store = EtcdStore(cluster.endpoints, timeout=2.0)
    recorder = Recorder()
    try:
        written = {}
        with store.watch("lb", 0, recorder):
            for i in range(5):
                written[f"rules/{i}"] = store.commit("lb", {f"rules/{i}": Obj({"i": i}, float(i))}, [], entry())
            cluster.kill(0)  # the member every request went to first
            for i in range(5, 10):
                written[f"rules/{i}"] = store.commit("lb", {f"rules/{i}": Obj({"i": i}, float(i))}, [], entry())
            events = recorder.wait_for(written["rules/9"])
        assert {key: o.revision for key, o in store.load("lb").objects.items()} == written
        assert [e.revision for e in events] == sorted(written.values())  # the watch moved to a live member
        cluster.start_member(0)
        alone = EtcdStore([cluster.endpoints[0]])  # the member that was away has caught up
        deadline = time.monotonic() + WAIT
        while (state := alone.load("lb")) is None or len(state.objects) < 10:
            assert time.monotonic() < deadline, "the restarted member did not catch up"
            time.sleep(0.05)
        assert {key: o.revision for key, o in state.objects.items()} == written
        alone.close()
    finally:
        store.close()


def test_etcd_all_members_stopped_is_a_clear_error_then_the_same_store_works_again(cluster):
    store = EtcdStore(cluster.endpoints, timeout=2.0, retry_for=1.0)
    recorder = Recorder()
    try:
        r1 = store.commit("lb", {"settings": Obj({"a": 1}, 0.0)}, [], entry())
        with store.watch("lb", r1, recorder) as watch:
            for index in range(3):
                cluster.stop(index)
            for call in (lambda: store.load("lb"), lambda: store.audit(),
                         lambda: store.commit("lb", {"settings": Obj({"a": 2}, 0.0)}, [], entry()),
                         lambda: store.record(entry())):
                started = time.monotonic()
                with pytest.raises(StoreUnreachable) as err:
                    call()
                assert 1.0 <= time.monotonic() - started < 3.0  # tried the members for retry_for, no longer
                message = str(err.value)
                assert message.startswith(f"the store at {store.url} is unreachable")
                assert all(endpoint in message for endpoint in cluster.endpoints)
            deadline = time.monotonic() + WAIT
            while watch.error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert watch.error is not None  # the watch says why it is not hearing anything
            for index in range(3):
                cluster.start_member(index, wait=False)
            for index in range(3):
                cluster.wait_healthy(index)
            r2 = store.commit("lb", {"settings": Obj({"a": 2}, 0.0)}, [], entry(), expected_revision=r1)
            events = recorder.wait_for(r2)
        assert [e.revision for e in events] == [r2]
        assert store.load("lb").objects["settings"] == StoredObject({"a": 2}, 0.0, r2)
    finally:
        store.close()


def test_etcd_members_that_hang_give_a_timeout_error_within_a_bound_then_work_again(cluster):
    store = EtcdStore(cluster.endpoints, timeout=0.5, retry_for=0.5)
    try:
        r1 = store.commit("lb", {"settings": Obj({"a": 1}, 0.0)}, [], entry())
        for index in range(3):
            cluster.pause(index)  # connections are accepted by the kernel, nothing answers
        for call in (lambda: store.load("lb"),
                     lambda: store.commit("lb", {"settings": Obj({"a": 2}, 0.0)}, [], entry(), expected_revision=r1)):
            started = time.monotonic()
            with pytest.raises(StoreUnreachable, match="is unreachable .*timed out") as err:
                call()
            assert time.monotonic() - started < 8.0, err.value  # (members + 1) x timeout + retry_for, at most
        for index in range(3):
            cluster.resume(index)
        # the commit that timed out may have been saved when the members ran again: read, then write
        state = store.load("lb")
        r2 = store.commit("lb", {"settings": Obj({"a": 3}, 0.0)}, [], entry(), expected_revision=state.revision)
        assert store.load("lb").objects["settings"] == StoredObject({"a": 3}, 0.0, r2)
    finally:
        store.close()


class AnswerDroppingProxy:
    """A TCP relay to one etcd member that passes every request on but, for transactions, closes
    the client's connection instead of passing the answer back: a write applied whose answer is lost."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            txn = threading.Event()
            threading.Thread(target=self._requests, args=(client, server, txn), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, txn), daemon=True).start()

    def _requests(self, client, server, txn):
        try:
            while data := client.recv(65536):
                if data.startswith(b"POST /v3/kv/txn "):
                    txn.set()
                server.sendall(data)
        except OSError:
            pass

    def _answers(self, server, client, txn):
        try:
            while data := server.recv(65536):
                if txn.is_set():
                    self.dropped += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        for sock in (client, server):  # shutdown first: a recv blocked in the other thread holds the socket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        self.listener.close()


def test_etcd_a_commit_whose_answer_was_lost_is_found_by_its_audit_entry_not_sent_twice(etcd):
    proxy = AnswerDroppingProxy(etcd.endpoints[0])
    store = EtcdStore([proxy.endpoint, etcd.endpoints[0]], prefix=f"/test/{uuid.uuid4().hex}")
    try:
        # sent again blindly, this create-only commit would fail its own compare ("already exists")
        revision = store.commit("lb", {"vips/a": Obj({"n": 1}, 0.0)}, [], entry(), expected={"vips/a": 0})
        assert proxy.dropped == 1
        assert store.load("lb").objects["vips/a"] == StoredObject({"n": 1}, 0.0, revision)
        assert [e.revision for e in store.audit()] == [revision]
    finally:
        store.close()
        proxy.close()
