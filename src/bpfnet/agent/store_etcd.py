"""The agent's store in etcd v3: one shared desired state for a fleet of agents.

It talks to etcd's own JSON gateway (grpc-gateway: POST /v3/kv/range, /v3/kv/txn, /v3/kv/deleterange,
/v3/watch; keys and values in base64, 64-bit numbers as strings) over httpx, with every member it is
given: a request that a member cannot serve (connection refused, timed out, no leader) goes to the
next one, and StoreUnreachable names every member's failure when none answers.

Layout under the prefix (default /bpfnet/v1):

    apps/<app>/revision        {"updated_at": t}: written by every commit; its mod_revision is the app revision
    apps/<app>/objects/<key>   {"value": {...}, "order": 1.5}: its mod_revision is the object's revision
    audit/<app>/<stamp>-<id>   an audit entry (AuditEntry as JSON); stamps count down, so the newest come first
    audit-apps/<app>           the app has audit entries (the log of every app is read app by app)

Revisions are etcd's own: one counter for the whole cluster, monotonic, with gaps where other apps
(or other keys) were written. A commit is one transaction: it compares the mod_revision of the
app's marker (`expected_revision`; 0 is "never committed") and of each expected object (0 is
"absent"), then writes the marker, the objects and the audit entry, so they all get the same revision.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import httpx

from bpfnet.agent.store import (
    AUDIT_RETENTION,
    AuditEntry,
    Changes,
    Membership,
    Resync,
    RevisionConflict,
    Store,
    StoredObject,
    StoredState,
    StoreError,
    Watch,
    WatchEvent,
    check_app_name,
    decode_object,
    encode_object,
    object_conflict,
)
from bpfnet.app.objects import Obj
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/bpfnet/v1"
REQUEST_TIMEOUT = 5.0  # seconds one member has to answer one request
CONNECT_TIMEOUT = 1.0
WATCH_IDLE = 30.0  # a watch stream silent this long is opened again (on the next member)
AUDIT_TRIM_EVERY = 100  # audit writes of one store object between two checks of the retention
_STAMP_TOP = 10**19
RETRY_FOR = 3.0  # seconds a request goes on trying the members while none answers
# gRPC codes (as the gateway passes them on) of a member that cannot serve now: another may. A write
# refused so ("request timed out", "leader changed") may still be applied, unless it said "no leader".
_RETRY_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_HINTS = {  # etcd limits a commit can hit, and the etcd flag that moves each
    "too many operations in txn request": " (a commit is one transaction with an operation per object it writes, "
                                          "plus two: start etcd with a higher --max-txn-ops, default 128)",
    "request is too large": " (start etcd with a higher --max-request-bytes, default 1.5 MiB)",
}


class StoreUnreachable(StoreError):
    """No member of the etcd cluster answered."""


class _Unsure(BpfnetError):
    """A write was sent but not answered: it may or may not have taken effect."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode("utf-8", errors="replace")


def _range_end(prefix: str) -> str:
    """The end of the keys that start with `prefix` (which ends in "/")."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _describe(err: BaseException) -> str:
    text = str(err) or ("timed out" if isinstance(err, httpx.TimeoutException) else "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def parse_endpoints(spec: str | Sequence[str]) -> list[str]:
    """`h1:2379,h2:2379` or a list of `host:port` / `http://host:port`: the members' base URLs."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = []
    for raw in items:
        item = raw.strip().rstrip("/")
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        scheme, _, hostport = url.partition("://")
        if scheme != "http":
            raise StoreError(f"etcd endpoint {item!r}: only http:// is supported (TLS is not yet)")
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in hostport:
            raise StoreError(f"etcd endpoint {item!r} is not host:port (e.g. 127.0.0.1:2379)")
        endpoints.append(url)
    if not endpoints:
        raise StoreError("no etcd endpoint given (e.g. etcd://127.0.0.1:2379)")
    return endpoints


def _compare_mod(key: str, revision: int) -> dict:
    # a key that does not exist has mod_revision 0 for etcd's compare
    return {"target": "MOD", "key": _b64(key), "mod_revision": str(revision), "result": "EQUAL"}


def _put(key: str, value: str) -> dict:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def _kv_revision(response: dict) -> int:
    kvs = response.get("response_range", {}).get("kvs", [])
    return int(kvs[0]["mod_revision"]) if kvs else 0


