"""`bpfnet-cni`: the plugin a container runtime executes (CNI 1.0.0: ADD, DEL, CHECK, VERSION).

A thin client: it reads the call (CNI_* variables, the configuration on stdin), asks the local
agent to plug the runtime's namespace into the node or take it out (bpfnet.cni.agent), and prints
the result or the error as the spec's JSON. The veth, address, routes, identity and programs are
the podnet controller's work in the agent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from bpfnet.app.validation import validation_message
from bpfnet.cni import agent
from bpfnet.cni.spec import (
    AGENT_REFUSED,
    CHECK_FAILED,
    CNI_VERSION,
    INVALID_ENVIRONMENT,
    IO_FAILURE,
    PLUGIN_FAILED,
    SUPPORTED_VERSIONS,
    UNKNOWN_CONTAINER,
    CniError,
    Environment,
    NetworkConfig,
    add_result,
    check_prev_result,
    decode,
    parse_config,
    parse_environment,
    pod_identity,
)
from bpfnet.podnet.config import PodnetState, Sandbox
from bpfnet.podnet.sandboxes import SandboxPod, plug, unplug


def run(env: dict[str, str], stdin: bytes) -> dict | None:
    """One call: the JSON to print (None for DEL and CHECK, which print nothing on success)."""
    call = parse_environment(env)
    if call.command == "VERSION":
        asked = decode(stdin).get("cniVersion") if stdin.strip() else None
        return {"cniVersion": asked if asked in SUPPORTED_VERSIONS else CNI_VERSION,
                "supportedVersions": list(SUPPORTED_VERSIONS)}
    config = parse_config(decode(stdin))
    socket = Path(config.agent_socket)
    if call.command == "ADD":
        return _add(call, config, socket)
    if call.command == "DEL":
        agent.change_pods(socket, lambda state: unplug(state, call.container_id, call.ifname))
        return None
    _check(call, config, socket)
    return None


def _add(call: Environment, config: NetworkConfig, socket: Path) -> dict:
    if not os.path.exists(call.netns):
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {call.netns} does not exist", "CNI_NETNS")
    who = pod_identity(call, config)
    try:
        sandbox = Sandbox(container_id=call.container_id, netns=call.netns, ifname=call.ifname,
                          network=config.name)
    except ValidationError as err:
        raise CniError(INVALID_ENVIRONMENT, validation_message(err, prefix="CNI"),
                       "CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME") from None
    request = SandboxPod(who.namespace, who.name, sandbox, who.labels, config.node)

    def change(state: PodnetState) -> PodnetState | None:
        new = plug(state, request)
        return None if new is state else new
    agent.change_pods(socket, change)
    plugged = agent.query(socket, "sandbox", request.key)
    if plugged is None:
        raise CniError(AGENT_REFUSED, f"pod {request.key} has no interface in {call.netns} after ADD")
    return add_result(config.cni_version, plugged, config.prev_result, config.dns)


def _check(call: Environment, config: NetworkConfig, socket: Path) -> None:
    key = agent.attached(socket, call.container_id, call.ifname)
    if key is None:
        raise CniError(UNKNOWN_CONTAINER, f"container {call.container_id} interface {call.ifname} is not "
                       "attached to this network")
    plugged = agent.query(socket, "sandbox", key)
    checked = agent.query(socket, "check", key)
    problems = (checked or {}).get("problems", ["the agent knows no such pod"])
    if plugged is not None:
        problems = check_prev_result(config.prev_result, plugged) + problems
    if plugged is None and not problems:
        problems = [f"pod {key} has no interface"]
    if problems:
        raise CniError(CHECK_FAILED, f"pod {key}: " + "; ".join(problems))


def main() -> None:
    version = CNI_VERSION
    try:
        try:
            stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        except OSError as err:
            raise CniError(IO_FAILURE, f"reading the network configuration from stdin: {err}") from None
        try:
            asked = json.loads(stdin).get("cniVersion")
            version = asked if asked in SUPPORTED_VERSIONS else version
        except (ValueError, AttributeError):
            pass
        output = run(dict(os.environ), stdin)
    except CniError as err:
        print(json.dumps(err.to_json(version)))
        sys.exit(1)
    except Exception as err:  # the runtime must get the spec's error JSON whatever went wrong
        print(json.dumps(CniError(PLUGIN_FAILED, f"{type(err).__name__}: {err}").to_json(version)))
        sys.exit(1)
    if output is not None:
        print(json.dumps(output))


if __name__ == "__main__":
    main()
