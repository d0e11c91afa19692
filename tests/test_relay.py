"""Tests for securetcp.relay: Relay between real streams (plain and TLS, on
loopback), and a server whose handle_stream returns one (the echo service)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PKI
from servers import (
    EchoServer,
    close_writer,
    echoed_clients,
    open_tls,
    raw_connect,
    read_to_eof,
    serving,
    socket_pair,
    until,
    without_cycle_collector,
)
from servers import stream_pair as make_stream_pair

from securetcp.iostream import IOStream
from securetcp.relay import Relay
from securetcp.services import echo
from securetcp.tcpserver import TCPServer

MiB = 1024 * 1024


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_a_relay_carries_every_byte_in_order_then_passes_the_end_on(
    kind: str, pki: PKI
) -> None:
    async with (
        make_stream_pair(kind, pki) as (a_server, a_client),
        make_stream_pair(kind, pki) as (b_server, b_client),
    ):
        ended: list[str] = []
        relay = Relay(a_server, b_server, on_ended=lambda: ended.append("ended"))
        payload = bytes(range(256)) * (3 * MiB // 256)

        async def send() -> None:
            await a_client.write(payload)
            await a_client.shutdown_write()

        sending = asyncio.ensure_future(send())
        received = await b_client.read_until_close()
        await sending
        assert received == payload
        await relay  # over: the end of stream was passed on
        assert relay.done() and ended == ["ended"]


async def test_a_relay_whose_source_breaks_resets_its_sink(pki: PKI) -> None:
    async with (
        make_stream_pair("plain", pki) as (a_server, a_client),
        make_stream_pair("plain", pki) as (b_server, b_client),
    ):
        relay = Relay(a_server, b_server)
        await a_client.write(b"partial")
        assert await b_client.read_bytes(7) == b"partial"
        a_client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        a_client.close()  # a reset, not an end of stream
        await relay
        assert b_server.closed()
        # b's peer sees a reset, never a clean end it could take for completion.
        assert await b_client.read_until_close() == b""
        assert isinstance(b_client.error, ConnectionResetError)


async def test_a_relay_stops_when_its_sink_closes_and_closes_both_when_asked(pki: PKI) -> None:
    async with (
        make_stream_pair("plain", pki) as (a_server, a_client),
        make_stream_pair("plain", pki) as (b_server, _),
    ):
        relay = Relay(a_server, b_server, close=True)
        b_server.close()
        await a_client.write(b"after the sink closed")
        await relay
        assert a_server.closed()


async def test_awaiting_a_relay_that_is_over_returns_at_once(pki: PKI) -> None:
    async with make_stream_pair("plain", pki) as (server, _):
        server.close()
        relay = Relay(server, server)  # nothing to read: over at once
        assert relay.done()
        await relay


async def test_an_echo_holds_no_task_per_connection(pki: PKI, no_fd_leak: None) -> None:
    server = echo.EchoServer(pki.ssl_options())
    async with serving(server) as port:
        tasks_before = len(asyncio.all_tasks())
        async with echoed_clients(port, pki.client_context(), 20):
            assert server.stats.active == 20
            assert len(asyncio.all_tasks()) == tasks_before  # the clients' own are not tasks
        await until(lambda: server.stats.active == 0, message="connections closed")


async def test_a_handler_awaiting_the_echo_resumes_once_the_client_is_done(
    pki: PKI, no_fd_leak: None
) -> None:
    after: list[bool] = []

    class Server(echo.EchoServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            await super().handle_stream(stream, address)
            after.append(stream.closed())

    async with serving(Server(pki.ssl_options())) as port:
        reader, writer = await open_tls(port, pki.client_context())
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        assert after == []  # still echoing
        await close_writer(writer)
        await until(lambda: after == [True], message="the handler to resume")


async def test_a_half_closing_client_gets_everything_back_then_the_end(no_fd_leak: None) -> None:
    server = echo.EchoServer()
    async with serving(server) as port:
        sock = await raw_connect(port)
        try:
            payload = b"x" * (3 * MiB)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            assert await read_to_eof(sock, timeout=20) == payload
        finally:
            sock.close()


async def test_close_lets_relayed_connections_finish(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), 10) == b"one"
        closing = asyncio.ensure_future(server.close(timeout=30))
        await until(lambda: not server.sockets, message="the server to stop listening")
        # Still served while the server waits for it.
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), 10) == b"two"
        assert not closing.done()
        await close_writer(writer)
        await asyncio.wait_for(closing, 10)


async def test_close_with_a_timeout_closes_relayed_connections_left(
    pki: PKI, no_fd_leak: None
) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"one")
            assert await asyncio.wait_for(reader.readexactly(3), 10) == b"one"
            await asyncio.wait_for(server.close(timeout=0.1), 10)
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                # The server closed it: an end of stream (or a reset), nothing more.
                await asyncio.wait_for(reader.readexactly(1), 10)
        finally:
            await close_writer(writer)


class _Forwarder(TCPServer):
    """Relays each client to one other stream (returns a Relay that is not an echo)."""

    def __init__(self, sink: IOStream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sink = sink

    def handle_stream(self, stream: IOStream, address: Any) -> Relay:
        return Relay(stream, self.sink)


async def test_a_server_can_return_any_relay(pki: PKI, no_fd_leak: None) -> None:
    async with make_stream_pair("plain", pki) as (sink, sink_peer):
        server = _Forwarder(sink)
        async with serving(server) as port:
            sock = await raw_connect(port)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, b"forwarded")
                assert await sink_peer.read_bytes(9) == b"forwarded"
            finally:
                sock.close()
            await until(lambda: server.stats.active == 0, message="the client's end")


class ReadmeEcho(TCPServer):
    """The README's relay echo, as printed there."""

    half_close = True

    def handle_stream(self, stream: IOStream, address: Any) -> Relay:
        return Relay(stream, stream, close=True)


