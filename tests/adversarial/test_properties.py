"""Hypothesis properties of the code that parses peers' bytes.

- IOStream framing (`read_until`, with and without `max_bytes`, `read_bytes`):
  whatever the chunking on the wire (TCP writes, TLS records) and the reader's
  chunk size, the frames are those of the same split done on the whole buffer.
- The TLS handshake path: a real ClientHello fragmented into any number of
  records, sent in any TCP chunks, still completes the handshake and an echo;
  with ``proxy_protocol=True``, a PROXY header (v1 or v2) and the ClientHello
  behind it, in any TCP chunks, give the header's address and a handshake.

(The PROXY protocol parser has its own properties in its tests; fuzz/ runs
coverage-guided fuzzing of all of these.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import struct
from typing import Any

from conftest import PKI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import EchoServer, raw_connect, serving, stream_pair

from securetcp.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from securetcp.proxyproto import encode_proxy_header

from . import tlswire

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

delimiters = st.binary(min_size=1, max_size=4)
chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=12)


def split_by(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut into pieces of the given sizes, cycling through them."""
    pieces, i, k = [], 0, 0
    while i < len(data):
        size = sizes[k % len(sizes)]
        pieces.append(data[i : i + size])
        i += size
        k += 1
    return pieces


def until_frames(data: bytes, delimiter: bytes, max_bytes: int | None) -> tuple[list[bytes], str]:
    """The reference: frames read_until returns, and how the reading ends."""
    frames: list[bytes] = []
    start = 0
    while True:
        end = data.find(delimiter, start)
        if end == -1:
            remaining = len(data) - start
            if max_bytes is not None and remaining >= max_bytes:
                return frames, "unsatisfiable"
            return frames, "closed"
        end += len(delimiter)
        if max_bytes is not None and end - start > max_bytes:
            return frames, "unsatisfiable"
        frames.append(data[start:end])
        start = end


async def read_frames(
    reader: IOStream, delimiter: bytes, max_bytes: int | None
) -> tuple[list[bytes], str]:
    frames = []
    try:
        while True:
            frames.append(await reader.read_until(delimiter, max_bytes))
    except UnsatisfiableReadError:
        return frames, "unsatisfiable"
    except StreamClosedError:
        return frames, "closed"


async def send_pieces(writer: IOStream, pieces: list[bytes]) -> None:
    for piece in pieces:
        await writer.write(piece)
        await asyncio.sleep(0)  # let the reader run between pieces
    writer.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 20))


@SETTINGS
@given(
    data=st.binary(max_size=600),
    delimiter=delimiters,
    writes=chunk_sizes,
    read_chunk=st.integers(1, 32),
    max_bytes=st.none() | st.integers(1, 80),
    kind=st.sampled_from(["plain", "tls"]),
)
def test_read_until_frames_do_not_depend_on_chunking(
    pki: PKI,
    data: bytes,
    delimiter: bytes,
    writes: list[int],
    read_chunk: int,
    max_bytes: int | None,
    kind: str,
) -> None:
    async def main() -> tuple[list[bytes], str]:
        async with stream_pair(kind, pki, read_chunk_size=read_chunk) as (server, client):
            sending = asyncio.ensure_future(send_pieces(client, split_by(data, writes)))
            result = await read_frames(server, delimiter, max_bytes)
            with contextlib.suppress(StreamClosedError):
                await sending
            return result

    assert run(main()) == until_frames(data, delimiter, max_bytes)


@SETTINGS
@given(
    data=st.binary(max_size=600),
    sizes=st.lists(st.integers(0, 90), min_size=1, max_size=10),
    writes=chunk_sizes,
    read_chunk=st.integers(1, 32),
)
def test_read_bytes_returns_exact_slices(
    pki: PKI, data: bytes, sizes: list[int], writes: list[int], read_chunk: int
) -> None:
    async def main() -> list[bytes]:
        async with stream_pair("plain", pki, read_chunk_size=read_chunk) as (server, client):
            sending = asyncio.ensure_future(send_pieces(client, split_by(data, writes)))
            got = []
            try:
                for size in sizes:
                    got.append(await server.read_bytes(size))
            except StreamClosedError:
                pass
            with contextlib.suppress(StreamClosedError):
                await sending
            return got

    expected, offset = [], 0
    for size in sizes:
        if offset + size > len(data):
            break
        expected.append(data[offset : offset + size])
        offset += size
    assert run(main()) == expected


