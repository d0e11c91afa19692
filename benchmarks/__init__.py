"""Peer-comparison benchmarks for securetcp (run with ``scripts/bench``).

Not part of the package and not tests: see benchmarks/README.md.
"""
