"""The TLS proxy against a misbehaving upstream: refusing, stalling, resetting, flooding.

(Every other adversarial case also runs through the proxy: the fixtures of
test_malformed, test_load and test_lifecycle are parametrized by KINDS.)
Each case ends with the common check; "a good client" is served by the
upstream's echo through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PKI
from servers import MemoryTLSClient, raw_connect

from .helpers import (
    HOST,
    ServerProcess,
    after_attack,
    apoll,
    failures_delta,
    good_client,
    server_process,
    stalled,
    upstream_process,
    warmed_baseline,
)

IDLE = 2.0


@pytest.fixture
def proxy(pki: PKI, context: ssl.SSLContext, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    """The proxy (idle_timeout 2 s) in front of a misbehaving-on-request upstream."""
    with (
        upstream_process() as port,
        server_process(
            pki, tmp_path, "--upstream", f"{HOST}:{port}", "--idle-timeout", str(IDLE)
        ) as server,
    ):
        yield server, warmed_baseline(server, context)


async def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout):
            data += chunk
    return bytes(data)


async def test_upstream_refuses(pki: PKI, context: ssl.SSLContext, tmp_path: Path) -> None:
    """Nothing listens upstream: each client is closed at once and counted."""
    # Bound but never listening, and held for the whole test: connections to it
    # are refused, and nobody else can start listening on it meanwhile.
    with socket.socket() as placeholder:
        placeholder.bind((HOST, 0))
        dead = placeholder.getsockname()[1]
        with server_process(pki, tmp_path, "--upstream", f"{HOST}:{dead}") as server:
            baseline = server.fds()
            before = server.stats()
            for _ in range(20):
                reader, writer = await asyncio.open_connection(
                    HOST, server.port, ssl=context, server_hostname="localhost"
                )
                writer.write(b"anyone?")
                with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                    assert await asyncio.wait_for(reader.read(), 5.0) == b""
                writer.close()
            await apoll(lambda: server.stats()["active"] == 0, 5.0, "every client closed")
            assert failures_delta(before, server.stats()) == {"upstream": 20}
            await apoll(lambda: server.fds() <= baseline, 10.0, "descriptors back to baseline")


async def test_upstream_stalls(proxy: tuple[ServerProcess, int], context: ssl.SSLContext) -> None:
    """The upstream never reads: the client's bytes back up (bounded memory), and
    idle_timeout ends the connection; a good client is served meanwhile."""
    server, baseline = proxy
    rss_before = server.rss()
    sock = await raw_connect(server.port)
    loop = asyncio.get_running_loop()

    async def pump(client: MemoryTLSClient) -> None:
        block = os.urandom(16384)
        with contextlib.suppress(OSError):
            for _ in range(4096):  # at most 1 GiB
                await loop.sock_sendall(sock, client.records([block] * 16))

    try:
        client = await MemoryTLSClient.connect(sock, context)
        await client.send(b"stall")
        pumping = asyncio.ensure_future(pump(client))
        peak = [rss_before]

        def dropped() -> bool:
            peak[0] = max(peak[0], server.rss())
            return bool(server.stats()["active"] == 0)

        await apoll(stalled(server), IDLE + 10.0, "the connection to stall")
        await good_client(server.port, context)
        await apoll(dropped, IDLE * 2 + 10.0, "the stalled connection to be dropped")
        pumping.cancel()
    finally:
        sock.close()
    growth = peak[0] - rss_before
    print(f"stalled upstream: proxy RSS grew {growth / 2**20:.1f} MiB")
    assert growth < 64 * 2**20
    await after_attack(server, baseline, context)


async def test_upstream_resets(proxy: tuple[ServerProcess, int], context: ssl.SSLContext) -> None:
    """The upstream resets: the proxy closes the client at once and counts it."""
    server, baseline = proxy
    before = server.stats()
    sock = await raw_connect(server.port)
    try:
        client = await MemoryTLSClient.connect(sock, context)
        await client.send(b"reset")
        # Aborted (a reset, as the upstream did) or closed: either way, at once.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(client.recv(), 5.0) == b""
    finally:
        sock.close()
    await apoll(lambda: sum(failures_delta(before, server.stats()).values()) >= 1, 5.0, "a count")
    assert set(failures_delta(before, server.stats())) <= {"upstream_reset", "upstream"}
    await after_attack(server, baseline, context)


async def test_upstream_floods_a_client_that_never_reads(
    proxy: tuple[ServerProcess, int], context: ssl.SSLContext
) -> None:
    """The upstream writes without end to a client that never reads: the proxy's
    memory stays bounded and idle_timeout drops the connection."""
    server, baseline = proxy
    rss_before = server.rss()
    sock = await raw_connect(server.port)
    try:
        client = await MemoryTLSClient.connect(sock, context)
        await client.send(b"flood")
        peak = [rss_before]

        def dropped() -> bool:
            peak[0] = max(peak[0], server.rss())
            return bool(server.stats()["active"] == 0)

        await apoll(lambda: server.stats()["bytes_sent"] > 0, 5.0, "the flood to start")
        await apoll(stalled(server), IDLE + 10.0, "the connection to stall")
        await good_client(server.port, context)
        await apoll(dropped, IDLE * 2 + 10.0, "the flooded connection to be dropped")
    finally:
        sock.close()
    growth = peak[0] - rss_before
    print(f"flooding upstream: proxy RSS grew {growth / 2**20:.1f} MiB")
    assert growth < 64 * 2**20
    await after_attack(server, baseline, context)


async def test_proxy_out_of_descriptors(pki: PKI, context: ssl.SSLContext, tmp_path: Path) -> None:
    """RLIMIT_NOFILE lowered: once the proxy cannot open upstream sockets (or
    accept), clients are refused cleanly, the CPU stays low, and it serves
    again when descriptors free up."""
    # Descriptors above those open before run(), where the loop's own and
    # the streams' epoll set (securetcp._poller) are made: room for ~5
    # proxied connections (2 descriptors each).
    with (
        upstream_process() as port,
        server_process(
            pki, tmp_path, "--upstream", f"{HOST}:{port}", "--nofile-headroom", "13"
        ) as server,
    ):
        baseline = await asyncio.to_thread(warmed_baseline, server, context)
        before = server.stats()
        release = asyncio.Event()
        outcomes: list[str] = []

        async def hold() -> None:
            reader, writer = await asyncio.open_connection(
                HOST, server.port, ssl=context, server_hostname="localhost"
            )
            try:
                writer.write(b"hold\n")
                try:
                    served = await asyncio.wait_for(reader.readexactly(5), 10) == b"hold\n"
                except (asyncio.IncompleteReadError, ConnectionResetError, ssl.SSLError):
                    outcomes.append("refused")
                    return
                outcomes.append("served" if served else "wrong echo")
                await release.wait()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()

        held: list[asyncio.Task[None]] = []
        try:
            for i in range(30):
                held.append(asyncio.ensure_future(hold()))
                await apoll(
                    lambda: len(outcomes) > i or "Too many open files" in server.stderr(),  # noqa: B023
                    10.0,
                    "the connection to be served or refused",
                )
                if "refused" in outcomes or "Too many open files" in server.stderr():
                    break
            else:
                raise AssertionError("the proxy never ran out of descriptors")
            held += [asyncio.ensure_future(hold()) for _ in range(3)]
            cpu, wall = server.cpu(), time.monotonic()
            await asyncio.sleep(2.0)  # the measurement window
            ratio = (server.cpu() - cpu) / (time.monotonic() - wall)
            print(f"proxy CPU while out of descriptors: {ratio:.1%} of one core; {outcomes}")
            assert ratio < 0.25
        finally:
            release.set()
        await asyncio.wait_for(asyncio.gather(*held), 30)
        assert set(outcomes) <= {"served", "refused"}, outcomes
        assert outcomes.count("served") >= 5
        if "refused" in outcomes:
            assert failures_delta(before, server.stats()).get("upstream", 0) >= 1
        await after_attack(server, baseline, context)
