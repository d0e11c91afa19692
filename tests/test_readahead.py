"""OpenSSL read-ahead on server streams, and the bytes it may hide.

With read-ahead (securetcp/_openssl.py), one read system call can pull
several TLS records into OpenSSL, where neither socket readiness nor
``pending()`` reveals them. These tests make the peer put many records, or a
record right behind its handshake, into one TCP segment and then go quiet:
every read must still complete. They run with read-ahead on and, as a
control, with the stream's fallback (no read-ahead).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from servers import MemoryTLSClient, server_context, socket_pair

from securetcp import _openssl, ssliostream
from securetcp.iostream import SSLIOStream

needs_libssl = pytest.mark.skipif(_openssl.libssl() is None, reason="libssl not reachable")


@pytest.fixture(params=["read-ahead", "fallback"])
def read_ahead(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with read-ahead on, and again with the stream's fallback."""
    if request.param == "fallback":
        # No public switch turns read-ahead off: this is the seam the stream
        # itself falls back through when ctypes cannot reach OpenSSL.
        monkeypatch.setattr(ssliostream, "prepare_connection", lambda tls: 0)
        return False
    if _openssl.libssl() is None:
        pytest.skip("libssl not reachable through ctypes")
    return True


@contextlib.asynccontextmanager
async def server_and_peer(pki: Any) -> AsyncIterator[tuple[SSLIOStream, MemoryTLSClient, Any]]:
    """A server stream wrapped like TCPServer does it, and a byte-exact TLS peer."""
    accepted, connecting = await socket_pair()
    server = SSLIOStream(accepted, server_context=server_context(pki))
    peer = MemoryTLSClient(connecting, pki.client_context())
    try:
        yield server, peer, connecting
    finally:
        server.close()
        connecting.close()


async def read_exactly(stream: SSLIOStream, size: int) -> bytes:
    return await asyncio.wait_for(stream.read_bytes(size), 10)


async def test_server_streams_read_ahead(pki: Any, read_ahead: bool, no_fd_leak: None) -> None:
    async with server_and_peer(pki) as (server, peer, _):
        # Private on purpose: whether the stream holds OpenSSL's SSL* (and so
        # turns read-ahead on) is visible nowhere else; it proves that the
        # two parametrizations really run the two paths.
        assert bool(server._tls_ptr) is read_ahead
        handshake = server.wait_for_handshake()
        await peer.handshake()
        await asyncio.wait_for(handshake, 10)


async def test_burst_of_records_in_one_segment(
    pki: Any, read_ahead: bool, no_fd_leak: None
) -> None:
    async with server_and_peer(pki) as (server, peer, sock):
        handshake = server.wait_for_handshake()
        await peer.handshake()
        await asyncio.wait_for(handshake, 10)
        chunks = [bytes([97 + i % 26]) * 50 for i in range(300)]
        await asyncio.get_running_loop().sock_sendall(sock, peer.records(chunks))
        # Nothing more arrives: each read below is served from what one or
        # two read() calls pulled in, much of it undecrypted inside OpenSSL.
        for chunk in chunks:
            assert await read_exactly(server, len(chunk)) == chunk
        await server.write(b"done")
        assert await asyncio.wait_for(peer.recv_exactly(4), 10) == b"done"


async def test_data_in_the_same_segment_as_the_handshake_end(
    pki: Any, read_ahead: bool, no_fd_leak: None
) -> None:
    """The client's Finished and its first request arrive together."""
    async with server_and_peer(pki) as (server, peer, sock):
        handshake = server.wait_for_handshake()
        await peer.handshake(flush=False)
        peer.tls.write(b"first request")  # queued behind the client's Finished
        await asyncio.get_running_loop().sock_sendall(sock, peer.outgoing.read())
        await asyncio.wait_for(handshake, 10)
        assert await read_exactly(server, 13) == b"first request"


async def test_large_transfer_both_ways(pki: Any, read_ahead: bool, no_fd_leak: None) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with server_and_peer(pki) as (server, peer, sock):
        handshake = server.wait_for_handshake()
        await peer.handshake()
        await asyncio.wait_for(handshake, 10)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(
            sock, peer.records([payload[i : i + 16384] for i in range(0, len(payload), 16384)])
        )
        assert await read_exactly(server, len(payload)) == payload
        await server.write(payload)
        assert await asyncio.wait_for(peer.recv_exactly(len(payload)), 10) == payload


@needs_libssl
def test_ssl_pointer_refuses_unknown_layouts(pki: Any) -> None:
    context = server_context(pki)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    wrapper = context.wrap_bio(incoming, outgoing, server_side=True)
    # The Python-level SSLObject is not the C struct: no pointer is read from it.
    assert _openssl.ssl_pointer(wrapper) == 0
    # Its C object is, and OpenSSL confirms the SSL* belongs to the context
    # (CPython keeps that object in the private _sslobj: what _openssl reads).
    assert _openssl.ssl_pointer(wrapper._sslobj) != 0  # type: ignore[attr-defined]
