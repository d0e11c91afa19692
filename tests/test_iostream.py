"""Tests for securetcp.iostream: IOStream and SSLIOStream over real loopback sockets."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
import ssl
from typing import Any

import pytest
from servers import (
    MemoryTLSClient,
    server_context,
    socket_pair,
    stream_pair,
    unstarted_tls_pair,
    until,
)

from securetcp.iostream import (
    IOStream,
    SSLIOStream,
    StreamBufferFullError,
    StreamClosedError,
    UnsatisfiableReadError,
)

KINDS = pytest.mark.parametrize("kind", ["plain", "tls"])
#: Unconsumed bytes after which a stream stops reading (securetcp.iostream).
HIGH_WATER = 256 * 1024


async def read_exactly(stream: IOStream, size: int) -> bytes:
    return await asyncio.wait_for(stream.read_bytes(size), 10)


# ------------------------------------------------------------------ reads


@KINDS
async def test_read_bytes_exact(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await client.write(b"hello world")
        assert await read_exactly(server, 5) == b"hello"
        assert await read_exactly(server, 6) == b" world"
        # Bytes already buffered complete a read at once.
        await client.write(b"abcdef")
        assert await read_exactly(server, 2) == b"ab"
        assert await read_exactly(server, 4) == b"cdef"


@KINDS
async def test_read_bytes_partial(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await client.write(b"abc")
        got = await asyncio.wait_for(server.read_bytes(100, partial=True), 10)
        assert got and b"abc".startswith(got)
        if len(got) < 3:
            got += await read_exactly(server, 3 - len(got))
        assert got == b"abc"
        # partial never returns more than asked for; the rest stays buffered.
        await client.write(b"0123456789")
        await until(lambda: server.bytes_received == 13, message="all bytes received")
        assert await server.read_bytes(4, partial=True) == b"0123"
        assert await server.read_bytes(100, partial=True) == b"456789"


@KINDS
async def test_read_until(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await client.write(b"line one\r\nline two\r\npartial")
        assert await asyncio.wait_for(server.read_until(b"\r\n"), 10) == b"line one\r\n"
        assert await asyncio.wait_for(server.read_until(b"\r\n"), 10) == b"line two\r\n"
        # The delimiter arriving in a later chunk completes the pending read.
        pending = server.read_until(b"\r\n", max_bytes=100)
        await client.write(b" line\r")
        await client.write(b"\nnext")
        assert await asyncio.wait_for(pending, 10) == b"partial line\r\n"
        assert await read_exactly(server, 4) == b"next"


@KINDS
async def test_read_until_max_bytes_exceeded(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        # Delimiter present, but beyond max_bytes.
        await client.write(b"0123456789\n")
        with pytest.raises(UnsatisfiableReadError):
            await asyncio.wait_for(server.read_until(b"\n", max_bytes=5), 10)
        assert server.closed()
        assert isinstance(server.error, UnsatisfiableReadError)
    async with stream_pair(kind, pki) as (server, client):
        # No delimiter at all, more than max_bytes of data.
        await client.write(b"x" * 50)
        with pytest.raises(UnsatisfiableReadError):
            await asyncio.wait_for(server.read_until(b"\n", max_bytes=20), 10)
        assert server.closed()
        # The peer sees the connection end.
        assert await asyncio.wait_for(client.read_until_close(), 10) == b""
    async with stream_pair(kind, pki) as (server, client):
        # Delimiter exactly at the limit is fine.
        await client.write(b"abcd\n")
        assert await asyncio.wait_for(server.read_until(b"\n", max_bytes=5), 10) == b"abcd\n"


@KINDS
async def test_read_until_close(kind: str, pki: Any, no_fd_leak: None) -> None:
    payload = os.urandom(300_000)
    async with stream_pair(kind, pki) as (server, client):
        reading = server.read_until_close()
        await client.write(payload)
        client.close()
        assert await asyncio.wait_for(reading, 10) == payload
        assert server.closed()
        assert server.error is None


@KINDS
async def test_read_into(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        buffer = bytearray(8)
        pending = server.read_into(buffer)
        await client.write(b"0123")
        await client.write(b"456789")
        assert await asyncio.wait_for(pending, 10) == 8
        assert buffer == b"01234567"
        # A memoryview of a larger buffer, filled partially.
        big = bytearray(100)
        n = await asyncio.wait_for(server.read_into(memoryview(big)[10:], partial=True), 10)
        assert n == 2 and big[10:12] == b"89" and big[:10] == bytes(10)
        await client.write(b"abc")
        small = bytearray(2)
        assert await asyncio.wait_for(server.read_into(small), 10) == 2
        assert small == b"ab"
        assert await read_exactly(server, 1) == b"c"
        with pytest.raises(TypeError):
            server.read_into(memoryview(b"readonly"))


# ------------------------------------------------------------------ writes


@KINDS
async def test_write_futures_resolve(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await asyncio.wait_for(server.write(b"hello"), 10)
        await asyncio.wait_for(server.write(b""), 10)
        assert await read_exactly(client, 5) == b"hello"
        assert server.bytes_sent == 5
        assert client.bytes_received == 5


class CountingSocket(socket.socket):
    """A real TCP socket that counts its ``send`` calls (what coalescing saves)."""

    sends = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.sends += 1
        return super().send(data, flags)


#: Bytes a TLS 1.3 record adds to its payload: header, content type, AEAD tag.
TLS13_RECORD_OVERHEAD = 5 + 1 + 16


@KINDS
async def test_many_queued_writes_coalesced_and_intact(
    kind: str, pki: Any, no_fd_leak: None
) -> None:
    """Small writes queued behind a blocked one leave as few sends (or TLS
    records), not one each; every byte arrives in order."""
    rng = random.Random(7)
    big = rng.randbytes(8 * 1024 * 1024)
    messages = [f"message {i:05d};".encode() * rng.randint(1, 4) for i in range(5000)]
    expected = big + b"".join(messages) + big[:100_000]
    accepted, connecting = await socket_pair()
    # Fire-and-forget writes past the default write limit: raised for this test.
    limit = 32 * 1024 * 1024
    server: IOStream
    if kind == "plain":
        counting = CountingSocket(accepted.family, accepted.type, fileno=accepted.detach())
        server = IOStream(counting, max_write_buffer_size=limit)
        client = IOStream(connecting)
    else:
        server = SSLIOStream(
            accepted, server_context=server_context(pki), max_write_buffer_size=limit
        )
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
    try:
        # The client is not reading yet: the 8 MB write fills the socket
        # buffers, so everything after it queues in the stream.
        futures = [server.write(big)]
        assert not futures[0].done(), "the first write should not fit into the kernel"
        futures += [server.write(m) for m in messages]
        futures.append(server.write(memoryview(big)[:100_000]))
        assert not any(f.done() for f in futures)
        if kind == "plain":
            sends_before = counting.sends
            received = bytearray()
            while len(received) < len(expected):
                chunk_size = min(1024 * 1024, len(expected) - len(received))
                received += await asyncio.wait_for(client.read_bytes(chunk_size), 20)
        else:
            wire_before = peer.wire_received
            received = bytearray(await asyncio.wait_for(peer.recv_exactly(len(expected)), 20))
        assert received == expected
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert server.bytes_sent == len(expected)
        # Without merging, each of the 5000 messages would cost a send (or a
        # record) of its own; merged, the whole transfer takes a few hundred.
        if kind == "plain":
            assert counting.sends - sends_before < len(messages) // 4
        else:
            records = (peer.wire_received - wire_before - len(expected)) // TLS13_RECORD_OVERHEAD
            assert records < len(messages) // 4
    finally:
        server.close()
        if kind == "plain":
            client.close()
        else:
            connecting.close()


@KINDS
async def test_write_after_close_fails(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, _client):
        cause = ValueError("gone")
        server.close(cause)
        with pytest.raises(StreamClosedError) as info:
            await server.write(b"x")
        assert info.value.real_error is cause


# ------------------------------------------------------------------ close


@KINDS
async def test_close_wakes_reader_and_writers(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, _client):
        read = server.read_bytes(10)
        writes = [server.write(os.urandom(4 * 1024 * 1024)), server.write(b"tail")]
        assert not read.done() and not writes[0].done()
        cause = ConnectionAbortedError("shutting down")
        server.close(cause)
        assert server.closed() and server.error is cause
        futures: list[asyncio.Future[Any]] = [read, *writes]
        for future in futures:
            with pytest.raises(StreamClosedError) as info:
                await asyncio.wait_for(future, 5)
            assert info.value.real_error is cause
        # Reads after close fail the same way.
        with pytest.raises(StreamClosedError):
            await server.read_bytes(1)


@KINDS
async def test_close_without_cause(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        read = server.read_until(b"\n")
        server.close()
        with pytest.raises(StreamClosedError) as info:
            await asyncio.wait_for(read, 5)
        assert info.value.real_error is None
        # The peer sees a clean end of stream.
        assert await asyncio.wait_for(client.read_until_close(), 10) == b""


@KINDS
async def test_already_reading(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        first = server.read_bytes(3)
        for second in (
            lambda: server.read_bytes(1),
            lambda: server.read_until(b"\n"),
            lambda: server.read_until_close(),
            lambda: server.read_into(bytearray(1)),
        ):
            with pytest.raises(RuntimeError, match="Already reading"):
                second()
        await client.write(b"abc")
        assert await asyncio.wait_for(first, 10) == b"abc"


@KINDS
async def test_close_callback(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki) as (server, client):
        closed = asyncio.Event()
        calls: list[bool] = []

        def on_close() -> None:
            calls.append(server.closed())
            closed.set()

        server.set_close_callback(on_close)
        reading = server.read_bytes(1)
        client.close()
        with pytest.raises(StreamClosedError):
            await asyncio.wait_for(reading, 10)
        await asyncio.wait_for(closed.wait(), 5)
        assert calls == [True]
        server.close()  # a second close calls nothing
        # Set after the close: called soon, once.
        late = asyncio.Event()
        server.set_close_callback(late.set)
        await asyncio.wait_for(late.wait(), 5)
        assert calls == [True]


@KINDS
async def test_buffered_data_readable_after_peer_closed(
    kind: str, pki: Any, no_fd_leak: None
) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await client.write(b"<")
        assert await read_exactly(server, 1) == b"<"
        await client.write(b"abcdef\nrest")
        client.close()
        # The server stream sees the end of stream while nobody is reading.
        await until(server.closed, message="server stream to close at EOF")
        assert server.error is None
        assert await server.read_bytes(3) == b"abc"
        assert await server.read_until(b"\n") == b"def\n"
        assert await server.read_bytes(10, partial=True) == b"rest"
        with pytest.raises(StreamClosedError):
            await server.read_bytes(1)


@KINDS
async def test_buffered_data_readable_when_reading_starts_after_close(
    kind: str, pki: Any, no_fd_leak: None
) -> None:
    async with stream_pair(kind, pki) as (server, client):
        await client.write(b"0123456789")
        client.close()
        assert await read_exactly(server, 4) == b"0123"
        assert await read_exactly(server, 6) == b"456789"
        with pytest.raises(StreamClosedError):
            await asyncio.wait_for(server.read_bytes(1), 10)


@KINDS
async def test_buffer_full_without_delimiter(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki, max_buffer_size=64 * 1024) as (server, client):
        reading = server.read_until(b"\r\n\r\n")
        client.write(b"x" * (512 * 1024))
        with pytest.raises(StreamBufferFullError):
            await asyncio.wait_for(reading, 10)
        assert server.closed()
        assert isinstance(server.error, StreamBufferFullError)
        # It stopped at the limit (plus at most one read chunk), not at 512 KiB.
        assert server.bytes_received <= 64 * 1024 + 64 * 1024


@KINDS
async def test_read_until_close_over_max_buffer_size(kind: str, pki: Any, no_fd_leak: None) -> None:
    async with stream_pair(kind, pki, max_buffer_size=32 * 1024) as (server, client):
        reading = server.read_until_close()
        client.write(b"y" * (256 * 1024))
        with pytest.raises(StreamBufferFullError):
            await asyncio.wait_for(reading, 10)
        assert server.closed()


@KINDS
async def test_set_nodelay(kind: str, pki: Any, no_fd_leak: None) -> None:
    import socket

    async with stream_pair(kind, pki) as (server, _client):
        server.set_nodelay(True)
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        server.set_nodelay(False)
        assert not server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@KINDS
async def test_large_transfer_both_directions(kind: str, pki: Any, no_fd_leak: None) -> None:
    up = os.urandom(4 * 1024 * 1024)
    down = os.urandom(3 * 1024 * 1024)
    async with stream_pair(kind, pki) as (server, client):
        results = await asyncio.wait_for(
            asyncio.gather(
                client.write(up),
                server.write(down),
                server.read_bytes(len(up)),
                client.read_bytes(len(down)),
            ),
            20,
        )
        assert results[2] == up
        assert results[3] == down


# -------------------------------------------------------------------- TLS


async def test_tls_facts(pki: Any, no_fd_leak: None) -> None:
    async with stream_pair("tls", pki) as (server, client):
        assert isinstance(server, SSLIOStream) and isinstance(client, SSLIOStream)
        assert server.handshake_done and client.handshake_done
        assert server.tls_version == client.tls_version == "TLSv1.3"
        assert server.cipher is not None and server.cipher[0] == client.cipher[0]  # type: ignore[index]
        assert server.server_name is None or server.server_name == "localhost"
        assert server.peer_certificate is None  # no client certificate
        assert server.peer_identity is None
        assert client.peer_certificate is not None
        identity = client.peer_identity
        assert identity is not None
        assert "localhost" in identity.dns_names
        # wait_for_handshake after the fact resolves at once.
        await asyncio.wait_for(server.wait_for_handshake(), 1)


async def test_tls_writes_and_reads_before_handshake(pki: Any, no_fd_leak: None) -> None:
    server, client = await unstarted_tls_pair(pki)
    try:
        # Issued before either side started the handshake: they wait for it.
        sent = client.write(b"early bird\n")
        read = server.read_until(b"\n")
        assert not sent.done() and not read.done()
        server.start_handshake(timeout=10)
        await asyncio.wait_for(client.wait_for_handshake(), 10)
        assert await asyncio.wait_for(read, 10) == b"early bird\n"
        await asyncio.wait_for(sent, 10)
    finally:
        server.close()
        client.close()


async def test_handshake_failure_fails_pending_io(pki: Any, no_fd_leak: None) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    errors: list[BaseException | None] = []
    try:
        read = server.read_bytes(1)
        write = server.write(b"never")
        server.start_handshake(lambda _s, e: errors.append(e), timeout=10)
        # Plain text where a ClientHello belongs.
        await asyncio.get_running_loop().sock_sendall(connecting, b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(StreamClosedError) as info:
            await asyncio.wait_for(server.wait_for_handshake(), 10)
        assert isinstance(info.value.real_error, ssl.SSLError)
        assert len(errors) == 1 and errors[0] is server.handshake_error
        for future in (read, write):
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(future, 5)
        assert server.closed()
    finally:
        server.close()
        connecting.close()


async def test_handshake_timeout(pki: Any, no_fd_leak: None) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    done = asyncio.get_running_loop().create_future()
    try:
        server.start_handshake(lambda _s, e: done.set_result(e), timeout=0.2)
        error = await asyncio.wait_for(done, 5)
        assert isinstance(error, TimeoutError)
        assert server.closed()
        assert server.handshake_error is error
        with pytest.raises(StreamClosedError) as info:
            await server.wait_for_handshake()
        assert info.value.real_error is error
    finally:
        server.close()
        connecting.close()


async def test_tls_many_small_records_in_one_burst(pki: Any, no_fd_leak: None) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    try:
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
        chunks = [bytes([65 + i % 26]) * 7 for i in range(400)]
        payload = b"".join(chunks)
        wire = peer.records(chunks)
        assert len(wire) > len(payload) + 400 * 16  # really one record per chunk
        await asyncio.get_running_loop().sock_sendall(connecting, wire)
        # The client sends nothing after the burst: every read below has to be
        # served from the socket, OpenSSL's buffer or the stream's buffer.
        assert await read_exactly(server, 3) == payload[:3]
        assert await read_exactly(server, 10) == payload[3:13]
        assert await asyncio.wait_for(server.read_until(b"CD"), 10) == payload[13:22]
        assert await read_exactly(server, len(payload) - 22) == payload[22:]
        # And the connection still works both ways.
        await peer.send(b"ping")
        assert await read_exactly(server, 4) == b"ping"
        await server.write(b"pong")
        assert await asyncio.wait_for(peer.recv_exactly(4), 10) == b"pong"
    finally:
        server.close()
        connecting.close()


async def test_tls_pending_bytes_read_without_socket_readiness(pki: Any, no_fd_leak: None) -> None:
    """Decrypted bytes left inside OpenSSL when the stream stopped reading.

    With a 4 KB read chunk, the stream stops reading (backpressure) in the
    middle of a 10 000-byte record. The kernel buffer is then empty and never
    signals again, so the next read must drain `SSLSocket.pending()` itself.
    """
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False),
        read_chunk_size=4096,
    )
    try:
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
        await peer.send(b"!")
        assert await read_exactly(server, 1) == b"!"
        records = [os.urandom(10_000) for _ in range(27)]
        payload = b"".join(records)
        await asyncio.get_running_loop().sock_sendall(connecting, peer.records(records))
        sock = server.socket
        assert isinstance(sock, ssl.SSLSocket)
        # Nobody reads: the stream stops at its high-water mark (256 KiB of
        # unconsumed data), short of the whole payload, with decrypted bytes
        # left inside OpenSSL.
        await until(
            lambda: server.bytes_received >= HIGH_WATER and sock.pending() > 0,
            message="the stream to stop reading at its high-water mark",
        )
        assert server.bytes_received < 1 + len(payload)
        assert await read_exactly(server, len(payload)) == payload
        assert server.bytes_received == 1 + len(payload)
    finally:
        server.close()
        connecting.close()


async def test_tls_peer_closes_without_close_notify(pki: Any, no_fd_leak: None) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    try:
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
        reading = server.read_until_close()
        payload = os.urandom(100_000)
        await peer.send(payload)
        peer.close()  # a raw TCP close: no close_notify
        assert await asyncio.wait_for(reading, 10) == payload
        assert server.closed()
    finally:
        server.close()
        connecting.close()


async def test_tls_peer_closes_without_close_notify_pending_read(
    pki: Any, no_fd_leak: None
) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    try:
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
        await peer.send(b"abc")
        assert await read_exactly(server, 3) == b"abc"
        reading = server.read_bytes(10)
        peer.close()
        with pytest.raises(StreamClosedError):
            await asyncio.wait_for(reading, 10)
        assert server.closed()
    finally:
        server.close()
        connecting.close()


async def test_tls_clean_close_sends_close_notify(pki: Any, no_fd_leak: None) -> None:
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    try:
        handshake = server.wait_for_handshake()
        peer = await MemoryTLSClient.connect(connecting, pki.client_context())
        await asyncio.wait_for(handshake, 10)
        await server.write(b"bye")
        server.close()
        assert await asyncio.wait_for(peer.recv_exactly(3), 10) == b"bye"
        # A close_notify (read() returns b""), not a ragged EOF (SSLEOFError).
        for _ in range(100):
            try:
                assert peer.tls.read(1) == b""
                break
            except ssl.SSLWantReadError:
                await asyncio.wait_for(peer.fill(), 10)
        else:
            raise AssertionError("no end of stream")
    finally:
        server.close()
        connecting.close()


# ------------------------------------------------------------------- misc


async def test_plain_peer_reset(no_fd_leak: None) -> None:
    import socket
    import struct

    accepted, connecting = await socket_pair()
    server = IOStream(accepted)
    try:
        reading = server.read_bytes(10)
        # SO_LINGER 0: close() sends a RST.
        connecting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connecting.close()
        with pytest.raises(StreamClosedError) as info:
            await asyncio.wait_for(reading, 10)
        assert isinstance(info.value.real_error, ConnectionResetError)
    finally:
        server.close()


async def test_ipv6_stream(pki: Any, no_fd_leak: None) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not available")
    accepted, connecting = await socket_pair("::1")
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    client = SSLIOStream(
        pki.client_context().wrap_socket(
            connecting, server_hostname="::1", do_handshake_on_connect=False
        )
    )
    try:
        await asyncio.wait_for(
            asyncio.gather(server.wait_for_handshake(), client.wait_for_handshake()), 10
        )
        await client.write(b"over v6")
        assert await read_exactly(server, 7) == b"over v6"
    finally:
        server.close()
        client.close()


# --------------------------------------------------------- cancelled reads


@KINDS
async def test_read_cancelled_by_timeout_then_read_again(
    kind: str, pki: Any, no_fd_leak: None
) -> None:
    """`asyncio.wait_for` around a read: after the timeout the stream still reads."""
    async with stream_pair(kind, pki) as (server, client):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(server.read_bytes(5), 0.05)
        await client.write(b"hello")
        await until(lambda: server.bytes_received == 5, message="bytes to arrive")
        # No byte was handed to the cancelled read.
        assert await read_exactly(server, 5) == b"hello"
        for read in (
            lambda: server.read_until(b"\n"),
            lambda: server.read_bytes(3),
            lambda: server.read_into(bytearray(3)),
        ):
            cancelled = read()
            cancelled.cancel()
            await client.write(b"abc\n")
            assert await asyncio.wait_for(server.read_until(b"\n"), 5) == b"abc\n"


async def test_wait_for_handshake_cancelled_then_again(pki: Any, no_fd_leak: None) -> None:
    server, client = await unstarted_tls_pair(pki)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_for_handshake(), 0.05)
        assert not server.closed()
        await asyncio.wait_for(
            asyncio.gather(server.wait_for_handshake(), client.wait_for_handshake()), 10
        )
        assert server.handshake_done
    finally:
        server.close()
        client.close()


@KINDS
async def test_zero_length_reads_complete_at_once(kind: str, pki: Any, no_fd_leak: None) -> None:
    """A zero-length body (e.g. a length prefix of 0) must not wait for more data."""
    async with stream_pair(kind, pki) as (server, client):
        assert await asyncio.wait_for(server.read_bytes(0), 5) == b""
        assert await asyncio.wait_for(server.read_into(bytearray()), 5) == 0
        await client.write(b"\x00\x00abc")
        assert await read_exactly(server, 2) == b"\x00\x00"
        assert await asyncio.wait_for(server.read_bytes(0), 5) == b""
        assert await read_exactly(server, 3) == b"abc"


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_failed_writes_nobody_awaits_are_not_logged(
    kind: str, pki: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with stream_pair(kind, pki) as (server, _):
        # Queued behind a peer that does not read, then failed by the close.
        while server.write(b"q" * 65536).done():
            pass
        queued = [server.write(b"more") for _ in range(3)]
        server.close()
        assert all(f.done() for f in queued)
        del queued
        # Failed at once: after the close.
        server.write(b"late")
        server.shutdown_write()
        gc.collect()  # asyncio reports an unretrieved exception when the future goes
    assert "never retrieved" not in caplog.text


async def test_a_write_that_waits_queues_on_its_own_stream_only(pki: Any) -> None:
    async with stream_pair("plain", pki) as (blocked, _), stream_pair("plain", pki) as (free, peer):
        while blocked.write(b"q" * 65536).done():
            pass  # until the kernel stops taking it: the rest waits in a queue
        waiting = blocked.write(b"behind")
        assert not waiting.done()
        sent = free.write(b"straight through")
        assert sent.done()  # nothing queued on this stream
        assert await read_exactly(peer, 16) == b"straight through"
        blocked.close()
        assert waiting.done() and free.write(b"!").done()
