"""`bpfnet podnet policy apply|delete|list`: Kubernetes NetworkPolicies (networking.k8s.io/v1)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.cliutil import fail
from bpfnet.configfile import ConfigFileError, read_config_text
from bpfnet.podnet.cli.common import Refused, change_state, pod_key, read_state
from bpfnet.podnet.config import ConfigError, PodnetState, load_policies

policy_app = typer.Typer(help="Kubernetes NetworkPolicies (networking.k8s.io/v1).",
                         no_args_is_help=True)


@policy_app.command("apply")
def policy_apply(file: str = typer.Option(..., "-f", "--file", help="YAML or JSON, '-' for stdin"),
                 socket: Path = SocketOption) -> None:
    """Create or replace NetworkPolicies (one or many documents)."""
    try:
        policies = load_policies(read_config_text(file), file)
    except (ConfigFileError, ConfigError) as err:
        fail(str(err))
    outcome: dict[str, str] = {}

    def change(state: PodnetState) -> PodnetState:
        current = {p.key: p for p in state.policies}
        for policy in policies:
            outcome[policy.key] = ("unchanged" if current.get(policy.key) == policy else
                                   "configured" if policy.key in current else "created")
            current[policy.key] = policy
        return state.model_copy(update={"policies": list(current.values())})
    change_state(socket, change)
    for key, what in outcome.items():
        typer.echo(f"networkpolicy {key} {what}")


@policy_app.command("delete")
def policy_delete(policy: str = typer.Argument(..., help="NAMESPACE/NAME"),
                  socket: Path = SocketOption) -> None:
    """Delete a NetworkPolicy."""
    pod_key(policy)

    def change(state: PodnetState) -> PodnetState:
        if not any(p.key == policy for p in state.policies):
            raise Refused(f"policy {policy!r} does not exist")
        return state.model_copy(update={"policies": [p for p in state.policies if p.key != policy]})
    change_state(socket, change)
    typer.echo(f"networkpolicy {policy} deleted")


@policy_app.command("list")
def policy_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """NetworkPolicies (-o yaml: one document each, the input `policy apply -f` takes)."""
    state = read_state(socket)
    documents = [p.dump() for p in state.policies]
    if output is Output.yaml:
        return print(yaml.safe_dump_all(documents, sort_keys=False), end="")
    rows = []
    for p in state.policies:
        selector = p.spec.pod_selector.model_dump(by_alias=True, exclude_defaults=True)
        rows.append((p.namespace, p.metadata.name, json.dumps(selector) if selector else "{} (all)",
                     ",".join(sorted(p.spec.effective_policy_types)), len(p.spec.ingress), len(p.spec.egress)))
    render(documents, output, lambda: plain_table(
        ["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES", "INGRESS RULES", "EGRESS RULES"], rows,
        title="networkpolicies"))
