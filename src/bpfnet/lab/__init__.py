"""The lab: a ready-made site in network namespaces where every bpfnet app works, in one command."""