class EtcdStore(Store):
    """Desired state and audit log in an etcd v3 cluster; safe to use from several threads."""

    def __init__(self, endpoints: str | Sequence[str], *, prefix: str = DEFAULT_PREFIX,
                 timeout: float = REQUEST_TIMEOUT, retry_for: float = RETRY_FOR, audit_retention: int = AUDIT_RETENTION,
                 audit_trim_every: int = AUDIT_TRIM_EVERY, watch_idle: float = WATCH_IDLE) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self.url = "etcd://" + ",".join(e.partition("://")[2] for e in self.endpoints)
        if self.prefix.rstrip("/") != DEFAULT_PREFIX:
            self.url += self.prefix.rstrip("/")
        self.timeout = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))
        self.retry_for = retry_for
        self.audit_retention = audit_retention
        self.audit_trim_every = max(1, audit_trim_every)
        self.watch_idle = watch_idle
        self._client = httpx.Client(timeout=self.timeout)
        self._lock = threading.Lock()
        self._preferred = 0  # the member that answered last
        self._audit_writes = random.randrange(self.audit_trim_every)  # stores of a fleet trim at different times
        self._audit_apps: set[str] = set()  # apps whose audit-apps key this object wrote
        self._watches: list[_EtcdWatch] = []

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdStore:
        """`etcd://h1:2379[,h2:2379][/prefix]`."""
        scheme, _, rest = url.partition("://")
        if scheme != "etcd":
            raise StoreError(f"store URL {url!r} is not etcd://host:port[,host:port][/prefix]")
        hosts, _, path = rest.partition("/")
        return cls(hosts, prefix=f"/{path}" if path else DEFAULT_PREFIX, **options)

    # -- requests -----------------------------------------------------------------------------

    def _call(self, path: str, body: dict, what: str, *, retry_unsure: bool = True) -> dict:
        """POST to the members, the one that answered last first, in rounds until one answers or
        `retry_for` seconds have passed (an election takes a moment); StoreUnreachable then, naming
        each member's last failure. With retry_unsure=False a write that may have been applied (its
        answer lost, or "request timed out") is not sent again: _Unsure."""
        failures: dict[str, str] = {}
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            start = self._preferred
            for step in range(len(self.endpoints)):
                index = (start + step) % len(self.endpoints)
                endpoint = self.endpoints[index]
                try:
                    response = self._client.post(endpoint + path, json=body)
                except httpx.TransportError as err:
                    failures[endpoint] = _describe(err)
                    self._preferred = (index + 1) % len(self.endpoints)
                    if not retry_unsure and not isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
                        raise _Unsure(f"{endpoint}: {failures[endpoint]}") from None
                    continue
                try:
                    data = response.json()
                except ValueError:
                    data = None
                if response.status_code == 200 and isinstance(data, dict):
                    self._preferred = index
                    return data
                message = (data.get("message") or data.get("error")) if isinstance(data, dict) else None
                message = message or f"HTTP {response.status_code}: {response.text[:200]}"
                code = data.get("code") if isinstance(data, dict) else None
                if code not in _RETRY_CODES and response.status_code not in (502, 503, 504):
                    hint = next((h for words, h in _HINTS.items() if words in message), "")
                    raise StoreError(f"the store at {self.url} refused {what}: {message}{hint}")
                failures[endpoint] = message
                self._preferred = (index + 1) % len(self.endpoints)
                if not retry_unsure and "no leader" not in message:  # "no leader" is refused before it is proposed
                    raise _Unsure(f"{endpoint}: {message}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        said = "; ".join(f"{endpoint}: {failure}" for endpoint, failure in failures.items())
        raise StoreUnreachable(f"the store at {self.url} is unreachable ({what}): {said}")

    def _range(self, key: str, what: str, *, prefix: bool = False, **options: Any) -> dict:
        body = {"key": _b64(key), **options}
        if prefix:
            body["range_end"] = _b64(_range_end(key))
        return self._call("/v3/kv/range", body, what)

    def _mod_revision(self, key: str, what: str) -> int:
        kvs = self._range(key, what, keys_only=True).get("kvs", [])
        return int(kvs[0]["mod_revision"]) if kvs else 0

    def _cluster_revision(self, what: str) -> int:
        return int(self._range(self.prefix, what, count_only=True)["header"]["revision"])

    # -- layout -------------------------------------------------------------------------------

    def _app_prefix(self, app: str) -> str:
        check_app_name(app)
        return f"{self.prefix}apps/{app}/"

    def _audit_prefix(self, app: str) -> str:
        return f"{self.prefix}audit/{app}/"

    # -- state --------------------------------------------------------------------------------

    def load(self, app: str) -> StoredState | None:
        return self._load(app)[0]

    def _load(self, app: str) -> tuple[StoredState | None, int]:
        """The state and the cluster revision it was read at (one range: a consistent snapshot)."""
        base = self._app_prefix(app)
        data = self._range(base, f"reading the state of {app}", prefix=True)
        header_revision = int(data["header"]["revision"])
        marker: tuple[int, dict] | None = None
        objects = {}
        for kv in data.get("kvs", []):
            rest = _text(kv["key"])[len(base):]
            revision = int(kv["mod_revision"])
            if rest == "revision":
                marker = (revision, decode_object(app, "(revision marker)", revision, _value(kv), self.url))
            elif rest.startswith("objects/"):
                key = rest[len("objects/"):]
                objects[key] = self._decode_object(app, key, revision, _value(kv))
        if marker is None:
            if objects:
                raise StoreError(f"state of {app} in {self.url} has {len(objects)} objects but no revision "
                                 f"marker ({base}revision): it was not written by bpfnet")
            return None, header_revision
        updated_at = marker[1].get("updated_at")
        return StoredState(app, objects, marker[0],
                           float(updated_at) if isinstance(updated_at, int | float) else 0.0), header_revision

    def _decode_object(self, app: str, key: str, revision: int, raw: bytes) -> StoredObject:
        envelope = decode_object(app, key, revision, raw, self.url)
        value, order = envelope.get("value"), envelope.get("order")
        if not isinstance(value, dict) or not isinstance(order, int | float) or isinstance(order, bool):
            raise StoreError(f"state of {app} (revision {revision}) in {self.url}: object {key} is not "
                             '{"value": {...}, "order": <number>}')
        return StoredObject(value, float(order), revision)

    def commit(self, app: str, puts: Mapping[str, Obj], deletes: Iterable[str], audit: AuditEntry, *,
               expected_revision: int | None = None, expected: Mapping[str, int] | None = None) -> int:
        base = self._app_prefix(app)
        encoded = {key: encode_object({"value": obj.value, "order": obj.order}) for key, obj in puts.items()}
        gone = list(dict.fromkeys(key for key in deletes if key not in puts))  # a put wins, as in SQLite
        expected = dict(expected or {})
        marker = base + "revision"
        compares = [_compare_mod(marker, expected_revision)] if expected_revision is not None else []
        compares += [_compare_mod(base + "objects/" + key, wanted) for key, wanted in expected.items()]
        what = f"the commit to {app}"
        audit_key, audit_ops = self._audit_ops(audit, committed=True, what=what)
        txn = {
            "compare": compares,
            "success": [_put(marker, encode_object({"updated_at": audit.time})),
                        *({"request_delete_range": {"key": _b64(base + "objects/" + key)}} for key in gone),
                        *(_put(base + "objects/" + key, value) for key, value in encoded.items()),
                        *audit_ops],
            # on a failed compare, read what was compared to say which one failed
            "failure": [{"request_range": {"key": _b64(key), "keys_only": True}}
                        for key in [marker, *(base + "objects/" + key for key in expected)]],
        }
        data = self._commit_txn(txn, audit_key, what)
        if data.get("succeeded"):
            self._trim_audit(app)
            return int(data["header"]["revision"])
        responses = data.get("responses", [])
        have = _kv_revision(responses[0]) if responses else 0
        if expected_revision is not None and have != expected_revision:
            raise RevisionConflict(f"state of {app} is at revision {have}, not {expected_revision}")
        for response, (key, wanted) in zip(responses[1:], expected.items(), strict=False):
            if (have := _kv_revision(response)) != wanted:
                raise RevisionConflict(object_conflict(app, key, have, wanted), key)
        raise RevisionConflict(f"state of {app} changed while it was written: read it again")

    def _commit_txn(self, txn: dict, audit_key: str, what: str) -> dict:
        """Send a commit; a try whose answer was lost is settled by its audit entry (written by the
        same transaction) before it is sent again."""
        unsure: _Unsure | None = None
        for _ in range(len(self.endpoints) + 1):
            try:
                if unsure is not None and (revision := self._mod_revision(audit_key, what)):
                    return {"succeeded": True, "header": {"revision": str(revision)}}
                data = self._call("/v3/kv/txn", txn, what, retry_unsure=False)
                if unsure is not None and not data.get("succeeded") and (
                        revision := self._mod_revision(audit_key, what)):
                    return {"succeeded": True, "header": {"revision": str(revision)}}
                return data
            except _Unsure as err:
                unsure = err
            except StoreUnreachable as err:
                if unsure is None:
                    raise
                raise StoreUnreachable(f"{err}; an earlier try of {what} may or may not have been saved "
                                       f"({unsure})") from None
        raise StoreUnreachable(f"the store at {self.url} did not confirm {what}, which may or may not have "
                               f"been saved: {unsure}")

    # -- audit --------------------------------------------------------------------------------

    def _audit_ops(self, audit: AuditEntry, committed: bool, what: str) -> tuple[str, list[dict]]:
        """The audit entry's key and the puts that write it. Its stamp counts down from the cluster
        revision read now, so an entry written after another one (even by another agent) sorts first."""
        check_app_name(audit.app)
        stamp = _STAMP_TOP - self._cluster_revision(what)
        key = f"{self._audit_prefix(audit.app)}{stamp:020d}-{uuid.uuid4().hex[:16]}"
        value = {**audit.to_dict(), "committed": committed}  # a commit's revision is the entry's mod_revision
        ops = [_put(key, encode_object(value))]
        if audit.app not in self._audit_apps:
            ops.append(_put(f"{self.prefix}audit-apps/{audit.app}", "{}"))
        return key, ops

    def record(self, audit: AuditEntry) -> None:
        _key, ops = self._audit_ops(audit, committed=False, what="writing the audit log")
        self._call("/v3/kv/txn", {"success": ops}, "writing the audit log")  # sent again: the same key
        self._audit_apps.add(audit.app)
        self._trim_audit(audit.app)

    def _trim_audit(self, app: str) -> None:
        """Keep the newest `audit_retention` entries of `app`; checked every `audit_trim_every` writes."""
        self._audit_apps.add(app)
        with self._lock:
            self._audit_writes += 1
            if self._audit_writes % self.audit_trim_every:
                return
        base = self._audit_prefix(app)
        try:
            excess = int(self._range(base, "counting audit entries", prefix=True, count_only=True).get("count", 0)) \
                - self.audit_retention
            if excess <= 0:
                return
            oldest = self._range(base, "finding old audit entries", prefix=True, keys_only=True,
                                 sort_order="DESCEND", sort_target="KEY", limit=str(excess)).get("kvs", [])
            if oldest:
                self._call("/v3/kv/deleterange", {"key": oldest[-1]["key"], "range_end": _b64(_range_end(base))},
                           "deleting old audit entries")
        except StoreError as err:
            log.warning("trimming the audit log of %s failed: %s", app, err)

    def audit(self, limit: int = 100, app: str | None = None) -> list[AuditEntry]:
        if limit <= 0:
            return []
        if app is None:
            listed = self._range(f"{self.prefix}audit-apps/", "reading the audit log", prefix=True, keys_only=True)
            apps = [_text(kv["key"]).rpartition("/")[2] for kv in listed.get("kvs", [])]
        else:
            check_app_name(app)
            apps = [app]
        rows = []
        for name in apps:
            data = self._range(self._audit_prefix(name), "reading the audit log", prefix=True, limit=str(limit))
            for kv in data.get("kvs", []):
                stamp = _text(kv["key"]).rpartition("/")[2].partition("-")[0]
                rows.append((stamp, -int(kv["mod_revision"]), self._decode_audit(kv)))
        rows.sort(key=lambda row: row[:2])
        return [entry for _stamp, _revision, entry in rows[:limit]]

    def _decode_audit(self, kv: dict) -> AuditEntry:
        key = _text(kv["key"])
        revision = int(kv["mod_revision"])
        try:
            value = json.loads(_value(kv))
            entry = AuditEntry(float(value["time"]), str(value["who"]), str(value["app"]), str(value["outcome"]),
                               str(value["summary"]), revision if value.get("committed") else value.get("revision"))
        except (ValueError, TypeError, KeyError) as err:
            raise StoreError(f"the audit log in {self.url} has an entry that cannot be read ({key}, revision "
                             f"{revision}): {type(err).__name__}: {str(err)[:200]}") from None
        return entry

    # -- watch --------------------------------------------------------------------------------

    def watch(self, app: str, from_revision: int, callback: Callable[[WatchEvent], None]) -> Watch:
        """Commits of `app` after `from_revision` from etcd's watch (the stream moves to another
        member when one fails, and goes on from the last revision it delivered). When etcd has
        compacted the revisions asked for, the app is loaded again and delivered as a `Resync`.
        Returns once the stream is open, or after the request timeout while no member answers
        (it keeps trying; `error` says why)."""
        self._app_prefix(app)
        watch = _EtcdWatch(self, app, from_revision, callback)
        with self._lock:
            self._watches.append(watch)
        watch._start()
        watch.ready.wait(self.timeout.read or REQUEST_TIMEOUT)
        return watch

    def join(self, member: str, ttl: float, on_members: Callable[[set[str]], None]) -> Membership:
        """`members/<member>` under the prefix, attached to a lease of `ttl` seconds that a thread
        keeps alive (every ttl/3); when the lease ran out meanwhile (the host was cut off longer
        than `ttl`, so the others dropped it) the member registers again with a new lease. Another
        thread watches `members/` and calls `on_members` with the names whenever they change."""
        check_app_name(member)
        membership = _EtcdMembership(self, member, ttl, on_members)
        membership.start()
        return membership

    def compact(self, revision: int) -> None:
        """Drop the history before `revision` (watches from older revisions then get a Resync)."""
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, "compacting")

    def close(self) -> None:
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.stop()
        self._client.close()


