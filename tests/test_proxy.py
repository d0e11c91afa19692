"""Tests for securetcp.services.proxy: TLSProxy in process, over real TLS on loopback.

Every peer is real: TLS clients on asyncio's own TLS (an implementation
independent of ours), upstreams built on TCPServer or raw sockets, the trustme
PKI from conftest, and certbuilder's CA for SPIFFE identities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import shlex
import socket
import ssl
import struct
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from certbuilder import CertBuilder
from conftest import PKI
from servers import (
    HOST,
    EchoServer,
    close_writer,
    echoed_clients,
    open_tls,
    ragged_client,
    raw_connect,
    read_to_eof,
    resetting_client,
    until,
    without_cycle_collector,
)

from securetcp.certs import PeerIdentity
from securetcp.iostream import IOStream, StreamClosedError
from securetcp.netutil import bind_unix_socket
from securetcp.services import echo as services_echo
from securetcp.services.proxy import TLSProxy, allow_list, parse_upstream
from securetcp.tcpserver import TCPServer
from securetcp.tls import TLSConfig

MiB = 1024 * 1024


# ------------------------------------------------------------------ helpers


@contextlib.asynccontextmanager
async def running(server: TCPServer, address: str = HOST) -> AsyncIterator[int]:
    """Listen on an ephemeral port; close the server (and its connections) afterwards."""
    server.listen(0, address)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await server.close(timeout=2.0)


@contextlib.asynccontextmanager
async def chain(upstream: TCPServer, **keywords: Any) -> AsyncIterator[tuple[TLSProxy, int]]:
    """A running `upstream` server with a running TLSProxy in front of it."""
    async with running(upstream) as upstream_port, proxy_to(upstream_port, **keywords) as pair:
        yield pair


@contextlib.asynccontextmanager
async def proxy_to(upstream: Any, **keywords: Any) -> AsyncIterator[tuple[TLSProxy, int]]:
    """A running TLSProxy to `upstream` (a port on HOST, or anything TLSProxy takes)."""
    target = (HOST, upstream) if isinstance(upstream, int) else upstream
    proxy = TLSProxy(target, **keywords)
    async with running(proxy) as port:
        yield proxy, port


async def plain_exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        await close_writer(writer)


async def tls_exchange(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    reader, writer = await open_tls(port, context)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        await close_writer(writer)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the peer closed (EOF or reset) without sending application data."""
    try:
        data = await asyncio.wait_for(reader.read(1), 10)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""


class Reporter(TCPServer):
    """Writes one line describing the connection (`describe`), then echoes."""

    def describe(self, stream: Any, address: Any) -> bytes:
        raise NotImplementedError

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            await stream.write(self.describe(stream, address) + b"\n")
            while True:
                await stream.write(await stream.read_bytes(65536, partial=True))
        except StreamClosedError:
            pass


class SNIReporter(Reporter):
    def describe(self, stream: Any, address: Any) -> bytes:
        return (stream.server_name or "-").encode()


class PeerReporter(Reporter):
    def describe(self, stream: Any, address: Any) -> bytes:
        identity = stream.peer_identity
        return (identity.common_name if identity else "anonymous").encode()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port nobody listens on: bound, never listening, held meanwhile
    (a port released after binding may be taken by someone who listens)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


def reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ------------------------------------------------------------ construction


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (("127.0.0.1", 80), ("127.0.0.1", 80)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("example.org:443", ("example.org", 443)),
        ("[::1]:9443", ("::1", 9443)),
        ("/run/app.sock", "/run/app.sock"),
        ("./app.sock", "./app.sock"),
        ("unix:app.sock", "app.sock"),
    ],
)
def test_parse_upstream(given: Any, expected: Any) -> None:
    assert parse_upstream(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("example.org", "HOST:PORT"),
        ("example.org:http", "HOST:PORT"),
        ("example.org:0", "1..65535"),
        ("example.org:70000", "1..65535"),
        (":80", "HOST:PORT"),
        ("::1:80", "brackets"),
        ("", "HOST:PORT"),
        ("unix:", "socket path"),
        (("h", 1, 2), "(host, port)"),
        (("", 1), "empty host"),
    ],
)
def test_parse_upstream_rejects(given: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_upstream(given)


def test_constructor_checks_its_options(pki: PKI) -> None:
    with pytest.raises(ValueError, match="send_proxy"):
        TLSProxy("127.0.0.1:80", send_proxy=3)
    with pytest.raises(ValueError, match="connect_timeout"):
        TLSProxy("127.0.0.1:80", connect_timeout=0)
    with pytest.raises(TypeError, match="upstream_ssl"):
        TLSProxy("127.0.0.1:80", upstream_ssl="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs upstream_ssl"):
        TLSProxy("127.0.0.1:80", upstream_server_hostname="localhost")
    with pytest.raises(ValueError, match="upstream_server_hostname"):
        TLSProxy("/run/app.sock", upstream_ssl=pki.client_context())
    # The server's own options are checked as always.
    with pytest.raises(ValueError, match="handshake_timeout"):
        TLSProxy("127.0.0.1:80", handshake_timeout=-1)


def identity(**fields: Any) -> PeerIdentity:
    values: dict[str, Any] = {
        "common_name": None,
        "dns_names": (),
        "ip_addresses": (),
        "uris": (),
        "emails": (),
        "serial": 1,
        "fingerprint_sha256": "00",
        "not_before": None,
        "not_after": None,
    }
    values.update(fields)
    return PeerIdentity(**values)


def test_allow_list_matches_any_list() -> None:
    authorize = allow_list(
        cns=["billing"], uris=["spiffe://example.org/billing"], dns=["Billing.Internal"]
    )
    assert authorize(identity(common_name="billing"))
    assert authorize(identity(uris=("spiffe://example.org/x", "spiffe://example.org/billing")))
    assert authorize(identity(dns_names=("billing.internal.",)))
    assert not authorize(identity(common_name="Billing"))  # common names match exactly
    assert not authorize(identity(uris=("spiffe://example.org/billing/x",)))
    assert not authorize(identity(dns_names=("other.internal",), common_name="x"))
    assert not authorize(identity())
    with pytest.raises(ValueError, match="at least one"):
        allow_list()


# ------------------------------------------------------------- the happy paths


async def test_terminates_tls_in_front_of_a_plain_service(pki: PKI, no_fd_leak: None) -> None:
    upstream = EchoServer()
    async with chain(upstream, ssl_options=pki.ssl_options()) as (proxy, port):
        payload = bytes(range(256)) * 4096  # 1 MiB
        assert await tls_exchange(port, pki.client_context(), payload) == payload
        assert await tls_exchange(port, pki.client_context(), b"again") == b"again"
        await until(lambda: proxy.stats.active == 0, message="connections closed")
        stats = proxy.stats
        assert stats.handshakes == 2
        assert stats.bytes_received == stats.bytes_sent == len(payload) + 5
        assert stats.failures == {}
        # The upstream saw the proxy, over plain TCP.
        assert all(type(s) is IOStream for s in upstream.streams)
        assert all(address[0] == HOST for address in upstream.addresses)


async def test_plain_in_plain_out(no_fd_leak: None) -> None:
    upstream = EchoServer()
    async with running(upstream) as upstream_port, proxy_to(upstream_port) as (_, port):
        assert await plain_exchange(port, b"x" * 300_000) == b"x" * 300_000


async def test_reoriginates_tls_verified_against_the_ca(pki: PKI, no_fd_leak: None) -> None:
    upstream = SNIReporter(ssl_options=pki.ssl_options())
    context = pki.client_context()
    async with chain(upstream, upstream_ssl=context, upstream_server_hostname="localhost") as (
        _,
        port,
    ):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            # SNI to the upstream is the name it was told to check.
            assert await asyncio.wait_for(reader.readline(), 10) == b"localhost\n"
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        finally:
            await close_writer(writer)
        assert upstream.stats.handshakes == 1


async def test_sni_defaults_to_the_upstream_host(pki: PKI, no_fd_leak: None) -> None:
    upstream = SNIReporter(ssl_options=pki.ssl_options())
    context = pki.client_context()
    # "localhost" is resolved (it may be ::1 first, where nobody listens).
    async with (
        running(upstream) as upstream_port,
        proxy_to(("localhost", upstream_port), upstream_ssl=context) as (_, port),
    ):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            assert await asyncio.wait_for(reader.readline(), 10) == b"localhost\n"
        finally:
            await close_writer(writer)


async def test_upstream_mutual_tls(pki: PKI, no_fd_leak: None) -> None:
    upstream = PeerReporter(
        ssl_options=TLSConfig(
            pki.cert_file, pki.key_file, client_auth="required", client_ca=pki.ca_file
        )
    )
    async with running(upstream) as upstream_port:
        with_cert = pki.client_context(with_client_cert=True)
        async with proxy_to(
            upstream_port, upstream_ssl=with_cert, upstream_server_hostname="localhost"
        ) as (_, port):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                assert await asyncio.wait_for(reader.readline(), 10) == b"test-client\n"
            finally:
                await close_writer(writer)
        # Without a client certificate the upstream refuses us: the client is
        # closed and it is counted as an upstream failure.
        async with proxy_to(
            upstream_port, upstream_ssl=pki.client_context(), upstream_server_hostname="localhost"
        ) as (proxy, port):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                assert await closed_by_peer(reader)
            finally:
                await close_writer(writer)
            await until(lambda: proxy.stats.failures.get("upstream") == 1, message="counted")
        await until(lambda: upstream.stats.failures.get("certificate") == 1)


async def test_spiffe_allow_list_on_the_front(tmp_path: Path, no_fd_leak: None) -> None:
    ca = CertBuilder(tmp_path)
    server = ca.issue("server", common_name="proxy", dns_names=["localhost"], ip_addresses=[HOST])
    billing = ca.issue("billing", uris=["spiffe://example.org/billing"], client=True)
    other = ca.issue("other", uris=["spiffe://example.org/other"], client=True)
    tls = TLSConfig(
        *server.pair,
        client_auth="required",
        client_ca=ca.ca_file,
        authorize=allow_list(uris=["spiffe://example.org/billing"]),
    )

    def context(cert: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca.ca_file))
        ctx.load_cert_chain(*map(str, cert.pair))
        return ctx

    upstream = EchoServer()
    async with chain(upstream, ssl_options=tls) as (proxy, port):
        assert await tls_exchange(port, context(billing), b"allowed") == b"allowed"
        reader, writer = await open_tls(port, context(other))
        try:
            writer.write(b"refused")
            assert await closed_by_peer(reader)
        finally:
            await close_writer(writer)
        await until(lambda: proxy.stats.failures.get("unauthorized") == 1)
        assert proxy.stats.rejected == 1
    # The refused client never reached the upstream.
    assert len(upstream.streams) == 1


