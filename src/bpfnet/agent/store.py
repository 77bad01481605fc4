"""Where the agent keeps each app's desired state and the audit log.

A state is kept as objects (`bpfnet.app.objects`: `settings`, `vips/...`, `rules/7`, ...), each with
the revision of its last write, so writers of different objects never conflict. Revisions only
grow: every commit of an app takes a higher one (SQLite counts per app, 1, 2, 3...; etcd uses its
cluster-wide revision, with gaps), and an object's revision is the app revision that last wrote it
(etcd's mod_revision). `Store` is the interface; `SQLiteStore` is the embedded default
for one machine; `bpfnet.agent.store_etcd.EtcdStore` keeps the same objects in etcd v3 for a fleet,
with `commit` as one transaction comparing the revisions it is given. `open_store(url)` picks one.

A store also reports what changes (`watch`): each commit of an app as `Changes`, in order, or a
`Resync` with everything when the changes since a revision cannot be told (etcd compacted them).
"""

from __future__ import annotations

import abc
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bpfnet.app.objects import Obj, ObjectKind, assemble
from bpfnet.app.paths import DEFAULT_STATE_DB
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)


class RevisionConflict(BpfnetError):
    """The stored revision is not the one the writer based its change on: of the object `key`, or
    of the whole app when `key` is None (another agent wrote to the store meanwhile)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreError(BpfnetError):
    """The store cannot be read (a corrupt file, a row that is not JSON); the message names the app."""


@dataclass(frozen=True)
class StoredObject:
    value: dict
    order: float
    revision: int  # the app revision that last wrote it

    @property
    def obj(self) -> Obj:
        return Obj(self.value, self.order)


@dataclass(frozen=True)
class StoredState:
    app: str
    objects: dict[str, StoredObject]
    revision: int  # 1 after the first commit, +1 per commit
    updated_at: float  # unix time
    legacy_state: dict | None = field(default=None)  # a whole state written by an older agent

    def whole(self, kinds: tuple[ObjectKind, ...] = ()) -> dict:
        """The whole state's JSON (not validated), from its objects or the legacy row."""
        if self.legacy_state is not None:
            return self.legacy_state
        return assemble({key: o.obj for key, o in self.objects.items()}, kinds)


@dataclass(frozen=True)
class AuditEntry:
    time: float  # unix time
    who: str  # "uid=0 pid=1234" from SO_PEERCRED, "token@10.0.0.1", ...
    app: str
    outcome: str  # applied, invalid, refused, conflict, failed
    summary: str  # what changed, or why it was not applied
    revision: int | None = None  # the revision saved, when applied

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Changes:
    """One commit of an app, as a watch sees it: the app revision it made and each object it wrote
    (None: deleted). Every object written carries `revision`."""

    app: str
    revision: int
    objects: dict[str, StoredObject | None]


@dataclass(frozen=True)
class Resync:
    """The watch cannot tell what changed since its revision (etcd compacted that history; SQLite
    keeps none): `state` is everything, as `load` returns it (None: never committed), and the
    changes after `revision` follow."""

    app: str
    state: StoredState | None
    revision: int
    reason: str


WatchEvent = Changes | Resync


class Watch(abc.ABC):
    """A running watch: delivers events to its callback, in order, from its own thread, until
    `stop()`. A callback that raises is logged and the watch goes on. `revision` is the last
    revision delivered; `error` the last problem reaching the store (None once it answers again)."""

    def __init__(self, app: str, from_revision: int, callback: Callable[[WatchEvent], None]) -> None:
        self.app = app
        self.revision = from_revision
        self.error: str | None = None
        self._callback = callback
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bpfnet-watch-{app}", daemon=True)

    def _start(self) -> Watch:
        self._thread.start()
        return self

    @abc.abstractmethod
    def _run(self) -> None:
        """Deliver events until stopped."""

    def _deliver(self, event: WatchEvent) -> None:
        try:
            self._callback(event)
        except Exception:
            log.exception("a watch callback of %s failed on %s", self.app, type(event).__name__)
        self.revision = event.revision

    def stop(self) -> None:
        self._stopped.set()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:  # noqa: B027 (optional hook)
        """Interrupt `_run` so that it sees the stop."""

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Store(abc.ABC):
    url: str  # where the store is, for people: sqlite:///var/lib/bpfnet/state.db, etcd://h1:2379,h2:2379

    @abc.abstractmethod
    def load(self, app: str) -> StoredState | None:
        """Every object of `app` with its revision, or None when nothing was ever committed."""

    @abc.abstractmethod
    def commit(self, app: str, puts: Mapping[str, Obj], deletes: Iterable[str], audit: AuditEntry, *,
               expected_revision: int | None = None, expected: Mapping[str, int] | None = None) -> int:
        """Write `puts`, delete `deletes` and append `audit` at once, if the app is still at
        `expected_revision` (None: any) and each key of `expected` is at its revision (0: absent);
        return the new app revision or raise RevisionConflict and change nothing."""

    @abc.abstractmethod
    def record(self, audit: AuditEntry) -> None:
        """Append an audit entry for a change that was not saved."""

    @abc.abstractmethod
    def audit(self, limit: int = 100, app: str | None = None) -> list[AuditEntry]:
        """The latest audit entries, newest first."""

    @abc.abstractmethod
    def watch(self, app: str, from_revision: int, callback: Callable[[WatchEvent], None]) -> Watch:
        """Call `callback` with every commit of `app` after `from_revision` (`Changes`, oldest first),
        or a `Resync` when those cannot be told, until the returned watch is stopped."""

    def join(self, member: str, ttl: float, on_members: Callable[[set[str]], None]) -> Membership | None:
        """Register `member` (a host's agent) for as long as it keeps its lease of `ttl` seconds
        alive, and call `on_members` with the names of every member whenever they change. None:
        this store has no fleet (SQLite: one agent)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Release connections."""