class _EtcdMembership(Membership):
    def __init__(self, store: EtcdStore, member: str, ttl: float, on_members: Callable[[set[str]], None]) -> None:
        self.store = store
        self.member = member
        self.ttl = max(2, int(round(ttl)))  # etcd leases count whole seconds (and at least 2 here)
        self.on_members = on_members
        self.members: set[str] = set()
        self.error: str | None = None
        self.key = f"{store.prefix}members/{member}"
        self.base = f"{store.prefix}members/"
        self._lease: str | None = None
        self._stopped = threading.Event()
        self._watch_client = httpx.Client(timeout=httpx.Timeout(store.timeout.connect, read=store.watch_idle))
        self._threads = [threading.Thread(target=self._keep_alive, name=f"bpfnet-lease-{member}", daemon=True),
                         threading.Thread(target=self._watch, name=f"bpfnet-members-{member}", daemon=True)]

    def start(self) -> None:
        try:
            self._register()
        except StoreError as err:  # the store is away: the lease thread goes on trying
            self.error = str(err)
        self._refresh()
        for thread in self._threads:
            thread.start()

    def _register(self) -> None:
        granted = self.store._call("/v3/lease/grant", {"TTL": str(self.ttl)}, f"a lease for member {self.member}")
        self._lease = str(granted["ID"])
        value = json.dumps({"since": time.time(), "ttl": self.ttl})
        self.store._call("/v3/kv/put", {"key": _b64(self.key), "value": _b64(value), "lease": self._lease},
                         f"registering member {self.member}")
        self.error = None

    def _keep_alive(self) -> None:
        while not self._stopped.wait(self.ttl / 3):
            try:
                if self._lease is None:
                    self._register()
                    continue
                answer = self.store._call("/v3/lease/keepalive", {"ID": self._lease},
                                          f"keeping member {self.member} alive")
                if int(answer.get("result", {}).get("TTL", 0)) <= 0:  # it ran out while we were away
                    log.warning("member %s: its lease ran out; registering again", self.member)
                    self._register()
                else:
                    self.error = None
            except (StoreError, KeyError, ValueError) as err:
                self.error = str(err)

    def _refresh(self) -> None:
        try:
            answer = self.store._range(self.base, "reading the members", prefix=True, keys_only=True)
        except StoreError as err:
            self.error = str(err)
            return
        members = {_text(kv["key"])[len(self.base):] for kv in answer.get("kvs", [])}
        if members != self.members:
            self.members = members
            try:
                self.on_members(set(members))
            except Exception:
                log.exception("members callback of %s failed", self.member)

    def _watch(self) -> None:
        index = self.store._preferred
        while not self._stopped.is_set():
            endpoint = self.store.endpoints[index % len(self.store.endpoints)]
            request = {"create_request": {"key": _b64(self.base), "range_end": _b64(_range_end(self.base))}}
            try:
                with self._watch_client.stream("POST", endpoint + "/v3/watch", json=request) as response:
                    self._refresh()  # what changed before the stream was open
                    for line in response.iter_lines():
                        if self._stopped.is_set():
                            return
                        if line.strip() and json.loads(line).get("result", {}).get("events"):
                            self._refresh()
            except (httpx.HTTPError, ValueError) as err:
                if self._stopped.is_set():
                    return
                self.error = f"watching the members at {endpoint}: {_describe(err)}"
            index += 1
            self._stopped.wait(0.2)

    def leave(self) -> None:
        self._stopped.set()
        self._watch_client.close()
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                self.store._call("/v3/kv/lease/revoke", {"ID": self._lease}, f"member {self.member} leaving")


