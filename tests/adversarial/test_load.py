"""Many hostile connections at once: slowloris and a flood of short TLS conversations.

These are the heaviest cases; scripts/test runs them on one Python version
only (SECURETCP_HEAVY_TESTS=0 skips them on the others).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PKI
from servers import raw_connect

from . import tlswire
from .conftest import HANDSHAKE_TIMEOUT
from .helpers import HEAVY, KINDS, after_attack, good_client, target_process, warmed_baseline

pytestmark = pytest.mark.skipif(
    not HEAVY, reason="heavy case: SECURETCP_HEAVY_TESTS=0 (scripts/test runs it on one Python)"
)

SLOWLORIS = 500
# With TCP_DEFER_ACCEPT the kernel may hold silent connections back for a few
# seconds before handing them over; then handshake_timeout runs.
DEFER_SLACK = 8.0
FLOOD = 2000
FLOOD_PROCESSES = 4
FLOOD_CONCURRENCY = 32  # per process: 128 at once against max_connections=50
MAX_CONNECTIONS = 50


async def connect_many(port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for start in range(0, count, 100):
            batch = min(100, count - start)
            socks += await asyncio.gather(*(raw_connect(port) for _ in range(batch)))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def closed_by_server(sock: socket.socket, deadline: float) -> float:
    """When the server closed `sock` (monotonic time); fails after `deadline`."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await asyncio.wait_for(
                loop.sock_recv(sock, 65536), max(0.0, deadline - time.monotonic())
            )
            if not chunk:
                break
    except ConnectionError:
        pass
    except asyncio.TimeoutError:
        raise AssertionError("a slowloris connection outlived the deadline") from None
    return time.monotonic()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("speaks", ["nothing", "half-a-hello"])
async def test_slowloris(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, speaks: str, kind: str
) -> None:
    """500 connections that never finish (or never start) a handshake.

    A good client is served within a second meanwhile, and the server closes
    every one of them by the handshake deadline (plus the kernel's
    TCP_DEFER_ACCEPT hold for the silent ones).
    """
    with target_process(
        kind, pki, tmp_path, "--handshake-timeout", str(HANDSHAKE_TIMEOUT)
    ) as server:
        baseline = await asyncio.to_thread(warmed_baseline, server, context)
        start = time.monotonic()
        socks = await connect_many(server.port, SLOWLORIS)
        try:
            if speaks == "half-a-hello":
                hello = tlswire.python_client_hello(context)
                loop = asyncio.get_running_loop()
                await asyncio.gather(
                    *(loop.sock_sendall(s, hello[: len(hello) // 2]) for s in socks)
                )
            await good_client(server.port, context)
            deadline = start + HANDSHAKE_TIMEOUT + DEFER_SLACK
            closed = await asyncio.gather(*(closed_by_server(s, deadline) for s in socks))
        finally:
            for sock in socks:
                sock.close()
        print(f"slowloris ({speaks}): last closed {max(closed) - start:.1f} s after the first")
        stats = await asyncio.to_thread(server.stats)
        assert stats["failures"].get("timeout", 0) + stats["rejected"] >= (
            SLOWLORIS if speaks == "half-a-hello" else 0
        ), stats
        await after_attack(server, baseline, context)


@pytest.mark.timeout(240)  # 2,000 handshakes on a shared 2-core machine
@pytest.mark.parametrize("kind", KINDS)
def test_flood_of_short_connections(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, kind: str
) -> None:
    """2,000 short TLS conversations from 4 processes against max_connections=50."""
    flood_py = Path(__file__).with_name("flood.py")
    with target_process(
        kind,
        pki,
        tmp_path,
        "--handshake-timeout",
        "10",
        "--max-connections",
        str(MAX_CONNECTIONS),
    ) as server:
        baseline = warmed_baseline(server, context)
        before = server.stats()
        per_process = FLOOD // FLOOD_PROCESSES
        clients = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(flood_py),
                    str(server.port),
                    str(pki.ca_file),
                    str(per_process),
                    str(FLOOD_CONCURRENCY),
                ],
                stdout=subprocess.PIPE,
            )
            for _ in range(FLOOD_PROCESSES)
        ]
        results = []
        try:
            for client in clients:
                out, _ = client.communicate(timeout=120)
                assert client.returncode == 0
                results.append(json.loads(out))
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait()
        totals: dict[str, int] = {}
        for result in results:
            for outcome, n in result["outcomes"].items():
                totals[outcome] = totals.get(outcome, 0) + n
        print(f"flood: {totals}, examples: {[r['examples'] for r in results]}")
        assert totals.get("broken", 0) == 0, results
        assert totals.get("served", 0) + totals.get("refused", 0) == FLOOD
        assert totals.get("served", 0) > 0

        assert server.proc.poll() is None, "the server died"
        asyncio.run(after_attack(server, baseline, context))
        after = server.stats()
        accepted = after["accepted"] - before["accepted"]
        handshakes = after["handshakes"] - before["handshakes"]
        failures = sum(after["failures"].values()) - sum(before["failures"].values())
        # Refusals for a limit that are not handshake failures (stats.rejected
        # also counts "unauthorized", which failures holds already).
        limit_rejected = (after["rejected"] - after["failures"].get("unauthorized", 0)) - (
            before["rejected"] - before["failures"].get("unauthorized", 0)
        )
        print(f"flood server stats: {after}")
        assert after["active"] == 0
        assert accepted == handshakes + failures + limit_rejected, after
        # Every conversation a client saw served went through a handshake
        # (plus the good client of after_attack).
        assert handshakes >= totals.get("served", 0) + 1
        assert after["handler_errors"] == before["handler_errors"]
