"""Driving CNI plugins the way `cnitool` and libcni do: the spec's variables and stdin, a conflist's
plugins called in order on ADD (each given the previous result) and in reverse on DEL; and a real
TCP exchange between two namespaces."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from bpfnet.netns import inside

BPFNET_CNI = str(Path(sys.executable).with_name("bpfnet-cni"))
REFERENCE_PLUGINS = "/usr/lib/cni"   # Debian's containernetworking-plugins


def plugin_dir(tmp: Path) -> str:
    """A CNI_PATH: `tmp` holding bpfnet-cni, then the reference plugins."""
    tmp.mkdir(parents=True, exist_ok=True)
    link = tmp / "bpfnet-cni"
    if not link.exists():
        link.symlink_to(BPFNET_CNI)
    return f"{tmp}:{REFERENCE_PLUGINS}"


@dataclass
class Answer:
    code: int          # the plugin's exit code
    output: dict | None
    stdout: str
    stderr: str

    @property
    def error(self) -> int | None:
        return self.output.get("code") if self.code and self.output else None


def call(executable: str, command: str, conf: dict, *, container: str = "", netns: str = "", ifname: str = "eth0",
         args: str = "", cni_path: str = "", env: dict | None = None) -> Answer:
    """One execution of a plugin with the spec's environment; `conf` goes to stdin."""
    variables = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
                 "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": cni_path or REFERENCE_PLUGINS,
                 "PATH": os.environ.get("PATH", "")}
    variables = {k: v for k, v in variables.items() if v} | (env or {})
    proc = subprocess.run([executable], input=json.dumps(conf), env=variables, capture_output=True, text=True,
                          timeout=120)
    output = json.loads(proc.stdout) if proc.stdout.strip() else None
    return Answer(proc.returncode, output, proc.stdout, proc.stderr)


def network_conf(conflist: dict, plugin: dict, prev_result: dict | None = None) -> dict:
    """A plugin's stdin as libcni builds it from a conflist: the list's name and version, the
    plugin's own fields, the previous result."""
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def chain(command: str, conflist: dict, cni_path: str, *, prev_result: dict | None = None, **kw) -> Answer:
    """ADD, CHECK or DEL over every plugin of `conflist` (DEL in reverse), stopping at the first error."""
    plugins = conflist["plugins"] if command != "DEL" else list(reversed(conflist["plugins"]))
    result = prev_result if command != "ADD" else None
    answer = Answer(0, None, "", "")
    for plugin in plugins:
        executable = shutil.which(plugin["type"], path=cni_path)
        assert executable is not None, f"plugin {plugin['type']} not in {cni_path}"
        answer = call(executable, command, network_conf(conflist, plugin, result), cni_path=cni_path, **kw)
        if answer.code:
            return answer
        if command == "ADD":
            result = answer.output
    return answer if command != "ADD" else Answer(0, result, answer.stdout, answer.stderr)


def tcp_exchange(client_ns: str, server_ns: str, address: str, port: int, timeout: float = 2.0) -> bytes | None:
    """Connect from `client_ns` to a server listening in `server_ns` on `address:port`; the bytes the
    server sent, or None when the connection failed (blocked, refused, timed out)."""
    with inside(server_ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    server.settimeout(timeout + 1)

    def serve():
        try:
            conn, peer = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(f"hello {peer[0]}".encode())
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with inside(client_ns):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(timeout)
        with client:
            try:
                client.connect((address, port))
                return client.recv(100)
            except OSError:
                return None
    finally:
        server.close()
        thread.join(timeout + 2)
