"""bpfnet.lb: Katran-class XDP L4 load balancer with Katran-compatible Maglev rings."""