async def test_unix_socket_upstream(tmp_path: Path, pki: PKI, no_fd_leak: None) -> None:
    path = tmp_path / "echo.sock"
    upstream = EchoServer()
    upstream.add_socket(bind_unix_socket(str(path)))
    try:
        async with proxy_to(str(path), ssl_options=pki.ssl_options()) as (_, port):
            assert await tls_exchange(port, pki.client_context(), b"over unix") == b"over unix"
    finally:
        await upstream.close(timeout=2.0)


class HeaderReporter(TCPServer):
    """Reads the PROXY header the proxy sends first; reports its source, then echoes."""

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        from securetcp.proxyproto import parse_proxy_header

        data = b""
        try:
            while (parsed := parse_proxy_header(data)) is None:
                data += await stream.read_bytes(65536, partial=True)
            header, used = parsed
            await stream.write(f"v{header.version} {header.source} {header.destination}\n".encode())
            if data[used:]:
                await stream.write(data[used:])
            while True:
                await stream.write(await stream.read_bytes(65536, partial=True))
        except StreamClosedError:
            pass


@pytest.mark.parametrize("version", [1, 2])
async def test_send_proxy_tells_the_upstream_who_the_client_is(
    pki: PKI, version: int, no_fd_leak: None
) -> None:
    async with chain(HeaderReporter(), ssl_options=pki.ssl_options(), send_proxy=version) as (
        _,
        port,
    ):
        reader, writer = await open_tls(port, pki.client_context())
        try:
            client = writer.get_extra_info("sockname")[:2]
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line == f"v{version} {client} ('{HOST}', {port})\n".encode()
            writer.write(b"after the header")
            assert await asyncio.wait_for(reader.readexactly(16), 10) == b"after the header"
        finally:
            await close_writer(writer)


def tcpserver_has_proxy_protocol() -> bool:
    import inspect

    return "proxy_protocol" in inspect.signature(TCPServer.__init__).parameters


