"""Resource attacks: running out of descriptors, and clients that never read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from pathlib import Path

import pytest
from conftest import PKI
from servers import MemoryTLSClient, raw_connect

from .helpers import (
    HOST,
    ServerProcess,
    after_attack,
    apoll,
    good_client,
    server_process,
    stalled,
    target_process,
    warmed_baseline,
)

HEADROOM = 12  # descriptors the server may open above those it has at start


async def held_connection(
    port: int, context: ssl.SSLContext, release: asyncio.Event, served: list[bool]
) -> bool:
    """A TLS echo conversation that stays open until `release`; appends to `served`."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(b"hold\n")
        served.append(await reader.readexactly(5) == b"hold\n")
        await release.wait()
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def accept_failing(server: ServerProcess) -> bool:
    return "Too many open files" in server.stderr()


@pytest.mark.parametrize("kind", ["echo", "echo-uvloop"])
async def test_descriptor_exhaustion(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, kind: str
) -> None:
    """accept() fails with EMFILE: the server pauses (low CPU), then serves again.

    Connections that arrive meanwhile wait in the kernel's queue and are
    served once descriptors free up.
    """
    with target_process(
        kind, pki, tmp_path, "--nofile-headroom", str(HEADROOM), "--handshake-timeout", "20"
    ) as server:
        baseline = await asyncio.to_thread(warmed_baseline, server, context)
        release = asyncio.Event()
        held: list[asyncio.Task[bool]] = []
        served: list[bool] = []
        try:
            # Take descriptors one connection at a time until accept() fails.
            for i in range(HEADROOM + 5):
                held.append(
                    asyncio.ensure_future(held_connection(server.port, context, release, served))
                )
                await apoll(
                    lambda: len(served) > i or accept_failing(server),  # noqa: B023
                    10.0,
                    "the connection to be served or accept() to fail",
                )
                if accept_failing(server):
                    break
            else:
                raise AssertionError(f"accept() never failed: {server.stderr()[-2000:]}")
            # More clients queue up behind the exhausted server.
            held += [
                asyncio.ensure_future(held_connection(server.port, context, release, served))
                for _ in range(3)
            ]
            # The measurement window: the listening socket stays readable (the
            # queued connections), the server must not spin on it.
            cpu, wall = server.cpu(), time.monotonic()
            await asyncio.sleep(2.0)
            ratio = (server.cpu() - cpu) / (time.monotonic() - wall)
            print(f"CPU while out of descriptors: {ratio:.1%} of one core")
            assert ratio < 0.25, f"the server used {ratio:.0%} of a core while out of descriptors"
            assert server.proc.poll() is None
        finally:
            release.set()
        results = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 20)
        assert results == [True] * len(held), results
        assert served == [True] * len(held)
        await after_attack(server, baseline, context)


@pytest.mark.parametrize("handler", ["firehose", "firehose-noawait", "echo"])
async def test_client_that_never_reads(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, handler: str
) -> None:
    """The server writes to a client that never reads: memory stays bounded, the
    connection is dropped (write limit or idle_timeout), others are served."""
    idle = 2.0
    with server_process(
        pki,
        tmp_path,
        "--handler",
        "echo" if handler == "echo" else handler,
        "--idle-timeout",
        str(idle),
    ) as server:
        baseline = await asyncio.to_thread(warmed_baseline, server, context)
        rss_before = server.rss()
        sock = await raw_connect(server.port)
        pump: asyncio.Task[None] | None = None
        try:
            client = await MemoryTLSClient.connect(sock, context)
            loop = asyncio.get_running_loop()
            if handler == "echo":
                # Send forever and never read: the echo's writes back up.
                async def send_forever() -> None:
                    block = os.urandom(16384)
                    with contextlib.suppress(OSError):
                        for _ in range(1024):  # at most 1 GiB
                            await loop.sock_sendall(sock, client.records([block] * 64))

                pump = asyncio.ensure_future(send_forever())
            else:
                await client.send(b"drink")
            peak = [rss_before]

            def dropped() -> bool:
                peak[0] = max(peak[0], server.rss())
                return bool(server.stats()["active"] == 0)

            # Others are served while it stalls.
            await apoll(lambda: server.stats()["bytes_sent"] > 0, 5.0, "the server writing")
            await apoll(stalled(server), idle + 10.0, "the connection to stall")
            await good_client(server.port, context)
            await apoll(dropped, idle * 2 + 10.0, "the stalled connection to be dropped")
        finally:
            if pump is not None:
                pump.cancel()
            sock.close()
        growth = peak[0] - rss_before
        print(f"{handler}: RSS grew {growth / 2**20:.1f} MiB while the client did not read")
        assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB for one stalled client"
        await after_attack(server, baseline, context)