def refragment(records_bytes: bytes, sizes: list[int]) -> bytes:
    """The handshake messages in these records, re-cut into records of `sizes`."""
    payload, offset = bytearray(), 0
    while offset < len(records_bytes):
        _, _, length = struct.unpack("!BHH", records_bytes[offset : offset + 5])
        payload += records_bytes[offset + 5 : offset + 5 + length]
        offset += 5 + length
    return b"".join(
        tlswire.record(tlswire.HANDSHAKE, piece) for piece in split_by(bytes(payload), sizes)
    )


@settings(SETTINGS, max_examples=40)
@given(
    record_sizes=st.lists(st.integers(1, 600), min_size=1, max_size=8),
    tcp_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8),
)
def test_fragmented_client_hello_completes(
    pki: PKI, record_sizes: list[int], tcp_sizes: list[int]
) -> None:
    """Any record fragmentation and TCP chunking of the ClientHello is served."""
    server = EchoServer(pki.ssl_options(), handshake_timeout=5)
    assert run(converse(pki, server, b"", record_sizes, tcp_sizes))[0] == b"ping"


async def converse(
    pki: PKI, server: EchoServer, prefix: bytes, record_sizes: list[int], tcp_sizes: list[int]
) -> tuple[bytes, Any]:
    """A TLS echo of b"ping" whose first flight is `prefix` + the ClientHello
    re-cut into `record_sizes`, sent in `tcp_sizes` chunks; (echo, address seen)."""
    async with serving(server) as port:
        loop = asyncio.get_running_loop()
        sock = await raw_connect(port)
        try:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            first = prefix + refragment(outgoing.read(), record_sizes)
            for piece in split_by(first, tcp_sizes):
                await loop.sock_sendall(sock, piece)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await loop.sock_sendall(sock, outgoing.read())
                    chunk = await loop.sock_recv(sock, 65536)
                    assert chunk, "the server closed during the handshake"
                    incoming.write(chunk)
            tls.write(b"ping")
            await loop.sock_sendall(sock, outgoing.read())
            echoed = b""
            while len(echoed) < 4:
                try:
                    echoed += tls.read(4)
                except ssl.SSLWantReadError:
                    incoming.write(await loop.sock_recv(sock, 65536))
            return echoed, server.addresses[-1] if server.addresses else None
        finally:
            sock.close()


@settings(SETTINGS, max_examples=40)
@given(
    version=st.sampled_from([1, 2]),
    source=st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535))
    | st.tuples(st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
    record_sizes=st.lists(st.integers(1, 600), min_size=1, max_size=4),
    tcp_sizes=st.lists(st.integers(1, 120), min_size=1, max_size=8),
)
def test_proxy_header_and_client_hello_in_any_chunks(
    pki: PKI,
    version: int,
    source: tuple[str, int],
    record_sizes: list[int],
    tcp_sizes: list[int],
) -> None:
    """The header is read to its last byte and no further, however the bytes arrive."""
    destination = ("::1", 443) if ":" in source[0] else ("127.0.0.1", 443)
    header = encode_proxy_header(source, destination, version=version)
    server = EchoServer(pki.ssl_options(), handshake_timeout=5, proxy_protocol=True)
    echoed, address = run(converse(pki, server, header, record_sizes, tcp_sizes))
    assert echoed == b"ping"
    assert ipaddress.ip_address(address[0]) == ipaddress.ip_address(source[0])
    assert address[1] == source[1]


def test_reference_split_examples() -> None:
    """The reference itself, on cases worked out by hand."""
    assert until_frames(b"a\nbb\nc", b"\n", None) == ([b"a\n", b"bb\n"], "closed")
    assert until_frames(b"a\nbbbb\n", b"\n", 3) == ([b"a\n"], "unsatisfiable")
    assert until_frames(b"abcabc", b"ca", None) == ([b"abca"], "closed")
    assert until_frames(b"xxxx", b"\n", 4) == ([], "unsatisfiable")
    assert until_frames(b"xxx", b"\n", 4) == ([], "closed")
    assert split_by(b"abcdef", [1, 2]) == [b"a", b"bc", b"d", b"ef"]
