"""Workload 4: server memory per idle TLS connection.

Opens ``params.idle_connections`` TLS connections (handshake done, one echo
round trip each so the server's stream is fully set up), leaves them idle,
and divides the growth of the server's memory (PSS, RSS, private) by their
number. A few warm-up connections come first so that one-time lazy
initialisation is not counted.
"""

from __future__ import annotations

import ssl
import time

from benchmarks.certs import connect_tls, echo_once
from benchmarks.workloads.base import Measurement, Params, Target, Workload

WARMUP_CONNECTIONS = 50
SETTLE_TIMEOUT = 5.0


def _settled_memory(target: Target) -> dict[str, int]:
    """Server memory once two readings 100 ms apart agree (bounded wait)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous = target.server.memory_kib()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = target.server.memory_kib()
        if current == previous:
            break
        previous = current
    return previous


def run(target: Target, params: Params) -> Measurement:
    """Measure KiB of server memory (PSS) per idle connection."""
    warm = [connect_tls(target.ctx, target.port) for _ in range(WARMUP_CONNECTIONS)]
    for sock in warm:
        sock.sendall(b"x")
        sock.recv(1)
        sock.close()
    echo_once(target.ctx, target.port)
    before = _settled_memory(target)
    socks: list[ssl.SSLSocket] = []
    t0 = time.monotonic()
    cpu0 = target.server.cpu_seconds()
    try:
        for _ in range(params.idle_connections):
            sock = connect_tls(target.ctx, target.port)
            socks.append(sock)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise ConnectionError("echo mismatch")
        after = _settled_memory(target)
        wall = time.monotonic() - t0
        cpu = target.server.cpu_seconds() - cpu0
        target.server.check_alive()
    finally:
        for sock in socks:
            sock.close()
    n = len(socks)
    per = {key: (after[key] - before[key]) / n for key in before}
    return Measurement(
        value=per["pss"],
        per_cpu=None,
        wall=wall,
        server_cpu=cpu / wall,
        client_cpu=0.0,
        extra={
            "connections": n,
            "rss_kib_per_conn": per["rss"],
            "private_kib_per_conn": per["private"],
            "pss_before_kib": before["pss"],
            "pss_after_kib": after["pss"],
        },
    )


MEMORY = Workload("memory", "KiB/conn", None, run, lower_is_better=True)
