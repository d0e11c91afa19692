"""Tests for securetcp.tcpserver: TCPServer over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import weakref
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, make_pki
from servers import (
    HOST,
    EchoServer,
    MemoryTLSClient,
    close_writer,
    echo_once,
    half_close_without_close_notify,
    open_tls,
    ragged_client,
    raw_connect,
    read_to_eof,
    resetting_client,
    server_context,
    serving,
    tls_attempt,
    until,
    without_cycle_collector,
)

from securetcp.iostream import IOStream, SSLIOStream, StreamClosedError
from securetcp.services import echo as services_echo
from securetcp.tcpserver import ServerStats, TCPServer, classify_handshake_error


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def assert_failures(server: TCPServer, expected: dict[str, int]) -> ServerStats:
    """Wait until the failures are counted and every connection is gone."""
    await until(
        lambda: server.stats.failures == expected and server.stats.active == 0,
        message=f"failures == {expected} (now {server.stats})",
    )
    stats = server.stats
    assert stats.handshakes == 0
    return stats


# -------------------------------------------------------- handshake failures


async def test_handshake_timeout_while_another_client_is_served(pki: PKI, no_fd_leak: None) -> None:
    active_seen: list[int] = []

    class Server(EchoServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            active_seen.append(self.stats.active)
            await super().handle_stream(stream, address)

    # The deadline also bounds the served client's handshake: 2 s, so that a
    # loaded machine still serves it before the silent one is dropped.
    server = Server(pki.ssl_options(), handshake_timeout=2.0)
    async with serving(server) as port:
        silent = await raw_connect(port)
        try:
            # TCP_DEFER_ACCEPT holds the silent client back for ~3 s first.
            await until(
                lambda: server.stats.accepted == 1, timeout=15, message="silent client accepted"
            )
            # Served while the silent client is still in its handshake.
            assert await echo_once(port, pki.client_context(), b"hello") == b"hello"
            assert active_seen == [2]
            # The silent client is dropped at the deadline.
            assert await read_to_eof(silent, timeout=10) == b""
        finally:
            silent.close()
        await until(lambda: server.stats.failures == {"timeout": 1}, message="timeout counted")
        stats = server.stats
        assert stats.accepted == 2 and stats.handshakes == 1
        assert len(server.streams) == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        random.Random(1234).randbytes(512),
    ],
    ids=["http", "random"],
)
async def test_plaintext_client(pki: PKI, payload: bytes, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        sock = await raw_connect(port)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, payload)
            assert await read_to_eof(sock) == b""  # no reply, just closed
        finally:
            sock.close()
        await assert_failures(server, {"plaintext": 1})
    assert server.streams == []


async def test_plaintext_http_and_random_counted_together(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        for payload in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(64), b"\x00" * 32):
            sock = await raw_connect(port)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, payload)
                await read_to_eof(sock)
            finally:
                sock.close()
        stats = await assert_failures(server, {"plaintext": 3})
        assert stats.accepted == 3
        # The server still serves TLS.
        assert await echo_once(port, pki.client_context(), b"ok") == b"ok"
    assert len(server.streams) == 1


async def test_eof_mid_handshake(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        # Half a ClientHello, then close.
        sock = await raw_connect(port)
        hello = MemoryTLSClient(sock, pki.client_context()).client_hello()
        assert len(hello) > 100
        await asyncio.get_running_loop().sock_sendall(sock, hello[: len(hello) // 2])
        sock.close()
        await assert_failures(server, {"eof": 1})
        # Connect and close at once, without a byte.
        sock = await raw_connect(port)
        sock.close()
        await assert_failures(server, {"eof": 2})
        # A full ClientHello, then close before the client's Finished.
        sock = await raw_connect(port)
        client = MemoryTLSClient(sock, pki.client_context())
        await asyncio.get_running_loop().sock_sendall(sock, client.client_hello())
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), 5)
        sock.close()
        stats = await assert_failures(server, {"eof": 3})
        assert stats.accepted == 3
    assert server.streams == []


async def test_protocol_version_mismatch(pki: PKI, no_fd_leak: None) -> None:
    context = server_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    server = EchoServer(context)
    async with serving(server) as port:
        client = pki.client_context()
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        error = await tls_attempt(port, client)
        assert isinstance(error, ssl.SSLError)
        await assert_failures(server, {"protocol": 1})
    assert server.streams == []


async def test_no_shared_cipher(pki: PKI, no_fd_leak: None) -> None:
    context = server_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    server = EchoServer(context)
    async with serving(server) as port:
        client = pki.client_context()
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        client.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
        error = await tls_attempt(port, client)
        assert isinstance(error, ssl.SSLError)
        await assert_failures(server, {"protocol": 1})
    assert server.streams == []


def mutual_tls_context(pki: PKI) -> ssl.SSLContext:
    context = server_context(pki)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki.ca_file))
    return context


async def test_client_certificate_required(pki: PKI, tmp_path: Path, no_fd_leak: None) -> None:
    identities: list[Any] = []

    class Server(EchoServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            assert isinstance(stream, SSLIOStream)
            identities.append(stream.peer_identity)
            await super().handle_stream(stream, address)

    server = Server(mutual_tls_context(pki))
    other = make_pki(tmp_path / "other")
    async with serving(server) as port:
        # No client certificate.
        error = await tls_attempt(port, pki.client_context())
        assert error is not None
        await assert_failures(server, {"certificate": 1})
        # A client certificate from a CA the server does not trust.
        untrusted = pki.client_context()
        untrusted.load_cert_chain(str(other.client_cert_file), str(other.client_key_file))
        error = await tls_attempt(port, untrusted)
        assert error is not None
        await assert_failures(server, {"certificate": 2})
        assert server.streams == [] and identities == []
        # The right certificate gets through, with its identity known.
        good = pki.client_context(with_client_cert=True)
        assert await tls_attempt(port, good) is None
        await until(lambda: server.stats.handshakes == 1)
        assert server.stats.failures == {"certificate": 2}
    assert len(identities) == 1 and identities[0] is not None
    assert identities[0].common_name == "test-client"


async def test_failures_never_disturb_a_served_connection(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options(), handshake_timeout=2)
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            for payload in (b"GET / HTTP/1.1\r\n\r\n", b""):
                sock = await raw_connect(port)
                await asyncio.get_running_loop().sock_sendall(sock, payload)
                sock.close()
                writer.write(b"still here")
                assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
            await until(lambda: server.stats.failures == {"plaintext": 1, "eof": 1})
        finally:
            await close_writer(writer)


# ------------------------------------------------------------------ data


async def test_multi_megabyte_echo_both_directions(pki: PKI, no_fd_leak: None) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:

            async def send() -> None:
                view = memoryview(payload)
                for offset in range(0, len(payload), 256 * 1024):
                    writer.write(view[offset : offset + 256 * 1024])
                    await writer.drain()

            _, echoed = await asyncio.wait_for(
                asyncio.gather(send(), reader.readexactly(len(payload))), 25
            )
            assert echoed == payload
            stats = server.stats
            assert stats.bytes_received == stats.bytes_sent == len(payload)
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        stats = server.stats
        assert stats.bytes_received == stats.bytes_sent == len(payload)
        assert stats.accepted == stats.handshakes == 1


async def test_slow_reader_keeps_server_buffers_bounded(pki: PKI, no_fd_leak: None) -> None:
    total = 32 * 1024 * 1024
    chunk = os.urandom(256 * 1024)
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            await until(lambda: len(server.streams) == 1)
            stream = server.streams[0]
            peak = 0
            sent = 0

            async def send() -> None:
                nonlocal sent
                while sent < total:
                    writer.write(chunk)
                    sent += len(chunk)
                    await writer.drain()

            def sample() -> int:
                # What an echo server holds: bytes read but not yet handed
                # back to the kernel (its read buffer and its write queue).
                nonlocal peak
                held = stream.bytes_received - stream.bytes_sent
                peak = max(peak, held)
                return held

            stable = {"value": -1, "polls": 0}

            def stalled() -> bool:
                # The client's sends block (its transport keeps what the
                # kernel refused) and the server's count has not moved for
                # 20 polls (~100 ms).
                sample()
                received = stream.bytes_received
                if received != stable["value"] or writer.transport.get_write_buffer_size() == 0:
                    stable.update(value=received, polls=0)
                    return False
                stable["polls"] += 1
                return received > 0 and stable["polls"] >= 20

            sender = asyncio.ensure_future(send())
            # The client does not read: the server stops reading once its
            # buffers are full, and the client's sends then block.
            await until(stalled, timeout=10, message="server to apply backpressure")
            stalled_at = stream.bytes_received
            assert not sender.done()
            assert stalled_at < total // 2
            # Now read slowly, 64 KB at a time, sampling the server's buffers.
            received = 0
            expected = chunk * (total // len(chunk))
            while received < total:
                data = await asyncio.wait_for(reader.read(64 * 1024), 10)
                assert data, "connection ended early"
                assert data == expected[received : received + len(data)]
                received += len(data)
                sample()
            await asyncio.wait_for(sender, 10)
            assert peak < 2 * 1024 * 1024, f"server held {peak} bytes"
        finally:
            await close_writer(writer)


async def test_handler_exception_logged_and_isolated(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    class Server(EchoServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            first = await stream.read_bytes(4)
            if first == b"boom":
                raise ValueError("handler exploded")
            await stream.write(first)
            await super().handle_stream(stream, address)

    server = Server(pki.ssl_options())
    caplog.set_level(logging.ERROR, logger="securetcp.tcpserver")
    async with serving(server) as port:
        good_reader, good_writer = await open_tls(port, pki.client_context())
        bad_reader, bad_writer = await open_tls(port, pki.client_context())
        try:
            good_writer.write(b"good")
            assert await asyncio.wait_for(good_reader.readexactly(4), 5) == b"good"
            bad_writer.write(b"boom")
            assert await asyncio.wait_for(bad_reader.read(), 5) == b""  # closed
            good_writer.write(b"more")
            assert await asyncio.wait_for(good_reader.readexactly(4), 5) == b"more"
            assert server.stats.handler_errors == 1
            await until(lambda: server.stats.active == 1)
        finally:
            await close_writer(good_writer)
            await close_writer(bad_writer)
    records = [r for r in caplog.records if "handle_stream" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is ValueError
    assert "handler exploded" in caplog.text and "Traceback" in caplog.text


async def test_plain_function_handler(pki: PKI, no_fd_leak: None) -> None:
    class Server(TCPServer):
        def handle_stream(self, stream: IOStream, address: Any) -> None:
            stream.write(b"hello from a function\n")
            stream.read_until(b"\n").add_done_callback(
                lambda f: stream.write(f.result()) if not f.exception() else None
            )

    server = Server(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello from a function\n"
            writer.write(b"echo me\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"echo me\n"
        finally:
            await close_writer(writer)


async def test_plain_function_handler_exception(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    class Server(TCPServer):
        def handle_stream(self, stream: IOStream, address: Any) -> None:
            raise RuntimeError("sync handler failed")

    server = Server(pki.ssl_options())
    caplog.set_level(logging.ERROR, logger="securetcp.tcpserver")
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        assert server.stats.handler_errors == 1
    assert "sync handler failed" in caplog.text and "Traceback" in caplog.text


async def test_plain_tcp_server(no_fd_leak: None) -> None:
    server = EchoServer()
    async with serving(server) as port:
        payload = os.urandom(1024 * 1024)
        assert await echo_once(port, None, payload) == payload
        await until(lambda: server.stats.active == 0)
        stats = server.stats
        assert stats.accepted == 1 and stats.handshakes == 0
        assert stats.bytes_received == stats.bytes_sent == len(payload)
    assert type(server.streams[0]) is IOStream


class GreetingServer(TCPServer):
    """Expects b"hello\\n" first; anything else is a failure of its own protocol."""

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            if await stream.read_until(b"\n", max_bytes=64) == b"hello\n":
                await stream.write(b"welcome\n")
            else:
                self.count_failure("bad_greeting")
        finally:
            stream.close()


async def test_count_failure_adds_a_subclass_reason_to_stats(pki: PKI, no_fd_leak: None) -> None:
    server = GreetingServer(ssl_options=pki.ssl_options())
    async with serving(server) as port:
        for greeting in (b"hello\n", b"hi\n", b"bye\n"):
            reader, writer = await open_tls(port, pki.client_context())
            writer.write(greeting)
            await reader.read()
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        stats = server.stats
        assert stats.failures == {"bad_greeting": 2}
        assert stats.handshakes == 3


# ------------------------------------------------------- freeing closed ones


class WeaklyRemembering(services_echo.EchoServer):
    """The echo service, keeping only weak references to its streams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_refs: list[weakref.ref[IOStream]] = []

    def handle_stream(self, stream: IOStream, address: Any) -> Any:
        self.stream_refs.append(weakref.ref(stream))
        return super().handle_stream(stream, address)


