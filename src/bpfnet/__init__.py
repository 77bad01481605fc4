"""bpfnet: an eBPF networking toolkit (L4 load balancer, DDoS mitigation, pod networking) driven from Python."""

__version__ = "0.1.0"
