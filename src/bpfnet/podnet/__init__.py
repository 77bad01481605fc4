"""Pod networking: pods in network namespaces, identities and Kubernetes NetworkPolicy in eBPF."""