@pytest.mark.parametrize("client", ["close_notify", "ragged", "reset"])
async def test_a_closed_connection_is_freed_at_once(
    pki: PKI, no_fd_leak: None, client: str
) -> None:
    # Without the cycle collector: a stream in a reference cycle (an error
    # whose traceback holds the stream's frames, say) would keep its OpenSSL
    # connection and buffers until the next collection of its generation,
    # which for a long-lived connection can be a very long time.
    server = WeaklyRemembering(ssl_options=pki.ssl_options())
    context = pki.client_context()
    with without_cycle_collector():
        async with serving(server) as port:
            for _ in range(3):
                if client == "close_notify":
                    assert await echo_once(port, context, b"hello") == b"hello"
                elif client == "ragged":
                    await asyncio.to_thread(ragged_client, port, context)
                else:
                    await asyncio.to_thread(resetting_client, port, context)
            await until(lambda: server.stats.active == 0 and len(server.stream_refs) == 3)
            # (The loop's callbacks for the last close may still hold it for a
            # turn; a stream in a cycle is never freed with the collector off.)
            await until(
                lambda: all(ref() is None for ref in server.stream_refs),
                message="every closed stream freed, none held by a reference cycle",
            )


async def test_a_ragged_end_of_stream_is_answered_with_a_fin(pki: PKI, no_fd_leak: None) -> None:
    # The peer that ends without close_notify may still be reading: the echo
    # of what it sent arrives, and the connection ends with a FIN, not a reset.
    server = EchoServer(ssl_options=pki.ssl_options())
    async with serving(server) as port:
        echoed = await asyncio.to_thread(
            half_close_without_close_notify, port, pki.client_context()
        )
        await until(lambda: server.stats.active == 0)
    assert echoed == b"hello"


