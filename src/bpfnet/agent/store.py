"""Where the agent keeps each app's desired state (JSON with a revision) and the audit log.

`Store` is the interface; `SQLiteStore` is the embedded default for one machine. A distributed
backend (etcd) implements the same four methods, with `save` as a compare-and-swap on revision.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from bpfnet.app.paths import DEFAULT_STATE_DB
from bpfnet.errors import BpfnetError


class RevisionConflict(BpfnetError):
    """The stored revision is not the one the writer based its change on."""


class StoreError(BpfnetError):
    """The store cannot be read (a corrupt file, a row that is not JSON); the message names the app."""


@dataclass(frozen=True)
class StoredState:
    app: str
    state: dict
    revision: int  # 1 for the first saved state, +1 per save
    updated_at: float  # unix time


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


class Store(abc.ABC):
    @abc.abstractmethod
    def load(self, app: str) -> StoredState | None:
        """The latest saved state of `app`, or None when it was never saved."""

    @abc.abstractmethod
    def save(self, app: str, state: dict, audit: AuditEntry, expected_revision: int) -> int:
        """Store `state` and its audit entry together if the current revision is
        `expected_revision` (0: never saved); return the new revision or raise RevisionConflict."""

    @abc.abstractmethod
    def record(self, audit: AuditEntry) -> None:
        """Append an audit entry for a change that was not saved."""

    @abc.abstractmethod
    def audit(self, limit: int = 100, app: str | None = None) -> list[AuditEntry]:
        """The latest audit entries, newest first."""

    def close(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Release connections."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


AUDIT_RETENTION = 100_000  # audit entries kept; older ones are deleted as new ones come

# auto_vacuum only takes effect on a new database file: a shrinking state then frees its pages
_SCHEMA = """
PRAGMA auto_vacuum = FULL;
CREATE TABLE IF NOT EXISTS state (
    app TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
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

    def load(self, app: str) -> StoredState | None:
        try:
            with self._lock:
                row = self._db.execute("SELECT state, revision, updated_at FROM state WHERE app = ?",
                                       (app,)).fetchone()
        except sqlite3.Error as err:
            raise StoreError(f"state of {app} cannot be read from {self.path}: {err}") from None
        if not row:
            return None
        try:
            state = json.loads(row[0], parse_constant=_reject_constant)
        except (TypeError, ValueError) as err:  # JSONDecodeError, a BLOB, NaN/Infinity
            raise StoreError(f"state of {app} (revision {row[1]}) in {self.path} is not valid JSON: "
                             f"{str(err)[:200]}") from None
        if not isinstance(state, dict):
            raise StoreError(f"state of {app} (revision {row[1]}) in {self.path} is a "
                             f"{type(state).__name__}, not a JSON object")
        return StoredState(app, state, row[1], row[2])

    def save(self, app: str, state: dict, audit: AuditEntry, expected_revision: int) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT revision FROM state WHERE app = ?", (app,)).fetchone()
                current = row[0] if row else 0
                if current != expected_revision:
                    raise RevisionConflict(f"state of {app} is at revision {current}, "
                                           f"not {expected_revision}")
                revision = current + 1
                self._db.execute(
                    "INSERT INTO state (app, state, revision, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(app) DO UPDATE SET state = excluded.state, "
                    "revision = excluded.revision, updated_at = excluded.updated_at",
                    (app, json.dumps(state, sort_keys=True, allow_nan=False), revision, audit.time))
                self._insert_audit(AuditEntry(**{**audit.to_dict(), "revision": revision}))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return revision

    def record(self, audit: AuditEntry) -> None:
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
        with self._lock:
            self._db.close()
