"""Talking to a running agent: over its unix socket (default) or its TLS listener with a token."""

from __future__ import annotations

import random
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bpfnet.app.paths import DEFAULT_SOCKET
from bpfnet.errors import BpfnetError


class AgentRequestError(BpfnetError, RuntimeError):
    """The agent answered with an error; `status` is the HTTP status (422 invalid, 409 refused...)."""

    def __init__(self, message: str, status: int | None = None, errors: list | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors


class AgentNotRunning(AgentRequestError):
    pass


class AgentClient:
    """`AgentClient()` for the local agent; `AgentClient(url="https://host:7443", token=...)` remote."""

    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET, *, url: str | None = None,
                 token: str | None = None, verify: bool | str | Path = True, timeout: float = 30.0) -> None:
        """`verify`: False, True (system CAs) or the path of the CA/certificate to trust."""
        self.socket_path = Path(socket_path)
        self.where = url or str(self.socket_path)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url is None:
            transport = httpx.HTTPTransport(uds=str(self.socket_path))
            self._http = httpx.Client(transport=transport, base_url="http://agent", headers=headers,
                                      timeout=timeout)
        else:
            checked: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(verify))
                                              if isinstance(verify, (str, Path)) else verify)
            self._http = httpx.Client(base_url=url, headers=headers, verify=checked, timeout=timeout)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as err:
            hint = ": start it with `bpfnet agent --background`" if not self.where.startswith("http") else ""
            raise AgentNotRunning(f"agent not running at {self.where}{hint}") from err
        except (httpx.ReadError, httpx.WriteError) as err:
            # the listening socket was closed under the request: an agent that failed to start, or exited
            raise AgentNotRunning(f"agent at {self.where} closed the connection ({err})") from err
        if response.status_code >= 400:
            try:
                body = response.json()
                message, errors = body.get("message") or str(body), body.get("errors")
            except ValueError:
                message, errors = response.text.strip() or response.reason_phrase, None
            raise AgentRequestError(message, response.status_code, errors)
        return response

    # -- calls -----------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._request("GET", "/v1/health").json()

    def apps(self) -> list[dict]:
        return self._request("GET", "/v1/apps").json()

    def get_state(self, app: str) -> dict:
        return self.get_state_and_revision(app)[0]

    def get_state_and_revision(self, app: str) -> tuple[dict, int]:
        response = self._request("GET", f"/v1/apps/{app}/state")
        return response.json(), int(response.headers["etag"].strip('"'))

    def put_state(self, app: str, state: dict, *, revision: int | None = None) -> dict:
        """Replace the app's state; with `revision`, only if nobody changed it since (412 if so).
        Returns {"app", "revision", "summary"}."""
        headers = {"If-Match": f'"{revision}"'} if revision is not None else {}
        return self._request("PUT", f"/v1/apps/{app}/state", json=state, headers=headers).json()

    def update_state(self, app: str, change: Callable[[dict], dict], *, attempts: int = 5) -> dict:
        """Read-modify-write: `change` gets the current state and returns the new one; retried
        when another writer got in between."""
        for attempt in range(attempts):
            state, revision = self.get_state_and_revision(app)
            try:
                return self.put_state(app, change(state), revision=revision)
            except AgentRequestError as err:
                if err.status != 412 or attempt == attempts - 1:
                    raise
            _back_off(attempt)
        raise AssertionError("unreachable")

    def update_object(self, app: str, kind: str, key: str, change: Callable[[dict], dict], *,
                      attempts: int = 5) -> dict:
        """Read-modify-write of one object; retried when another writer changed that object."""
        for attempt in range(attempts):
            obj, revision = self.get_object(app, kind, key)
            try:
                return self.put_object(app, kind, key, change(obj), revision=revision)
            except AgentRequestError as err:
                if err.status != 412 or attempt == attempts - 1:
                    raise
            _back_off(attempt)
        raise AssertionError("unreachable")

    # -- objects: each with its own revision; writers of different objects never conflict ---------

    def list_objects(self, app: str, kind: str) -> list[dict]:
        """[{"key", "revision", "object"}] of one kind, in their order."""
        return self._request("GET", f"/v1/apps/{app}/objects/{kind}").json()

    def get_object(self, app: str, kind: str, key: str) -> tuple[dict, int]:
        response = self._request("GET", f"/v1/apps/{app}/objects/{kind}/{_quoted(key)}")
        return response.json(), int(response.headers["etag"].strip('"'))

    def put_object(self, app: str, kind: str, key: str, obj: dict, *, revision: int | None = None,
                   create_only: bool = False, position: int | None = None) -> dict:
        """Create or replace one object; `revision`: only if it is still at that revision (412
        if not); `create_only`: only if it does not exist; `position`: its place among its
        siblings when it is created. Returns {"app", "kind", "key", "revision", "summary"}."""
        headers = {"If-Match": f'"{revision}"'} if revision is not None else {}
        if create_only:
            headers["If-None-Match"] = "*"
        params = {"position": position} if position is not None else {}
        return self._request("PUT", f"/v1/apps/{app}/objects/{kind}/{_quoted(key)}", json=obj,
                             headers=headers, params=params).json()

    def create_object(self, app: str, kind: str, obj: dict, *, position: int | None = None) -> dict:
        """Create an object whose key the app assigns (a ddos rule without an id)."""
        params = {"position": position} if position is not None else {}
        return self._request("POST", f"/v1/apps/{app}/objects/{kind}", json=obj, params=params).json()

    def delete_object(self, app: str, kind: str, key: str, *, revision: int | None = None) -> dict:
        """Delete one object and its children (a VIP's reals)."""
        headers = {"If-Match": f'"{revision}"'} if revision is not None else {}
        return self._request("DELETE", f"/v1/apps/{app}/objects/{kind}/{_quoted(key)}", headers=headers).json()

    def get_settings(self, app: str) -> tuple[dict, int]:
        response = self._request("GET", f"/v1/apps/{app}/settings")
        return response.json(), int(response.headers["etag"].strip('"'))

    def put_settings(self, app: str, settings: dict, *, revision: int | None = None) -> dict:
        headers = {"If-Match": f'"{revision}"'} if revision is not None else {}
        return self._request("PUT", f"/v1/apps/{app}/settings", json=settings, headers=headers).json()

    def stats(self, app: str) -> dict:
        return self._request("GET", f"/v1/apps/{app}/stats").json()

    def query(self, app: str, name: str, **params: Any) -> Any:
        return self._request("GET", f"/v1/apps/{app}/query/{name}", params=params).json()

    def action(self, app: str, name: str, **params: Any) -> Any:
        return self._request("POST", f"/v1/apps/{app}/actions/{name}", json=params).json()

    def schema(self, app: str) -> dict:
        return self._request("GET", f"/v1/apps/{app}/schema").json()

    def audit(self, limit: int = 100, app: str | None = None) -> list[dict]:
        params: dict = {"limit": limit}
        if app is not None:
            params["app"] = app
        return self._request("GET", "/v1/audit", params=params).json()

    def shutdown(self, *, detach: bool = False) -> None:
        """Ask the agent to exit; detach=True also removes the apps' programs and pins."""
        self._request("POST", "/v1/shutdown", params={"detach": detach})

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text


def _back_off(attempt: int) -> None:
    """Before retrying a write that lost a race: random, growing, so racing writers spread out."""
    time.sleep(random.uniform(0, 0.05 * 2**attempt))


def _quoted(key: str) -> str:
    """An object key in a URL path: '/' separates its parts, everything else is escaped."""
    return urllib.parse.quote(key, safe="/:")