def _value(kv: dict) -> bytes:
    return base64.b64decode(kv.get("value", ""))


class _StreamError(BpfnetError):
    """A watch stream that etcd ended or refused: open it again."""


class _EtcdWatch(Watch):
    """One etcd watch stream over the gateway, run by an asyncio loop in the watch's thread (so that
    `stop` can cancel a read that waits)."""

    def __init__(self, store: EtcdStore, app: str, from_revision: int,
                 callback: Callable[[WatchEvent], None]) -> None:
        super().__init__(app, from_revision, callback)
        self.store = store
        self.base = store._app_prefix(app)
        self.ready = threading.Event()  # set when the stream is open or a member failed to open it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    def _run(self) -> None:
        asyncio.run(self._main())

    def _wake(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop has already finished
                pass

    async def _main(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        timeout = httpx.Timeout(self.store.timeout.connect, read=self.store.watch_idle)
        backoff = 0.05
        index = self.store._preferred
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                while not self._stopped.is_set():
                    endpoint = self.store.endpoints[index % len(self.store.endpoints)]
                    try:
                        await self._stream(client, endpoint)
                        continue
                    except httpx.ReadTimeout:
                        index += 1  # silent: idle, or a member that hangs; open it again elsewhere
                        continue
                    except (httpx.TransportError, _StreamError, StoreError, ValueError) as err:
                        self.error = f"{endpoint}: {_describe(err)}"
                        log.warning("watch of %s: %s", self.app, self.error)
                    self.ready.set()
                    index += 1
                    if index % len(self.store.endpoints) == 0:  # every member failed once: back off
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
        except asyncio.CancelledError:
            pass

    async def _stream(self, client: httpx.AsyncClient, endpoint: str) -> None:
        request = {"create_request": {"key": _b64(self.base), "range_end": _b64(_range_end(self.base)),
                                      "start_revision": str(self.revision + 1)}}
        async with client.stream("POST", endpoint + "/v3/watch", json=request) as response:
            if response.status_code != 200:
                raise _StreamError(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    error = message["error"]
                    raise _StreamError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
                result = message.get("result", {})
                if result.get("created"):
                    self.error = None
                    self.ready.set()
                if compacted := int(result.get("compact_revision", 0)):
                    await self._resync(compacted)
                    return
                if result.get("canceled"):
                    raise _StreamError(result.get("cancel_reason") or "etcd canceled the watch")
                self._changes(result.get("events", []))

    async def _resync(self, compacted: int) -> None:
        state, revision = await asyncio.to_thread(self.store._load, self.app)
        self._deliver(Resync(self.app, state, revision,
                             f"etcd compacted the changes before revision {compacted}; the watch was at "
                             f"revision {self.revision}"))

    def _changes(self, events: list[dict]) -> None:
        """Events of one response, one `Changes` per revision (etcd sends a transaction's events together)."""
        commits: dict[int, dict[str, StoredObject | None]] = {}
        for event in events:
            kv = event["kv"]
            revision = int(kv["mod_revision"])
            written = commits.setdefault(revision, {})
            rest = _text(kv["key"])[len(self.base):]
            if not rest.startswith("objects/"):
                continue  # the revision marker: every commit writes it
            key = rest[len("objects/"):]
            if event.get("type") == "DELETE":
                written[key] = None
                continue
            try:
                written[key] = self.store._decode_object(self.app, key, revision, _value(kv))
            except StoreError as err:
                self.error = str(err)
                log.error("watch of %s: %s", self.app, err)
        for revision in sorted(commits):
            if revision > self.revision:
                self._deliver(Changes(self.app, revision, commits[revision]))
