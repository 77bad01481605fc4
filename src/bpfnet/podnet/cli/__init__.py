"""`bpfnet podnet ...`: nodes, namespaces, pods, NetworkPolicies, endpoints, probes, flows and
services, one module per object; `common` holds what they share.

Verbs that change state read the podnet state from the agent, change it and put it back (the
agent's store is the one source of truth); `probe` runs real connections from this machine.
The sub-apps are also mounted one by one at the top level as the issues spell them
(`bpfnet namespace add`, `bpfnet pod add`, `bpfnet policy apply`, `bpfnet probe`, `bpfnet service`).
"""

from __future__ import annotations

import typer

from bpfnet.podnet.cli import kube
from bpfnet.podnet.cli.endpoints import endpoint_app
from bpfnet.podnet.cli.namespaces import namespace_app
from bpfnet.podnet.cli.nodes import node_app
from bpfnet.podnet.cli.observe import OBSERVE_CONTEXT, observe
from bpfnet.podnet.cli.pods import pod_app
from bpfnet.podnet.cli.policies import policy_app
from bpfnet.podnet.cli.probe import probe
from bpfnet.podnet.cli.services import service_app
from bpfnet.podnet.cli.stats import stats

app = typer.Typer(help="Pods, identities and Kubernetes NetworkPolicy enforced in eBPF.",
                  no_args_is_help=True)
SUB_APPS = (("node", node_app), ("namespace", namespace_app), ("pod", pod_app), ("policy", policy_app),
            ("endpoint", endpoint_app))
for _name, _sub in SUB_APPS:
    app.add_typer(_sub, name=_name)
app.command("probe")(probe)
app.command("observe", context_settings=OBSERVE_CONTEXT)(observe)
app.command("stats")(stats)
app.command("apply")(kube.apply)
app.command("get")(kube.get)


def mount(root: typer.Typer) -> None:
    """Mount podnet on the `bpfnet` command: `bpfnet podnet ...` and, as issue 6 spells them, the
    top-level verbs `bpfnet node|namespace|pod|policy|endpoint ...`, `bpfnet probe`, (issue 7)
    `bpfnet observe` and `bpfnet service ...`."""
    root.add_typer(app, name="podnet")
    for name, sub in SUB_APPS:
        root.add_typer(sub, name=name)
    root.command("probe")(probe)
    root.command("observe", context_settings=OBSERVE_CONTEXT)(observe)
    root.add_typer(service_app, name="service")
    root.command("apply")(kube.apply)
    root.command("get")(kube.get)


__all__ = ["app", "mount", "service_app"]
