"""The workloads: each measures one server process over a timed window."""
