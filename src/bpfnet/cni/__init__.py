"""bpfnet-cni: the CNI plugin through which container runtimes plug their namespaces into a
podnet node, by asking the local agent."""
