"""What the `bpfnet podnet ...` commands share: the read-modify-write of the podnet state held by
the agent (validated here before it is sent), the refusal of a change, and the parsing and
printing of pod keys and labels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from bpfnet.app.cli import call_agent
from bpfnet.app.validation import validation_message
from bpfnet.cliutil import fail
from bpfnet.errors import BpfnetError
from bpfnet.podnet.config import ConfigError, PodnetState, parse_labels
from bpfnet.podnet.policy import compile_policy

APP = "podnet"
LabelsOption: Any = typer.Option("", "--labels", "-l", help="labels: k=v,k2=v2")


class Refused(BpfnetError):
    """A change that cannot be made; carries the one-line message for the user."""


def refused(err: ValidationError, what: str = "") -> Refused:
    """The refusal for an object (`what`: 'node', 'pod', ...) or a whole state that does not validate."""
    return Refused(validation_message(err, prefix=what, bare_root=True))


def parse_state(raw: dict) -> PodnetState:
    try:
        return PodnetState.model_validate(raw)
    except ValidationError as err:
        raise refused(err) from None


def dump_state(state: PodnetState) -> dict:
    return state.dump()


def change_state(socket: Path, change: Callable[[PodnetState], PodnetState]) -> PodnetState:
    """Read-modify-write the agent's podnet state; the result is validated before it is sent."""
    result: list[PodnetState] = []

    def apply(raw: dict) -> dict:
        try:
            new = change(parse_state(raw))
            new = PodnetState.model_validate(dump_state(new)).with_addresses()
            compile_policy(new)
        except ValidationError as err:
            raise refused(err) from None
        except ConfigError as err:
            raise Refused(str(err)) from None
        result[:] = [new]
        return dump_state(new)

    try:
        call_agent(socket, lambda client: client.update_state(APP, apply))
    except Refused as err:
        fail(str(err))
    return result[0]


def read_state(socket: Path) -> PodnetState:
    try:
        return parse_state(call_agent(socket, lambda client: client.get_state(APP)))
    except Refused as err:
        fail(str(err))


def pod_key(text: str) -> tuple[str, str]:
    """NAMESPACE/NAME (of a pod, a policy, a service) as its two parts, or a one-line error."""
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name:
        fail(f"pod {text!r}: use NAMESPACE/NAME")
    return namespace, name


def labels_argument(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as a dict, or a one-line error."""
    try:
        return parse_labels(text)
    except ConfigError as err:
        fail(str(err))


def format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def replace(items: list, key: Callable, wanted: str, new) -> list:
    return [new if key(item) == wanted else item for item in items]
