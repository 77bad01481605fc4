"""The agent's REST API (FastAPI). Errors are JSON {"message": ...}; 422 adds pydantic's "errors".

The state's revision travels as an ETag: GET returns it, a PUT with `If-Match` is applied only if
the state is still at that revision (412 otherwise), so read-modify-write clients never lose an
update. Each object of a state (a VIP, a real, a rule, a pod: `bpfnet.app.objects`) has its own
revision and its own routes under /v1/apps/{app}/objects/{kind}/{key}, so writers of different
objects never conflict; `If-None-Match: *` creates only.

Every request is checked here before it reaches an app: a PUT body must be strict JSON (RFC 8259:
no NaN or Infinity), at most MAX_BODY_BYTES and MAX_JSON_DEPTH deep, sent as application/json;
unknown routes, wrong methods and bad query parameters get a 4xx with a message that names them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bpfnet import __version__
from bpfnet.agent.core import Agent, StateRejected
from bpfnet.agent.store import StoreError
from bpfnet.app.controller import UnknownAppError
from bpfnet.app.objects import SETTINGS
from bpfnet.app.validation import location, shorten
from bpfnet.errors import BpfnetError

PEER_SCOPE_KEY = "bpfnet.peer"  # set by the server: who is on the other end of the connection
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any real state; bounds what one request can allocate
MAX_JSON_DEPTH = 64  # real states nest about 8 deep; deeper input would only exhaust the stack
MAX_AUDIT_LIMIT = 100_000


class BadBody(BpfnetError, ValueError):
    """A PUT body the agent will not parse; `status` says why (413 too large, 415, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": message, **extra}, status_code=status)


def who(request: Request) -> str:
    peer = request.scope.get(PEER_SCOPE_KEY)
    if peer:
        return peer
    client = request.client
    return client.host if client and client.host else "unknown"


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    return int(value.strip().strip('"'))


def _is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/")
                                                 and media_type.endswith("+json"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_body(raw: bytes) -> Any:
    """Strict JSON (RFC 8259) or BadBody(422) naming what is wrong with it."""
    if not raw.strip():
        raise BadBody(422, "body is empty: send the state as a JSON object")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise BadBody(422, f"body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise BadBody(422, f"body is not JSON ({shorten(str(err))})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadBody(422, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


async def read_json_body(request: Request) -> Any:
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json_media_type(content_type):
        raise BadBody(415, f"Content-Type must be application/json, not {shorten(content_type)!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadBody(413, f"body of {int(declared)} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadBody(413, f"body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks))


def create_api(agent: Agent) -> FastAPI:
    api = FastAPI(title="bpfnet agent", version=__version__)

    @api.exception_handler(UnknownAppError)
    async def unknown_app(request: Request, err: UnknownAppError) -> JSONResponse:
        return error(404, str(err))

    @api.exception_handler(StateRejected)
    async def rejected(request: Request, err: StateRejected) -> JSONResponse:
        extra = {"errors": err.errors} if err.errors is not None else {}
        return error(err.status, str(err), **extra)

    @api.exception_handler(StoreError)
    async def store_unreadable(request: Request, err: StoreError) -> JSONResponse:
        return error(503, str(err))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {shorten(request.url.path)}"
        if err.status_code == 404:
            message = f"no such endpoint: {where}"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {shorten(request.url.path)}" + (
                f" (allowed: {allowed})" if allowed else "")
        else:
            message = f"{where}: {err.detail}"
        return JSONResponse({"message": message}, status_code=err.status_code, headers=err.headers)

    @api.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            kind, *name = e["loc"]
            where = f"{kind} parameter {location(name)}" if kind in ("query", "path", "header") else location(e["loc"])
            parts.append(f"{where}: {e['msg']}" + (f" (input: {shorten(repr(e['input']))})" if "input" in e else ""))
        return error(400, f"bad request to {request.method} {shorten(request.url.path)}: " + "; ".join(parts))

    @api.get("/v1/health")
    def health() -> dict:
        return {**agent.health(), "store": agent.store.url}

    @api.get("/v1/apps")
    def apps() -> list[dict]:
        return [{"name": name, "revision": agent.get_state(name)[1]} for name in agent.apps]

    @api.get("/v1/apps/{app}/state")
    def get_state(app: str) -> Response:
        state, revision = agent.get_state(app)
        return JSONResponse(state.model_dump(mode="json"), headers={"ETag": f'"{revision}"'})

    @api.put("/v1/apps/{app}/state")
    async def put_state(app: str, request: Request) -> Response:
        try:
            if_revision = _parse_if_match(request.headers.get("if-match"))
        except ValueError:
            return error(400, f"If-Match must be a revision number, not {shorten(request.headers['if-match'])!r}")
        agent.get_state(app)  # an unknown app is 404 whatever the body
        try:
            body = await read_json_body(request)
        except BadBody as err:
            return error(err.status, f"invalid state for {app}: {err}")
        revision, summary = await run_in_threadpool(agent.put_state, app, body, who(request), if_revision)
        return JSONResponse({"app": app, "revision": revision, "summary": summary},
                            headers={"ETag": f'"{revision}"'})

    def object_response(app: str, kind: str, key: str, revision: int, summary: str, status: int = 200) -> Response:
        return JSONResponse({"app": app, "kind": kind, "key": key, "revision": revision, "summary": summary},
                            status_code=status, headers={"ETag": f'"{revision}"'})

    async def object_body(request: Request, what: str) -> Any:
        try:
            return await read_json_body(request)
        except BadBody as err:
            raise StateRejected(err.status, f"invalid {what}: {err}") from None

    def preconditions(request: Request) -> tuple[int | None, bool]:
        """(If-Match revision, If-None-Match: * = create only)."""
        try:
            if_revision = _parse_if_match(request.headers.get("if-match"))
        except ValueError:
            raise StateRejected(400, "If-Match must be a revision number, not "
                                     f"{shorten(request.headers['if-match'])!r}") from None
        none_match = request.headers.get("if-none-match")
        if none_match is not None and none_match.strip() != "*":
            raise StateRejected(400, f"If-None-Match must be *, not {shorten(none_match)!r}")
        return if_revision, none_match is not None

    @api.get("/v1/apps/{app}/settings")
    def get_settings(app: str) -> Response:
        value, revision = agent.get_object(app, SETTINGS, "")
        return JSONResponse(value, headers={"ETag": f'"{revision}"'})

    @api.put("/v1/apps/{app}/settings")
    async def put_settings(app: str, request: Request) -> Response:
        agent.get_state(app)
        if_revision, create_only = preconditions(request)
        body = await object_body(request, f"{app} settings")
        revision, summary = await run_in_threadpool(
            agent.put_object, app, SETTINGS, "", body, who(request), if_revision=if_revision,
            create_only=create_only)
        return object_response(app, SETTINGS, "", revision, summary)

    @api.get("/v1/apps/{app}/objects/{kind}")
    def list_objects(app: str, kind: str) -> Response:
        rows, revision = agent.list_objects(app, kind)
        return JSONResponse(rows, headers={"ETag": f'"{revision}"'})

    @api.post("/v1/apps/{app}/objects/{kind}")
    async def create_object(app: str, kind: str, request: Request,
                            position: int | None = Query(None, ge=0, le=2**31)) -> Response:
        agent.get_state(app)
        body = await object_body(request, f"new {kind}")
        key, revision, summary = await run_in_threadpool(
            agent.create_object, app, kind, body, who(request), position=position)
        return object_response(app, kind, key, revision, summary, status=201)

    @api.get("/v1/apps/{app}/objects/{kind}/{key:path}")
    def get_object(app: str, kind: str, key: str) -> Response:
        value, revision = agent.get_object(app, kind, key)
        return JSONResponse(value, headers={"ETag": f'"{revision}"'})

    @api.put("/v1/apps/{app}/objects/{kind}/{key:path}")
    async def put_object(app: str, kind: str, key: str, request: Request,
                         position: int | None = Query(None, ge=0, le=2**31)) -> Response:
        agent.get_state(app)
        if_revision, create_only = preconditions(request)
        body = await object_body(request, f"{kind}/{key}")
        revision, summary = await run_in_threadpool(
            agent.put_object, app, kind, key, body, who(request), if_revision=if_revision,
            create_only=create_only, position=position)
        return object_response(app, kind, key, revision, summary)

    @api.delete("/v1/apps/{app}/objects/{kind}/{key:path}")
    async def delete_object(app: str, kind: str, key: str, request: Request) -> Response:
        agent.get_state(app)
        if_revision, _ = preconditions(request)
        revision, summary = await run_in_threadpool(
            agent.delete_object, app, kind, key, who(request), if_revision=if_revision)
        return object_response(app, kind, key, revision, summary)

    @api.get("/v1/apps/{app}/schema")
    def schema(app: str) -> dict:
        state, _ = agent.get_state(app)
        return type(state).model_json_schema()

    @api.get("/v1/apps/{app}/stats")
    def stats(app: str) -> dict:
        return agent.stats(app)

    @api.get("/v1/apps/{app}/query/{name}")
    def query(app: str, name: str, request: Request) -> Any:
        try:
            return agent.query(app, name, dict(request.query_params))
        except KeyError as err:
            return error(404, str(err.args[0]))
        except ValueError as err:
            return error(400, f"bad parameters for {app} query {name}: {err}")

    @api.post("/v1/apps/{app}/actions/{name}")
    async def action(app: str, name: str, request: Request) -> Any:
        agent.get_state(app)  # an unknown app is 404 whatever the body
        try:
            params = await read_json_body(request)
        except BadBody as err:
            return error(err.status, f"invalid parameters for {app} action {name}: {err}")
        if not isinstance(params, dict):
            return error(422, f"parameters of {app} action {name} must be a JSON object")
        try:
            return await run_in_threadpool(agent.action, app, name, params)
        except KeyError as err:
            return error(404, str(err.args[0]))
        except ValueError as err:
            return error(400, f"bad parameters for {app} action {name}: {err}")

    @api.get("/v1/audit")
    def audit(limit: int = Query(100, ge=1, le=MAX_AUDIT_LIMIT), app: str | None = None) -> list[dict]:
        return [entry.to_dict() for entry in agent.store.audit(limit=limit, app=app)]

    @api.post("/v1/shutdown")
    def shutdown(detach: bool = False) -> Response:
        if not agent.request_shutdown(detach):
            return error(503, "this agent is not run by a server that can shut down")
        return JSONResponse({"stopping": True, "detach": detach}, status_code=202)

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(agent.registry), media_type=CONTENT_TYPE_LATEST)

    return api
