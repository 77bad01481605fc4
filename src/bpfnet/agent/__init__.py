"""The bpfnet agent: app controllers, desired state in a store, REST API on a unix socket."""