@pytest.mark.skipif(
    not tcpserver_has_proxy_protocol(), reason="TCPServer(proxy_protocol=...) not implemented yet"
)
async def test_send_proxy_precedes_the_tls_handshake_to_the_upstream(
    pki: PKI, no_fd_leak: None
) -> None:
    upstream = EchoServer(ssl_options=pki.ssl_options(), proxy_protocol=True)
    context = pki.client_context()
    async with chain(
        upstream, upstream_ssl=context, upstream_server_hostname="localhost", send_proxy=2
    ) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            client = writer.get_extra_info("sockname")[:2]
            writer.write(b"tls after header")
            assert await asyncio.wait_for(reader.readexactly(16), 10) == b"tls after header"
        finally:
            await close_writer(writer)
    assert upstream.addresses[0][:2] == client


async def test_upstream_tls_true_verifies_against_certifi(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    caplog.set_level(logging.WARNING, logger="securetcp.proxy")
    # A trustme certificate is not in certifi's bundle: the upstream is refused.
    upstream = EchoServer(ssl_options=pki.ssl_options())
    async with (
        running(upstream) as upstream_port,
        proxy_to(("localhost", upstream_port), upstream_ssl=True) as (proxy, port),
    ):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            assert await closed_by_peer(reader)
        finally:
            await close_writer(writer)
        await until(lambda: proxy.stats.failures.get("upstream") == 1)
    assert any("certificate" in r.getMessage() for r in caplog.records), caplog.text


# ----------------------------------------------------------------- end of stream


class Collector(TCPServer):
    """Reads everything until the client closes; then sends `reply` and closes."""

    def __init__(self, reply: bytes = b"", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reply = reply
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        data = await stream.read_until_close()
        self.received.put_nowait(data)


async def test_client_eof_reaches_the_upstream_after_its_data(no_fd_leak: None) -> None:
    upstream = Collector()
    async with running(upstream) as upstream_port, proxy_to(upstream_port) as (_, port):
        sock = await raw_connect(port)
        try:
            payload = b"z" * 500_000
            await asyncio.get_running_loop().sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            got = await asyncio.wait_for(upstream.received.get(), 10)
            assert got == payload
            # Then the proxy closes the client too.
            assert await read_to_eof(sock) == b""
        finally:
            sock.close()


class Replier(TCPServer):
    """Reads until the client's end of stream, then answers (a half-close server)."""

    half_close = True

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            data = await stream.read_until_close()
            await stream.write(b"got %d bytes\n" % len(data))
        finally:
            stream.close()


@pytest.mark.parametrize("tls", [False, True])
async def test_half_close_is_passed_on_and_the_reply_comes_back(
    tls: bool, pki: PKI, no_fd_leak: None
) -> None:
    """The client half-closes after its request; the upstream answers after
    its end of stream; the proxy carries the answer back (with TLS to the
    upstream, the end of stream travels as close_notify)."""
    upstream = Replier(pki.ssl_options() if tls else None)
    keywords: dict[str, Any] = {"upstream_ssl": pki.client_context()} if tls else {}
    if tls:
        keywords["upstream_server_hostname"] = "localhost"
    async with (
        running(upstream) as upstream_port,
        proxy_to(upstream_port, **keywords) as (
            _,
            port,
        ),
    ):
        sock = await raw_connect(port)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"q" * 300_000)
            sock.shutdown(socket.SHUT_WR)
            assert await read_to_eof(sock) == b"got 300000 bytes\n"
        finally:
            sock.close()


class Sender(TCPServer):
    """Sends `size` bytes at once to each client, then closes."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.payload = bytes(range(251)) * (size // 251 + 1)
        self.payload = self.payload[:size]

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        await stream.write(self.payload)
        stream.close()


async def test_upstream_close_delivers_everything_then_close_notify(
    pki: PKI, no_fd_leak: None
) -> None:
    upstream = Sender(3 * MiB)
    async with chain(upstream, ssl_options=pki.ssl_options()) as (proxy, port):
        reader, writer = await open_tls(port, pki.client_context())
        try:
            # asyncio reports a clean TLS end (close_notify) as EOF, a
            # truncated one as an error: this must be the clean kind.
            got = await asyncio.wait_for(reader.read(), 10)
        finally:
            await close_writer(writer)
        assert got == upstream.payload
        await until(lambda: proxy.stats.active == 0)
        assert proxy.stats.failures == {}


# ------------------------------------------------------------------ backpressure


class Flood(TCPServer):
    """Writes `size` bytes in one write to each client and records the stream."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.streams: list[IOStream] = []
        self.writes: list[asyncio.Future[None]] = []

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.streams.append(stream)
        write = stream.write(b"f" * self.size)
        self.writes.append(write)
        with contextlib.suppress(StreamClosedError):
            await write


async def stalled(counter: Any, timeout: float = 20.0) -> int:
    """Poll `counter()` until it has not moved for 50 polls; return its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, same = counter(), 0
    while same < 50:
        if loop.time() > deadline:
            raise AssertionError(f"still moving after {timeout} s ({counter()})")
        await asyncio.sleep(0.01)
        now = counter()
        same = same + 1 if now == last else 0
        last = now
    return int(last)


@contextlib.asynccontextmanager
async def unix_chain(
    upstream: TCPServer, directory: Path, **keywords: Any
) -> AsyncIterator[tuple[TLSProxy, str]]:
    """`upstream` and a TLSProxy in front of it, both on unix sockets.

    Unix socket buffers are fixed in size (TCP's grow with autotuning, to
    tens of MiB on some systems), so what the kernel can hold is small and
    known, and what the proxy holds shows.
    """
    upstream_path, proxy_path = str(directory / "upstream.sock"), str(directory / "proxy.sock")
    upstream.add_socket(bind_unix_socket(upstream_path))
    proxy = TLSProxy(upstream_path, **keywords)
    proxy.add_socket(bind_unix_socket(proxy_path))
    try:
        yield proxy, proxy_path
    finally:
        await proxy.close(timeout=2.0)
        await upstream.close(timeout=2.0)


#: Offered by the fast side; the chain of sockets and the proxy must hold far less.
OFFERED = 32 * MiB
BOUND = 8 * MiB


async def test_a_client_that_never_reads_does_not_make_the_proxy_buffer(
    tmp_path: Path, pki: PKI, no_fd_leak: None
) -> None:
    upstream = Flood(OFFERED)
    async with unix_chain(upstream, tmp_path, ssl_options=pki.ssl_options()) as (_, path):
        reader, writer = await asyncio.open_unix_connection(
            path, ssl=pki.client_context(), server_hostname="localhost"
        )
        try:
            await until(lambda: upstream.streams, message="the upstream connection")
            accepted = await stalled(lambda: upstream.streams[0].bytes_sent)
            # Two sockets' buffers and the proxy's read-ahead and one chunk
            # (plus asyncio's TLS buffers in the client): far below the offer.
            assert accepted < BOUND
            assert not upstream.writes[0].done()
            # Nothing was lost: reading now gets every byte.
            got = 0
            while got < OFFERED:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
                assert chunk and chunk == b"f" * len(chunk)
                got += len(chunk)
            await asyncio.wait_for(upstream.writes[0], 10)
        finally:
            await close_writer(writer)


class Sink(TCPServer):
    """Never reads; records its streams."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.streams: list[IOStream] = []

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.streams.append(stream)


async def test_an_upstream_that_never_reads_pushes_back_on_the_client(
    tmp_path: Path, no_fd_leak: None
) -> None:
    async with unix_chain(Sink(), tmp_path) as (proxy, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, path)
        sending = asyncio.ensure_future(loop.sock_sendall(sock, b"w" * OFFERED))
        try:
            await until(lambda: proxy.stats.bytes_received > 0, message="data flowing")
            taken = await stalled(lambda: proxy.stats.bytes_received)
            assert taken < BOUND
            # The client is still waiting for its bytes to be taken.
            assert not sending.done()
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            sock.close()


class LateReader(TCPServer):
    """Reads nothing until `go` is set; then everything, until the client's end."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.go = asyncio.Event()
        self.streams: list[IOStream] = []
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.streams.append(stream)
        await self.go.wait()
        self.received.put_nowait(await stream.read_until_close())


@pytest.mark.parametrize("tls", [False, True])
async def test_an_upstream_that_reads_late_gets_every_byte_in_order_then_the_end(
    tls: bool, tmp_path: Path, pki: PKI, no_fd_leak: None
) -> None:
    """The proxy holds the client back while the upstream does not read, then
    delivers what it held, the rest, and the client's end of stream, in order."""
    upstream = LateReader(max_buffer_size=64 * MiB)
    options = pki.ssl_options() if tls else None
    payload = bytes(range(251)) * (12 * MiB // 251)
    async with unix_chain(upstream, tmp_path, ssl_options=options) as (proxy, path):
        if tls:
            _, writer = await asyncio.open_unix_connection(
                path, ssl=pki.client_context(), server_hostname="localhost"
            )
        else:
            _, writer = await asyncio.open_unix_connection(path)

        async def send_then_end() -> None:
            writer.write(payload)
            await writer.drain()
            if tls:
                writer.close()  # close_notify: TLS has no half-close in asyncio
            else:
                writer.write_eof()

        sending = asyncio.ensure_future(send_then_end())
        try:
            await until(lambda: proxy.stats.bytes_received > 0, message="data flowing")
            await stalled(lambda: proxy.stats.bytes_received)
            # Held back: the proxy took only part of it (asyncio's TLS
            # transport buffers the rest itself, so only plain TCP shows it).
            assert proxy.stats.bytes_received < len(payload)
            assert tls or not sending.done()
            upstream.go.set()
            got = await asyncio.wait_for(upstream.received.get(), 20)
            assert len(got) == len(payload)
            assert got == payload
            await asyncio.wait_for(sending, 10)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ssl.SSLError):
                await sending
            await close_writer(writer)


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer of `sock` has closed its end (POLLHUP), without reading."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


async def test_idle_timeout_also_closes_a_stalled_upstream(
    tmp_path: Path, no_fd_leak: None
) -> None:
    # The upstream never reads: the proxy's write to it blocks, the client's
    # stream goes quiet and idle_timeout closes it; the upstream connection
    # must go with it, not wait for the hung upstream.
    upstream = Sink()
    async with unix_chain(upstream, tmp_path, idle_timeout=0.5) as (proxy, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, path)
        sending = asyncio.ensure_future(loop.sock_sendall(sock, b"s" * OFFERED))
        try:
            await until(lambda: upstream.streams, message="the upstream connection")
            await until(lambda: proxy.stats.active == 0, timeout=10, message="the idle drop")
            # The proxy closed its upstream connection (seen without reading,
            # which would unblock the proxy's write).
            await until(lambda: hung_up(upstream.streams[0].socket), message="the upstream closed")
            assert proxy.stats.failures == {}  # an idle drop is not a failure
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sending
            sock.close()


# ------------------------------------------------------------------------ faults


async def test_upstream_refused_closes_the_client_and_counts(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    caplog.set_level(logging.WARNING, logger="securetcp.proxy")
    with refusing_port() as upstream_port:
        async with proxy_to(upstream_port, ssl_options=pki.ssl_options()) as (proxy, port):
            for _ in range(3):
                reader, writer = await open_tls(port, pki.client_context())
                try:
                    assert await closed_by_peer(reader)
                finally:
                    await close_writer(writer)
            await until(lambda: proxy.stats.failures.get("upstream") == 3)
            await until(lambda: proxy.stats.active == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "securetcp.proxy"]
    assert len(lines) == 3 and all("refused" in line for line in lines), lines


async def test_upstream_that_never_answers_tls_times_out(pki: PKI, no_fd_leak: None) -> None:
    with socket.socket() as silent:  # accepts (in the backlog), never speaks
        silent.bind((HOST, 0))
        silent.listen(8)
        async with proxy_to(
            silent.getsockname()[1],
            upstream_ssl=pki.client_context(),
            upstream_server_hostname="localhost",
            connect_timeout=0.3,
        ) as (proxy, port):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                assert await closed_by_peer(reader)
            finally:
                await close_writer(writer)
            await until(lambda: proxy.stats.failures.get("upstream") == 1)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new connect there stays
    pending (the kernel drops its SYN), as to a host that does not answer."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # one more than the queue holds
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex((HOST, port))
        yield port


async def test_upstream_connect_that_never_completes_times_out(
    pki: PKI, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="securetcp.proxy")
    with unanswered_port() as upstream_port:
        async with proxy_to(upstream_port, ssl_options=pki.ssl_options(), connect_timeout=0.3) as (
            proxy,
            port,
        ):
            reader, writer = await open_tls(port, pki.client_context())
            try:
                assert await closed_by_peer(reader)
            finally:
                await close_writer(writer)
            await until(lambda: proxy.stats.failures.get("upstream") == 1)
            await until(lambda: proxy.stats.active == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "securetcp.proxy"]
    assert any("connect timed out after 0.3 s" in line for line in lines), lines


async def test_a_client_that_resets_ends_its_upstream_connect(no_fd_leak: None) -> None:
    with unanswered_port() as upstream_port:
        async with proxy_to(upstream_port, connect_timeout=600) as (proxy, port):
            client = await raw_connect(port)  # plain TCP: its reset reaches the proxy as one
            await until(lambda: proxy.stats.accepted == 1)
            # A reset (a clean end could be a half-close still waiting for the reply).
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            # Over without waiting for the connect: not counted as the upstream's fault.
            await until(lambda: proxy.stats.active == 0)
            assert proxy.stats.failures.get("upstream") is None


async def test_closing_the_proxy_ends_upstream_connects_in_progress(
    pki: PKI, no_fd_leak: None
) -> None:
    with unanswered_port() as upstream_port:
        async with proxy_to(upstream_port, ssl_options=pki.ssl_options(), connect_timeout=600) as (
            proxy,
            port,
        ):
            reader, writer = await open_tls(port, pki.client_context())
            await until(lambda: proxy.stats.handshakes == 1)
        # The proxy closed (leaving proxy_to) with the connect still pending:
        # the client is closed, and no descriptor is left (no_fd_leak).
        try:
            assert await closed_by_peer(reader)
        finally:
            await close_writer(writer)


async def test_a_proxied_connection_holds_no_task(pki: PKI, no_fd_leak: None) -> None:
    # securetcp's echo service upstream: no task per connection either.
    async with chain(services_echo.EchoServer(), ssl_options=pki.ssl_options()) as (proxy, port):
        tasks_before = len(asyncio.all_tasks())
        async with echoed_clients(port, pki.client_context(), 10):
            assert proxy.stats.active == 10
            assert len(asyncio.all_tasks()) == tasks_before
        await until(lambda: proxy.stats.active == 0)


async def test_a_client_closing_without_close_notify_is_not_counted_as_broken(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    # Most TLS clients close without close_notify. OpenSSL answers that EOF
    # with an alert, the closed client's kernel with a reset, and passing the
    # upstream's end on to the client then fails: not the client's fault.
    caplog.set_level(logging.INFO, logger="securetcp.proxy")
    async with chain(services_echo.EchoServer(), ssl_options=pki.ssl_options()) as (proxy, port):
        for _ in range(3):
            await asyncio.to_thread(ragged_client, port, pki.client_context())
        await until(lambda: proxy.stats.active == 0 and proxy.stats.handshakes == 3)
        assert proxy.stats.failures == {}
    broken = [r.getMessage() for r in caplog.records if "broke" in r.getMessage()]
    assert broken == []


@pytest.mark.parametrize("client", ["ragged", "reset"])
async def test_a_finished_proxied_connection_is_freed_at_once(
    pki: PKI, no_fd_leak: None, client: str
) -> None:
    # Without the cycle collector, what is left of a connection is what a
    # reference cycle holds; it would wait for the collector (see test_tcpserver).
    refs: list[weakref.ref[IOStream]] = []

    class Remembering(TLSProxy):
        def handle_stream(self, stream: IOStream, address: Any) -> asyncio.Future[None]:
            refs.append(weakref.ref(stream))
            return super().handle_stream(stream, address)

    context = pki.client_context()
    with without_cycle_collector():
        async with running(services_echo.EchoServer()) as upstream_port:
            proxy = Remembering((HOST, upstream_port), ssl_options=pki.ssl_options())
            async with running(proxy) as port:
                exchange = ragged_client if client == "ragged" else resetting_client
                for _ in range(3):
                    await asyncio.to_thread(exchange, port, context)
                await until(lambda: proxy.stats.active == 0 and len(refs) == 3)
                # (See test_tcpserver: a stream in a cycle is never freed here.)
                await until(
                    lambda: all(ref() is None for ref in refs),
                    message="every finished client stream freed, none held by a reference cycle",
                )


async def test_upstream_with_the_wrong_name_is_refused(pki: PKI, no_fd_leak: None) -> None:
    upstream = EchoServer(ssl_options=pki.ssl_options())
    context = pki.client_context()
    async with chain(upstream, upstream_ssl=context, upstream_server_hostname="other.example") as (
        proxy,
        port,
    ):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            assert await closed_by_peer(reader)
        finally:
            await close_writer(writer)
        await until(lambda: proxy.stats.failures.get("upstream") == 1)
    assert upstream.streams == []


class ResetAfterFirstChunk(TCPServer):
    """Echoes, except that a chunk starting with b"reset" resets the connection."""

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                if data.startswith(b"reset"):
                    reset(stream.socket)
                    stream.close()
                    return
                await stream.write(data)
        except StreamClosedError:
            pass


async def test_upstream_reset_mid_transfer(pki: PKI, no_fd_leak: None) -> None:
    upstream = ResetAfterFirstChunk()
    async with chain(upstream, ssl_options=pki.ssl_options()) as (proxy, port):
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.write(b"reset now")
            assert await closed_by_peer(reader)
        finally:
            await close_writer(writer)
        await until(lambda: proxy.stats.failures.get("upstream_reset") == 1)
        # Others are served as before.
        assert await tls_exchange(port, pki.client_context(), b"next") == b"next"
        await until(lambda: proxy.stats.active == 0)
        assert proxy.stats.failures == {"upstream_reset": 1}


async def test_client_reset_mid_transfer(pki: PKI, no_fd_leak: None) -> None:
    upstream = EchoServer()
    async with running(upstream) as upstream_port, proxy_to(upstream_port) as (proxy, port):
        sock = await raw_connect(port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"partial")
        assert await asyncio.wait_for(loop.sock_recv(sock, 7), 10) == b"partial"
        reset(sock)
        await until(lambda: proxy.stats.failures.get("client_reset") == 1)
        await until(lambda: all(s.closed() for s in upstream.streams), message="upstream closed")
        assert await plain_exchange(port, b"still serving") == b"still serving"


async def test_close_ends_open_connections(pki: PKI, no_fd_leak: None) -> None:
    upstream = EchoServer()
    async with running(upstream) as upstream_port:
        proxy = TLSProxy((HOST, upstream_port), ssl_options=pki.ssl_options())
        proxy.listen(0, HOST)
        port = proxy.sockets[0].getsockname()[1]
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
            await proxy.close(timeout=0.2)
            assert await closed_by_peer(reader)
            await until(lambda: all(s.closed() for s in upstream.streams))
        finally:
            await close_writer(writer)


# ---------------------------------------------------------------------- the CLI


def example_commands() -> list[list[str]]:
    """The `securetcp proxy ...` lines of `securetcp proxy --help`, as argv lists."""
    from securetcp.cli.proxy import EXAMPLES

    commands, pending = [], ""
    for line in EXAMPLES.splitlines():
        text = line.strip()
        if pending:
            text = pending + " " + text
            pending = ""
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        if text.startswith("securetcp proxy "):
            commands.append(shlex.split(text)[1:])
    return commands


def test_help_examples_parse() -> None:
    from securetcp.cli import build_parser

    commands = example_commands()
    assert len(commands) >= 4
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.func is not None and args.upstream


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("8443", ("127.0.0.1", 8443)),
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("[::1]:0", ("::1", 0)),
        ("*:8443", ("", 8443)),
    ],
)
def test_listen_option(given: str, expected: tuple[str, int]) -> None:
    from securetcp.cli.proxy import parse_listen

    assert parse_listen(given) == expected


def test_bad_listen_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from securetcp.cli import main

    assert main(["proxy", "--listen", "nope", "--upstream", "127.0.0.1:1"]) == 2
    assert "[HOST:]PORT" in capsys.readouterr().err


def test_runs_on_uvloop(pki: PKI) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> bytes:
        async with chain(EchoServer(), ssl_options=pki.ssl_options()) as (_, port):
            return await tls_exchange(port, pki.client_context(), b"on uvloop" * 10_000)

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.wait_for(main(), 20)) == b"on uvloop" * 10_000
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--plain", "--client-auth", "required"], "--client-auth needs TLS"),
        (["--plain", "--upstream-key", "k.pem"], "--upstream-key needs --upstream-cert"),
        (["--plain", "--send-proxy", "v3"], "expected v1 or v2"),
        (["--plain", "--upstream-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (["--plain", "--connect-timeout", "0"], "connect_timeout"),
    ],
)
def test_configuration_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from securetcp.cli import main

    status = main(["proxy", "--listen", "0", "--upstream", "127.0.0.1:1", *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err, err