class Membership(abc.ABC):
    """A member's registration in the store, kept alive until `leave()`."""

    members: set[str]  # the latest members seen (this one included once registered)
    error: str | None  # the last problem keeping the lease alive or watching the members

    @abc.abstractmethod
    def leave(self) -> None:
        """Stop keeping the lease alive and withdraw the registration (others see it go at once)."""


def check_app_name(app: str) -> None:
    """An app name is one path segment in every backend's layout."""
    if not app or "/" in app or "\0" in app:
        raise StoreError(f"app name {app!r} cannot be stored: it must be non-empty, without '/' or NUL")


def open_store(url: str | Path) -> Store:
    """The store a URL names: `sqlite:///path/state.db` or a bare path (SQLite), or
    `etcd://host:2379[,host2:2379][/prefix]` (etcd v3). StoreError for anything else."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return SQLiteStore(Path(text))
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"store URL {text!r}: sqlite wants an absolute path, e.g. sqlite:///var/lib/bpfnet/state.db")
        return SQLiteStore(Path(rest))
    if scheme == "etcd":
        from bpfnet.agent.store_etcd import EtcdStore

        return EtcdStore.from_url(text)
    raise StoreError(f"store URL {text!r}: unknown scheme {scheme!r} (sqlite:///path, a path, or etcd://host:port)")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def decode_object(app: str, key: str, revision: int, text: object, where: object) -> dict:
    """A stored object's JSON, or StoreError naming app, key and revision."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:  # JSONDecodeError, a BLOB, NaN/Infinity
        raise StoreError(f"state of {app} (revision {revision}) in {where} is not valid JSON "
                         f"(object {key}): {str(err)[:200]}") from None
    if not isinstance(value, dict):
        raise StoreError(f"state of {app} (revision {revision}) in {where} is a "
                         f"{type(value).__name__}, not a JSON object (object {key})")
    return value


def object_conflict(app: str, key: str, have: int, wanted: int) -> str:
    """Why a write based on revision `wanted` of an object (0: absent) cannot go on."""
    if not have:
        return f"{app} has no object {key} (it was expected at revision {wanted})"
    if not wanted:
        return f"{app} object {key} already exists (revision {have})"
    return f"{app} object {key} is at revision {have}, not {wanted}: read it again"


