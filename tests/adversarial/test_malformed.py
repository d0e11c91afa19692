"""Broken and hostile bytes on the TLS port, one connection at a time.

Each case: the server closes the attacking connection (by its own deadline at
the latest), counts it as a failure with a fitting reason, and then passes the
common check: descriptors back to baseline, a good client served within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable

import pytest
from servers import MemoryTLSClient, raw_connect

from . import tlswire
from .conftest import HANDSHAKE_TIMEOUT, Target
from .helpers import after_attack, apoll, failures_delta

# How long after its last byte an attacker may wait for the server to hang up.
CUT_OFF = HANDSHAKE_TIMEOUT + 5.0


async def read_until_closed(sock: socket.socket, timeout: float = CUT_OFF) -> bytes:
    """What the server sends before it closes (EOF or reset); fails after `timeout`."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout} s")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
        except ConnectionError:
            return bytes(data)
        except asyncio.TimeoutError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def attack(
    target: Target,
    context: ssl.SSLContext,
    send: Callable[[socket.socket], Awaitable[bytes]],
    reasons: set[str] | None,
) -> None:
    """Run one attacking connection; check the failure it is counted as, then recover.

    `send` talks to the server and returns what it got back; `reasons` is the
    set of acceptable failure reasons (None: not a handshake failure at all).
    """
    server = target.server
    before = server.stats()
    sock = await raw_connect(server.port)
    try:
        await send(sock)
    finally:
        sock.close()
    if reasons is not None:
        delta: dict[str, int] = {}

        def counted() -> bool:
            delta.update(failures_delta(before, server.stats()))
            return sum(delta.values()) >= 1

        await apoll(counted, CUT_OFF, "the failure to be counted")
        assert sum(delta.values()) == 1 and set(delta) <= reasons, delta
    await apoll(lambda: server.stats()["active"] == 0, CUT_OFF, "no connection left active")
    await after_attack(server, target.baseline_fds, context)


def sending(payload: bytes) -> Callable[[socket.socket], Awaitable[bytes]]:
    """An attacker that sends `payload` and waits for the server to hang up."""

    async def send(sock: socket.socket) -> bytes:
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        return await read_until_closed(sock)

    return send


async def test_random_bytes(echo: Target, context: ssl.SSLContext) -> None:
    payload = random.Random(12).randbytes(4096)
    await attack(echo, context, sending(payload), {"plaintext", "protocol", "timeout"})


async def test_plaintext_http_request(echo: Target, context: ssl.SSLContext) -> None:
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n"
    await attack(echo, context, sending(request), {"plaintext"})


@pytest.mark.parametrize("version", ["SSLv3", "TLSv1.0", "TLSv1.1"])
async def test_legacy_client_hello_refused(
    echo: Target, context: ssl.SSLContext, version: str
) -> None:
    replies: list[bytes] = []

    async def send(sock: socket.socket) -> bytes:
        hello = tlswire.legacy_client_hello(tlswire.VERSIONS[version])
        reply = await sending(hello)(sock)
        replies.append(reply)
        return reply

    await attack(echo, context, send, {"protocol"})
    # Refused with an alert record, not a ServerHello.
    assert replies[0][:1] == bytes([tlswire.ALERT]), replies[0][:16]


async def test_sslv2_client_hello_refused(echo: Target, context: ssl.SSLContext) -> None:
    await attack(echo, context, sending(tlswire.sslv2_client_hello()), {"protocol", "plaintext"})


