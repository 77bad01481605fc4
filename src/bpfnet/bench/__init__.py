"""Benchmarks: the in-kernel traffic generator and scenarios that compare bpfnet with its peers."""
