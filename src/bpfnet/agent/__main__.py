"""`python -m bpfnet.agent`: the agent command on its own (what `bpfnet agent --background` runs)."""

from bpfnet.agent.cli import app

app(prog_name="bpfnet agent")
