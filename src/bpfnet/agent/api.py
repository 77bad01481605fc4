"""The agent's REST API (FastAPI). Errors are JSON {"message": ...}; 422 adds pydantic's "errors".

The state's revision travels as an ETag: GET returns it, a PUT with `If-Match` is applied only if
the state is still at that revision (412 otherwise), so read-modify-write clients never lose an
update.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from bpfnet import __version__
from bpfnet.agent.controller import UnknownAppError
from bpfnet.agent.core import Agent, StateRejected

PEER_SCOPE_KEY = "bpfnet.peer"  # set by the server: who is on the other end of the connection


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


def create_api(agent: Agent) -> FastAPI:
    api = FastAPI(title="bpfnet agent", version=__version__)

    @api.exception_handler(UnknownAppError)
    async def unknown_app(request: Request, err: UnknownAppError) -> JSONResponse:
        return error(404, str(err))

    @api.exception_handler(StateRejected)
    async def rejected(request: Request, err: StateRejected) -> JSONResponse:
        extra = {"errors": err.errors} if err.errors is not None else {}
        return error(err.status, str(err), **extra)

    @api.get("/v1/health")
    def health() -> dict:
        return agent.health()

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
            return error(400, f"If-Match must be a revision number, not {request.headers['if-match']!r}")
        try:
            body = await request.json()
        except ValueError as err:
            return error(422, f"invalid state for {app}: body is not JSON ({err})")
        revision, summary = await run_in_threadpool(agent.put_state, app, body, who(request), if_revision)
        return JSONResponse({"app": app, "revision": revision, "summary": summary},
                            headers={"ETag": f'"{revision}"'})

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
            return error(404, err.args[0])
        except ValueError as err:
            return error(400, f"bad parameters for {app} query {name}: {err}")

    @api.get("/v1/audit")
    def audit(limit: int = 100, app: str | None = None) -> list[dict]:
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