async def test_the_readme_relay_echo_serves_tls(pki: PKI, no_fd_leak: None) -> None:
    server = ReadmeEcho(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"hello relay")
            assert await asyncio.wait_for(reader.readexactly(11), 10) == b"hello relay"
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0, message="the connection closed")


class FormattedLines(logging.Handler):
    """Keeps each record as its formatted text only (no traceback objects)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def formatted_logs(name: str) -> Iterator[list[str]]:
    """Records of logger `name`, as text, kept from every other handler
    (pytest's own keep the records, and with them their tracebacks)."""
    logger = logging.getLogger(name)
    handler = FormattedLines()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield handler.lines
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


async def test_a_relay_broken_by_a_failing_write_is_logged_and_leaves_no_cycle(
    no_fd_leak: None,
) -> None:
    class FailingSink(IOStream):
        def write(self, data: Any) -> asyncio.Future[None]:
            raise RuntimeError("a bug in the sink")

    (source_sock, client_sock), (sink_sock, far_sock) = await socket_pair(), await socket_pair()
    client = IOStream(client_sock)
    far = IOStream(far_sock)
    try:
        with without_cycle_collector(), formatted_logs("securetcp.relay") as logged:
            source = IOStream(source_sock)
            relay = Relay(source, FailingSink(sink_sock))
            await client.write(b"anything")
            await asyncio.wait_for(relay, 5)
            assert isinstance(source.error, RuntimeError) and source.closed()
            assert len(logged) == 1 and "relay: writing to" in logged[0]
            assert "RuntimeError: a bug in the sink" in logged[0]  # with its traceback
            # The error kept on the source must not hold it (through its
            # traceback's frames) in a reference cycle.
            source_ref = weakref.ref(source)
            del source, relay
            await until(lambda: source_ref() is None, message="the broken source freed")
    finally:
        client.close()
        far.close()