# ----------------------------------------------------------- lifecycle


async def test_stop_idempotent_and_from_handle_stream(pki: PKI, no_fd_leak: None) -> None:
    class Server(EchoServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            self.stop()
            self.stop()
            await super().handle_stream(stream, address)

    server = Server(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"first")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
            assert server.sockets == []
            with pytest.raises(ConnectionRefusedError):
                await raw_connect(port)
            # The open connection goes on.
            writer.write(b"second")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"second"
            server.stop()
        finally:
            await close_writer(writer)


async def test_close_lets_handler_finish(pki: PKI, no_fd_leak: None) -> None:
    release = asyncio.Event()
    finished: list[bool] = []

    class Server(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            await stream.read_bytes(5)
            await release.wait()
            await stream.write(b"finished")
            stream.close()
            finished.append(True)

    server = Server(pki.ssl_options())
    server.listen(0, HOST)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await open_tls(port, pki.client_context())
    try:
        writer.write(b"start")
        await until(lambda: server.stats.bytes_received == 5)
        closing = asyncio.ensure_future(server.close(timeout=10))
        await until(lambda: server.sockets == [], message="close() to stop accepting")
        assert not closing.done()
        release.set()
        assert await asyncio.wait_for(reader.read(), 5) == b"finished"
        await asyncio.wait_for(closing, 5)
        assert finished == [True]
    finally:
        await close_writer(writer)


async def test_close_timeout_closes_leftovers(pki: PKI, no_fd_leak: None) -> None:
    outcome: list[str] = []

    class Server(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            try:
                await stream.write(b"hi")
                await stream.read_bytes(1)  # the client never sends
            except StreamClosedError:
                outcome.append("woken")

    server = Server(pki.ssl_options())
    server.listen(0, HOST)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await open_tls(port, pki.client_context())
    silent = await raw_connect(port)  # still in its handshake at close()
    # A first byte: with TCP_DEFER_ACCEPT a silent connection is not even accepted.
    silent.send(b"\x16")
    try:
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        await until(lambda: server.stats.accepted == 2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(server.close(timeout=0.3), 5)
        assert loop.time() - started >= 0.3
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await read_to_eof(silent) == b""
        assert server.stats.active == 0
        assert outcome == ["woken"]
    finally:
        silent.close()
        await close_writer(writer)


async def test_close_cancels_handler_that_ignores_close(pki: PKI, no_fd_leak: None) -> None:
    outcome: list[str] = []
    started = asyncio.Event()

    class Server(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # never looks at its stream
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

    server = Server(pki.ssl_options())
    server.listen(0, HOST)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await open_tls(port, pki.client_context())
    try:
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(server.close(timeout=0.1), 5)
        assert outcome == ["cancelled"]
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        await close_writer(writer)


async def test_max_connections(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options(), max_connections=2)
    async with serving(server) as port:
        first = await open_tls(port, pki.client_context())
        second = await open_tls(port, pki.client_context())
        third_task = asyncio.ensure_future(open_tls(port, pki.client_context()))
        try:
            for reader, writer in (first, second):
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            await until(lambda: server.stats.accepted == 2 and server.stats.active == 2)
            # The third client's TCP connect went into the backlog; a full
            # round trip later the server still has not accepted it.
            first[1].write(b"again")
            assert await asyncio.wait_for(first[0].readexactly(5), 5) == b"again"
            assert server.stats.accepted == 2 and server.stats.active == 2
            assert not third_task.done()
            await close_writer(first[1])
            third = await asyncio.wait_for(third_task, 10)
            try:
                third[1].write(b"third")
                assert await asyncio.wait_for(third[0].readexactly(5), 5) == b"third"
                stats = server.stats
                assert stats.accepted == 3 and stats.handshakes == 3 and stats.active == 2
            finally:
                await close_writer(third[1])
        finally:
            third_task.cancel()
            await close_writer(first[1])
            await close_writer(second[1])


async def test_max_connections_burst(pki: PKI, no_fd_leak: None) -> None:
    """Clients that connect together are not all accepted in one batch."""
    server = EchoServer(pki.ssl_options(), max_connections=2)
    async with serving(server) as port:
        socks = []
        try:
            for _ in range(4):
                sock = socket.socket()
                sock.settimeout(5)
                sock.connect((HOST, port))  # completes in the kernel backlog
                sock.send(b"\x16")  # TCP_DEFER_ACCEPT holds back silent connections
                sock.setblocking(False)
                socks.append(sock)
            # All four wait in the backlog, but one accept batch stops at the limit.
            await until(lambda: server.stats.accepted >= 2)
            assert server.stats.accepted == 2 and server.stats.active == 2
            socks[0].close()  # a slot frees when the server sees this EOF
            await until(lambda: server.stats.accepted >= 3)
            assert server.stats.accepted == 3 and server.stats.active == 2
        finally:
            for sock in socks:
                sock.close()
        await until(lambda: server.stats.active == 0 and server.stats.accepted == 4)
        assert server.stats.failures == {"eof": 4}


async def test_idle_timeout(pki: PKI, no_fd_leak: None) -> None:
    # 1 s: each of the busy client's round trips must beat it, even on a loaded machine.
    server = EchoServer(pki.ssl_options(), idle_timeout=1.0)
    async with serving(server) as port:
        loop = asyncio.get_running_loop()
        start = loop.time()
        idle_reader, idle_writer = await open_tls(port, pki.client_context())
        busy_reader, busy_writer = await open_tls(port, pki.client_context())

        stop = asyncio.Event()

        async def keep_busy() -> None:
            while not stop.is_set():
                busy_writer.write(b"tick")
                assert await asyncio.wait_for(busy_reader.readexactly(4), 5) == b"tick"
                # The client's pace, well within idle_timeout (not a wait for a condition).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

        ticker = asyncio.ensure_future(keep_busy())
        try:
            # The busy connection keeps talking until the idle one is closed.
            idle_closed = asyncio.ensure_future(idle_reader.read())
            await asyncio.wait_for(
                asyncio.wait([idle_closed, ticker], return_when=asyncio.FIRST_COMPLETED), 10
            )
            assert not ticker.done(), ticker
            stop.set()
            await asyncio.wait_for(ticker, 5)
            assert idle_closed.result() == b""
            assert loop.time() - start >= 0.99  # (timers may fire ~1 ms early)
            # The busy one kept working past the idle timeout.
            busy_writer.write(b"alive")
            assert await asyncio.wait_for(busy_reader.readexactly(5), 5) == b"alive"
            assert server.stats.active == 1
            errors = [s.error for s in server.streams if s.closed()]
            assert len(errors) == 1 and isinstance(errors[0], TimeoutError)
        finally:
            ticker.cancel()
            await close_writer(idle_writer)
            await close_writer(busy_writer)


async def test_stats(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        assert server.stats == ServerStats(
            accepted=0,
            active=0,
            handshakes=0,
            rejected=0,
            bytes_received=0,
            bytes_sent=0,
            failures={},
        )
        a = await open_tls(port, pki.client_context())
        b = await open_tls(port, pki.client_context())
        try:
            a[1].write(b"x" * 1000)
            b[1].write(b"y" * 234)
            assert await asyncio.wait_for(a[0].readexactly(1000), 5) == b"x" * 1000
            assert await asyncio.wait_for(b[0].readexactly(234), 5) == b"y" * 234
            await until(lambda: server.stats.handshakes == 2)
            stats = server.stats
            assert (stats.accepted, stats.active, stats.handshakes) == (2, 2, 2)
            assert stats.bytes_received == stats.bytes_sent == 1234
        finally:
            await close_writer(a[1])
        await until(lambda: server.stats.active == 1)
        # Closed connections still count.
        stats = server.stats
        assert stats.bytes_received == stats.bytes_sent == 1234
        try:
            b[1].write(b"z" * 66)
            assert await asyncio.wait_for(b[0].readexactly(66), 5) == b"z" * 66
            stats = server.stats
            assert stats.bytes_received == stats.bytes_sent == 1300
            assert stats.rejected == 0 and stats.failures == {} and stats.handler_errors == 0
        finally:
            await close_writer(b[1])


async def test_listen_twice_and_sockets(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    server.listen(0, HOST)
    server.listen(0, HOST)
    try:
        sockets = server.sockets
        assert len(sockets) == 2
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 2
        for sock in sockets:
            assert sock.type == socket.SOCK_STREAM
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        for port in ports:
            assert await echo_once(port, pki.client_context(), f"{port}".encode()) == (
                f"{port}".encode()
            )
        await until(lambda: server.stats.accepted == 2)
    finally:
        await server.close()
    assert server.sockets == []


async def test_listen_ipv6(pki: PKI, no_fd_leak: None) -> None:
    if not ipv6_available():
        pytest.skip("::1 is not available")
    server = EchoServer(pki.ssl_options())
    async with serving(server, "::1") as port:
        assert server.sockets[0].family == socket.AF_INET6
        reader, writer = await open_tls(port, pki.client_context(), host="::1")
        try:
            writer.write(b"v6")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"v6"
        finally:
            await close_writer(writer)
    assert server.addresses[0][0] == "::1"


async def test_add_sockets_and_serve_forever(pki: PKI, no_fd_leak: None) -> None:
    from securetcp.netutil import bind_sockets

    server = EchoServer(pki.ssl_options())
    server.add_sockets(bind_sockets(0, HOST))
    port = server.sockets[0].getsockname()[1]
    serving_task = asyncio.ensure_future(server.serve_forever())
    try:
        assert await echo_once(port, pki.client_context(), b"forever") == b"forever"
        assert not serving_task.done()
    finally:
        await server.close()
    await asyncio.wait_for(serving_task, 5)


def test_listen_before_loop_then_serve_forever(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    server.listen(0, HOST)
    port = server.sockets[0].getsockname()[1]

    async def main() -> bytes:
        task = asyncio.ensure_future(server.serve_forever())
        try:
            return await echo_once(port, pki.client_context(), b"late loop")
        finally:
            await server.close()
            await asyncio.wait_for(task, 5)

    assert asyncio.run(asyncio.wait_for(main(), 20)) == b"late loop"


def test_constructor_validation(pki: PKI) -> None:
    bad: list[dict[str, Any]] = [
        {"handshake_timeout": 0},
        {"idle_timeout": -1},
        {"max_connections": 0},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            TCPServer(pki.ssl_options(), **kwargs)


# -------------------------------------------------------- classification


def ssl_error(reason: str, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    error = cls(1, f"[SSL: {reason}] something")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeoutError("handshake"), "timeout"),
        (ssl.SSLCertVerificationError(1, "verify failed"), "certificate"),
        (ssl.SSLEOFError(8, "EOF"), "eof"),
        (ssl.SSLZeroReturnError(6, "closed"), "eof"),
        (ConnectionResetError(), "eof"),
        (BrokenPipeError(), "eof"),
        (OSError(9, "bad fd"), "eof"),
        (ssl_error("HTTP_REQUEST"), "plaintext"),
        (ssl_error("HTTPS_PROXY_REQUEST"), "plaintext"),
        (ssl_error("WRONG_VERSION_NUMBER"), "plaintext"),
        (ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "certificate"),
        (ssl_error("CERTIFICATE_VERIFY_FAILED"), "certificate"),
        (ssl_error("UNEXPECTED_EOF_WHILE_READING"), "eof"),
        (ssl_error("TLSV1_UNRECOGNIZED_NAME"), "sni"),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "peer_alert"),
        (ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "peer_alert"),
        (ssl_error("UNSUPPORTED_PROTOCOL"), "protocol"),
        (ssl_error("NO_SHARED_CIPHER"), "protocol"),
        (ssl_error("UNEXPECTED_MESSAGE"), "protocol"),
        (ssl.SSLError(1, "no reason"), "protocol"),
        (ValueError("closed socket"), "protocol"),
    ],
)
def test_classify_handshake_error(error: BaseException, reason: str) -> None:
    assert classify_handshake_error(error) == reason


async def test_classification_of_real_handshake_errors(pki: PKI, no_fd_leak: None) -> None:
    """Real errors from OpenSSL, seen on a bare SSLIOStream, map as the server counts them."""
    from servers import socket_pair

    async def handshake_error(data: bytes) -> BaseException:
        accepted, connecting = await socket_pair()
        stream = SSLIOStream(
            server_context(pki).wrap_socket(
                accepted, server_side=True, do_handshake_on_connect=False
            )
        )
        done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        try:
            stream.start_handshake(lambda _s, e: done.set_result(e), timeout=5)
            await asyncio.get_running_loop().sock_sendall(connecting, data)
            connecting.shutdown(socket.SHUT_WR)
            error = await asyncio.wait_for(done, 5)
            assert error is not None
            return error
        finally:
            stream.close()
            connecting.close()

    assert classify_handshake_error(await handshake_error(b"GET / HTTP/1.0\r\n\r\n")) == (
        "plaintext"
    )
    assert classify_handshake_error(await handshake_error(b"\x16\x03\x01")) == "eof"
    assert classify_handshake_error(await handshake_error(b"")) == "eof"


# ------------------------------------------------------------------ more


async def test_many_concurrent_handshakes(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        payloads = [os.urandom(1000 + i) for i in range(40)]
        results = await asyncio.wait_for(
            asyncio.gather(*(echo_once(port, pki.client_context(), p) for p in payloads)), 25
        )
        assert results == payloads
        await until(lambda: server.stats.active == 0)
        stats = server.stats
        assert stats.accepted == stats.handshakes == 40 and stats.failures == {}
        assert stats.bytes_received == stats.bytes_sent == sum(map(len, payloads))


@pytest.mark.parametrize("family", ["unix", "tcp"])
async def test_writes_of_many_records_arrive_whole(
    pki: PKI, tmp_path: Path, no_fd_leak: None, family: str
) -> None:
    # A write of several TLS records goes out corked on TCP; a Unix socket
    # has no TCP_CORK, and must send them all the same.
    from securetcp.netutil import bind_sockets, bind_unix_socket

    payload = os.urandom(3 * 1024 * 1024 + 7)
    server = EchoServer(pki.ssl_options())
    path = str(tmp_path / "server.sock")
    if family == "unix":
        server.add_socket(bind_unix_socket(path))
        connecting = asyncio.open_unix_connection(
            path, ssl=pki.client_context(), server_hostname="localhost"
        )
    else:
        [sock] = bind_sockets(0, HOST)
        server.add_socket(sock)
        port = sock.getsockname()[1]
        connecting = asyncio.open_connection(
            HOST, port, ssl=pki.client_context(), server_hostname="localhost"
        )
    try:
        reader, writer = await asyncio.wait_for(connecting, 10)
        try:
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        assert server.stats.bytes_sent == len(payload)
    finally:
        await server.close()


async def test_unix_socket(pki: PKI, tmp_path: Path, no_fd_leak: None) -> None:
    from securetcp.netutil import bind_unix_socket

    path = str(tmp_path / "server.sock")
    server = EchoServer(pki.ssl_options())
    server.add_socket(bind_unix_socket(path))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(
                path, ssl=pki.client_context(), server_hostname="localhost"
            ),
            10,
        )
        try:
            writer.write(b"over a unix socket")
            assert await asyncio.wait_for(reader.readexactly(18), 5) == b"over a unix socket"
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        assert server.stats.handshakes == 1
    finally:
        await server.close()


async def test_bind_without_start_then_close(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    server.bind(0, HOST)
    assert len(server.sockets) == 1
    port = server.sockets[0].getsockname()[1]
    await server.close()
    assert server.sockets == []
    with pytest.raises(ConnectionRefusedError):
        sock = await raw_connect(port)
        sock.close()


async def test_bind_then_start_in_loop(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options())
    server.bind(0, HOST)
    port = server.sockets[0].getsockname()[1]
    server.start(1)
    try:
        assert await echo_once(port, pki.client_context(), b"started") == b"started"
    finally:
        await server.close()


async def test_handshake_failure_frees_a_max_connections_slot(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options(), max_connections=1)
    async with serving(server) as port:
        for _ in range(3):
            sock = await raw_connect(port)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, b"not tls at all\r\n")
                assert await read_to_eof(sock) == b""
            finally:
                sock.close()
        assert await echo_once(port, pki.client_context(), b"after") == b"after"
        await until(lambda: server.stats.active == 0)
        assert server.stats.failures == {"plaintext": 3}
        assert server.stats.accepted == 4


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_accepted_sockets_have_nodelay(pki: PKI, tls: bool, no_fd_leak: None) -> None:
    """Nagle is off on every accepted TCP socket (a TLS 1.3 handshake would stall on it)."""
    seen: list[int] = []

    class Server(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            seen.append(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            stream.close()

    server = Server(pki.ssl_options() if tls else None)
    async with serving(server) as port:
        if tls:
            _, writer = await open_tls(port, pki.client_context())
        else:
            _, writer = await asyncio.open_connection(HOST, port)
        try:
            await until(lambda: seen)
        finally:
            await close_writer(writer)
    assert seen == [1]
