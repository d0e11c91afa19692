"""Process-level events: a worker killed under fork_processes, SIGTERM mid-transfer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from pathlib import Path

import pytest
from conftest import PKI

from .helpers import ALL_KINDS, HOST, KINDS, apoll, good_client, proc_fds, target_process

PROBE_TIMEOUT = 5.0


async def probe(port: int, context: ssl.SSLContext) -> str:
    """One short TLS echo conversation: "ok" or the name of the error it ended with."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=context, server_hostname="localhost"),
            PROBE_TIMEOUT,
        )
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        return type(e).__name__
    try:
        writer.write(b"probe")
        got = await asyncio.wait_for(reader.readexactly(5), PROBE_TIMEOUT)
        return "ok" if got == b"probe" else "wrong echo"
    except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return type(e).__name__
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.parametrize("kind", KINDS)
async def test_worker_killed_under_fork_processes(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, kind: str
) -> None:
    """SIGKILL one of two workers: it comes back with the same task id, and the
    listening socket accepts throughout (at most the one conversation the dead
    worker was serving is lost)."""
    with target_process(kind, pki, tmp_path, "--processes", "2") as server:
        ready = [await asyncio.to_thread(server.wait_event, "ready", 1, task_id=t) for t in (0, 1)]
        victim, survivor = ready[0]["pid"], ready[1]["pid"]
        for _ in range(10):
            await good_client(server.port, context)
        baseline = {pid: proc_fds(pid) for pid in (victim, survivor)}

        results: list[str] = []
        stop = asyncio.Event()

        async def prober() -> None:
            while not stop.is_set():
                results.append(await probe(server.port, context))

        probing = asyncio.ensure_future(prober())
        try:
            await apoll(lambda: results.count("ok") >= 10, 10.0, "probes before the kill")
            os.kill(victim, signal.SIGKILL)
            restarted = await asyncio.to_thread(server.wait_event, "ready", 2, task_id=0)
            assert restarted["pid"] != victim
            # The new worker serves too: probe until it has accepted a connection.
            newcomer = restarted["pid"]
            await apoll(
                lambda: len(results) > 0 and server.stats(newcomer)["accepted"] > 0,
                15.0,
                "the restarted worker to accept a connection",
            )
            before_stop = len(results)
            await apoll(lambda: len(results) >= before_stop + 5, 10.0, "probes after the restart")
        finally:
            stop.set()
            await asyncio.wait_for(probing, PROBE_TIMEOUT * 2 + 1)
        failed = [r for r in results if r != "ok"]
        print(f"fork: {len(results)} probes, failed: {failed}")
        assert "ConnectionRefusedError" not in failed, failed
        assert len(failed) <= 1, failed

        # Descriptors: the survivor back to its own count, the newcomer at most
        # what its predecessor had.
        await apoll(
            lambda: (
                proc_fds(survivor) <= baseline[survivor] and proc_fds(newcomer) <= baseline[victim]
            ),
            10.0,
            "the workers' descriptors to return to baseline",
        )
        await good_client(server.port, context)

        server.proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.proc.wait, 15)
        assert status == 0, server.stderr()[-2000:]


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_sigterm_during_transfers(
    pki: PKI, context: ssl.SSLContext, tmp_path: Path, kind: str
) -> None:
    """SIGTERM while 8 clients are mid-echo: no new connections, every byte sent
    before the signal comes back, then exit status 0."""
    clients, size = 8, 2 * 2**20
    with target_process(kind, pki, tmp_path) as server:
        await good_client(server.port, context)
        conns = [
            await asyncio.open_connection(
                HOST, server.port, ssl=context, server_hostname="localhost"
            )
            for _ in range(clients)
        ]
        payloads = [os.urandom(size) for _ in range(clients)]

        async def receive(reader: asyncio.StreamReader) -> bytes:
            return await reader.readexactly(size)

        receiving = [asyncio.ensure_future(receive(reader)) for reader, _ in conns]
        for (_, writer), payload in zip(conns, payloads, strict=True):
            writer.write(payload)
        await asyncio.gather(*(writer.drain() for _, writer in conns))
        # Everything is sent (handed to the kernel), most of it not yet echoed.
        echoed_before = sum(1 for r in receiving if r.done())
        server.proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_connection(HOST, server.port)
            except ConnectionRefusedError:
                return True
            w.close()
            return False

        deadline = time.monotonic() + 10.0
        while not await refused():
            assert time.monotonic() < deadline, "still accepting 10 s after SIGTERM"
            await asyncio.sleep(0.01)

        got = await asyncio.wait_for(asyncio.gather(*receiving), 20.0)
        assert got == payloads
        print(f"SIGTERM: {echoed_before} of {clients} echoes had finished at the signal")
        for _, writer in conns:
            writer.close()
        status = await asyncio.to_thread(server.proc.wait, 15)
        assert status == 0, server.stderr()[-2000:]
        final = server.wait_event("exit")
        assert final["bytes_received"] == final["bytes_sent"] == clients * size + 5
        assert final["active"] == 0