async def test_truncated_client_hello_then_silence(echo: Target, context: ssl.SSLContext) -> None:
    hello = tlswire.python_client_hello()
    await attack(echo, context, sending(hello[: len(hello) // 2]), {"timeout"})


async def test_64k_client_hello(echo: Target, context: ssl.SSLContext) -> None:
    """A 64 KiB ClientHello (a huge unknown extension): answered or refused, then cut off."""
    hello = tlswire.padded_client_hello(64 * 1024)
    assert len(hello) > 64 * 1024
    await attack(echo, context, sending(hello), {"timeout", "protocol"})


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda h: b"\x16\x03\x01\xff\xff" + h[5:], id="length-too-long"),
        pytest.param(lambda h: b"\x16\x03\x01\x00\x00" + h[5:], id="length-zero"),
        pytest.param(
            lambda h: h[:3] + struct.pack("!H", (len(h) - 5) // 2) + h[5:], id="length-short"
        ),
        pytest.param(lambda h: h[:3] + struct.pack("!H", len(h) + 10) + h[5:], id="length-long"),
    ],
)
async def test_record_with_bad_length(
    echo: Target, context: ssl.SSLContext, build: Callable[[bytes], bytes]
) -> None:
    hello = build(tlswire.python_client_hello())
    await attack(echo, context, sending(hello), {"protocol", "plaintext", "timeout"})


async def test_client_hello_dripped_one_byte_per_second(
    echo: Target, context: ssl.SSLContext
) -> None:
    """handshake_timeout bounds the whole handshake, not the gap between bytes."""
    hello = tlswire.python_client_hello()
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    async def send(sock: socket.socket) -> bytes:
        start = time.monotonic()
        for byte in hello[: int(HANDSHAKE_TIMEOUT) + 8]:
            try:
                await loop.sock_sendall(sock, bytes([byte]))
            except ConnectionError:
                break
            sent.append(time.monotonic() - start)
            with contextlib.suppress(asyncio.TimeoutError):
                if not await asyncio.wait_for(loop.sock_recv(sock, 1), 1.0):
                    break
        else:
            raise AssertionError(f"still connected after dripping {len(sent)} bytes")
        return b""

    await attack(echo, context, send, {"timeout"})
    assert len(sent) >= HANDSHAKE_TIMEOUT  # it was cut by the deadline, not at once


async def test_reset_mid_handshake(echo: Target, context: ssl.SSLContext) -> None:
    async def send(sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, tlswire.python_client_hello(context))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
        assert reply[:1] == bytes([tlswire.HANDSHAKE])  # the ServerHello is on its way
        reset(sock)
        return reply

    await attack(echo, context, send, {"eof"})


async def test_reset_mid_transfer(echo: Target, context: ssl.SSLContext) -> None:
    """A client that resets while the server is echoing megabytes back to it."""

    async def send(sock: socket.socket) -> bytes:
        client = await MemoryTLSClient.connect(sock, context)
        await client.send(b"hello")
        assert await client.recv_exactly(5) == b"hello"
        # Enough that the echo is still being written when the reset arrives.
        loop = asyncio.get_running_loop()
        wire = client.records([os.urandom(16384) for _ in range(256)])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(sock, wire), 2.0)
        reset(sock)
        return b""

    before = echo.server.stats()
    await attack(echo, context, send, None)
    after = echo.server.stats()
    assert after["handshakes"] == before["handshakes"] + 2  # the attacker's and the good one's
    assert after["bytes_received"] > before["bytes_received"]


@pytest.mark.parametrize("kind", ["raw-garbage", "bad-record-mac"])
async def test_garbage_after_handshake(echo: Target, context: ssl.SSLContext, kind: str) -> None:
    async def send(sock: socket.socket) -> bytes:
        client = await MemoryTLSClient.connect(sock, context)
        await client.send(b"hello")
        assert await client.recv_exactly(5) == b"hello"
        garbage = random.Random(3).randbytes(2048)
        if kind == "bad-record-mac":
            garbage = tlswire.record(tlswire.APPLICATION_DATA, garbage, version=0x0303)
        await asyncio.get_running_loop().sock_sendall(sock, garbage)
        return await read_until_closed(sock)

    await attack(echo, context, send, None)


async def test_client_hello_with_non_ascii_server_name(
    echo: Target, context: ssl.SSLContext
) -> None:
    """An SNI name with a byte >= 0x80 (found by fuzz/ handshake): refused and counted,
    quietly (no traceback per connection on the server's stderr)."""
    hello = tlswire.python_client_hello(context)
    assert b"localhost" in hello
    before = echo.server.stderr()
    await attack(echo, context, sending(hello.replace(b"localhost", b"local\xe8ost")), {"protocol"})
    noise = echo.server.stderr()[len(before) :]
    assert "Traceback" not in noise and "Exception ignored" not in noise, noise