def encode_object(value: dict) -> str:
    """Strict JSON (no NaN or Infinity: ValueError), keys sorted."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


AUDIT_RETENTION = 100_000  # audit entries kept; older ones are deleted as new ones come

# auto_vacuum only takes effect on a new database file: a shrinking state then frees its pages.
# `state` is the whole-state table of older agents, read once and migrated to `objects`.
_SCHEMA = """
PRAGMA auto_vacuum = FULL;
CREATE TABLE IF NOT EXISTS state (
    app TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS apps (
    app TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    app TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    ord REAL NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (app, key)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    who TEXT NOT NULL,
    app TEXT NOT NULL,
    outcome TEXT NOT NULL,
    summary TEXT NOT NULL,
    revision INTEGER
);
"""


class SQLiteStore(Store):
    """One SQLite file; safe to use from the API's worker threads and the tick thread."""

    def __init__(self, path: Path | str = DEFAULT_STATE_DB, audit_retention: int = AUDIT_RETENTION) -> None:
        self.path = Path(path)
        self.audit_retention = audit_retention
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self.path.chmod(0o600)
        self.url = f"sqlite://{self.path.absolute()}"
        self._watches: dict[str, list[_SQLiteWatch]] = {}

    def load(self, app: str) -> StoredState | None:
        with self._lock:
            return self._load(app)

    def _load(self, app: str) -> StoredState | None:
        try:
            head = self._db.execute("SELECT revision, updated_at FROM apps WHERE app = ?", (app,)).fetchone()
            rows = self._db.execute("SELECT key, value, ord, revision FROM objects WHERE app = ?",
                                    (app,)).fetchall()
            legacy = None if head else self._db.execute(
                "SELECT state, revision, updated_at FROM state WHERE app = ?", (app,)).fetchone()
        except sqlite3.Error as err:
            raise StoreError(f"state of {app} cannot be read from {self.path}: {err}") from None
        if legacy:
            return StoredState(app, {}, legacy[1], legacy[2],
                               legacy_state=decode_object(app, "(whole state)", legacy[1], legacy[0], self.path))
        if not head:
            return None
        objects = {key: StoredObject(decode_object(app, key, head[0], value, self.path), order, revision)
                   for key, value, order, revision in rows}
        return StoredState(app, objects, head[0], head[1])

    def commit(self, app: str, puts: Mapping[str, Obj], deletes: Iterable[str], audit: AuditEntry, *,
               expected_revision: int | None = None, expected: Mapping[str, int] | None = None) -> int:
        check_app_name(app)
        encoded = {key: encode_object(obj.value) for key, obj in puts.items()}  # before any write
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._current_revision(app)
                if expected_revision is not None and current != expected_revision:
                    raise RevisionConflict(f"state of {app} is at revision {current}, not {expected_revision}")
                for key, wanted in (expected or {}).items():
                    row = self._db.execute("SELECT revision FROM objects WHERE app = ? AND key = ?",
                                           (app, key)).fetchone()
                    have = row[0] if row else 0
                    if have != wanted:
                        raise RevisionConflict(object_conflict(app, key, have, wanted), key)
                revision = current + 1
                self._db.execute("INSERT INTO apps (app, revision, updated_at) VALUES (?, ?, ?) "
                                 "ON CONFLICT(app) DO UPDATE SET revision = excluded.revision, "
                                 "updated_at = excluded.updated_at", (app, revision, audit.time))
                self._db.execute("DELETE FROM state WHERE app = ?", (app,))  # migrated, if it was legacy
                self._db.executemany("DELETE FROM objects WHERE app = ? AND key = ?",
                                     [(app, key) for key in deletes])
                self._db.executemany(
                    "INSERT INTO objects (app, key, value, ord, revision) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(app, key) DO UPDATE SET value = excluded.value, ord = excluded.ord, "
                    "revision = excluded.revision",
                    [(app, key, encoded[key], puts[key].order, revision) for key in puts])
                self._insert_audit(AuditEntry(**{**audit.to_dict(), "revision": revision}))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if self._watches.get(app):
                written: dict[str, StoredObject | None] = dict.fromkeys(deletes)
                written.update({key: StoredObject(obj.value, obj.order, revision)
                                for key, obj in puts.items()})
                for watch in self._watches[app]:
                    watch.queue.put(Changes(app, revision, written))
        return revision

    def watch(self, app: str, from_revision: int, callback: Callable[[WatchEvent], None]) -> Watch:
        """In-process only: commits made through this store object (one agent's own), told from
        the committing thread through a queue. SQLite keeps no history of changes, so a watch from
        an older revision than the app's starts with a `Resync`."""
        watch = _SQLiteWatch(self, app, from_revision, callback)
        with self._lock:
            self._watches.setdefault(app, []).append(watch)
            current = self._current_revision(app)
            if current != from_revision:
                watch.queue.put(Resync(app, self._load(app), current,
                                       f"the SQLite store keeps no changes, only the state at revision {current}"))
        return watch._start()

    def _unwatch(self, watch: _SQLiteWatch) -> None:
        with self._lock:
            watches = self._watches.get(watch.app, [])
            if watch in watches:
                watches.remove(watch)

    def _current_revision(self, app: str) -> int:
        row = self._db.execute("SELECT revision FROM apps WHERE app = ?", (app,)).fetchone()
        if row:
            return row[0]
        legacy = self._db.execute("SELECT revision FROM state WHERE app = ?", (app,)).fetchone()
        return legacy[0] if legacy else 0

    def record(self, audit: AuditEntry) -> None:
        check_app_name(audit.app)
        with self._lock:
            self._insert_audit(audit)

    def _insert_audit(self, audit: AuditEntry) -> None:
        self._db.execute("INSERT INTO audit (time, who, app, outcome, summary, revision) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (audit.time, audit.who, audit.app, audit.outcome, audit.summary, audit.revision))
        self._db.execute("DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (self.audit_retention,))

    def audit(self, limit: int = 100, app: str | None = None) -> list[AuditEntry]:
        query = "SELECT time, who, app, outcome, summary, revision FROM audit"
        args: tuple = ()
        if app is not None:
            query += " WHERE app = ?"
            args = (app,)
        try:
            with self._lock:
                rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"the audit log cannot be read from {self.path}: {err}") from None
        return [AuditEntry(*row) for row in rows]

    def close(self) -> None:
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.stop()
        with self._lock:
            self._db.close()


class _SQLiteWatch(Watch):
    def __init__(self, store: SQLiteStore, app: str, from_revision: int,
                 callback: Callable[[WatchEvent], None]) -> None:
        super().__init__(app, from_revision, callback)
        self.store = store
        self.queue: queue.SimpleQueue[WatchEvent | None] = queue.SimpleQueue()

    def _run(self) -> None:
        while True:
            event = self.queue.get()
            if event is None or self._stopped.is_set():
                return
            self._deliver(event)

    def _wake(self) -> None:
        self.store._unwatch(self)
        self.queue.put(None)
