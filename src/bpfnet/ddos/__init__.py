"""bpfnet.ddos: L4Drop-style XDP rules compiled from tcpdump expressions, sampling and capture.

pcap (libpcap front end) -> compiler (classic BPF -> eBPF) -> ruleset (generated XDP programs)
-> dataplane (maps, banks, atomic swap) -> controller / cli. The detector consumes `samples`.
"""
