"""TCPServer on uvloop: real TLS through `loop.add_reader`/`add_writer` on uvloop.

The in-process tests drive a fresh ``uvloop.new_event_loop()`` from a plain
(sync) test, bounded by ``asyncio.wait_for``; the end-to-end tests start
``run(loop="uvloop")`` in a subprocess and stop it with a signal. Everything
is skipped when uvloop is not installed (the ``securetcp[uvloop]`` extra).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from servers import (
    HOST,
    EchoServer,
    MemoryTLSClient,
    close_writer,
    open_tls,
    raw_connect,
    read_to_eof,
    server_process,
    serving,
    until,
    wait_for_text,
)

from securetcp import _openssl, ssliostream
from securetcp.iostream import IOStream
from securetcp.tcpserver import TCPServer, _run_in_new_loop

uvloop = pytest.importorskip("uvloop")

TEST_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def libuv_global_state() -> None:
    """Create libuv's process-wide state before any test counts descriptors.

    The first uvloop loop in a process makes libuv open a pipe it keeps for
    the life of the process (a lock for its signal handling); later loops
    reuse it. Opening it here keeps `no_fd_leak` to what the tests leak.
    """
    uvloop.new_event_loop().close()


def run_on_uvloop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `test()` to completion on a fresh uvloop loop, bounded in time."""

    async def bounded() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await asyncio.wait_for(test(), TEST_TIMEOUT)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(bounded())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# ------------------------------------------------------------ in process


@pytest.mark.parametrize("size", [4 * 1024 * 1024])
def test_tls_echo_of_megabytes_both_ways(pki: Any, size: int, no_fd_leak: None) -> None:
    payload = os.urandom(size)

    async def test() -> None:
        server = EchoServer(ssl_options=pki.ssl_options())
        async with serving(server) as port:
            reader, writer = await open_tls(port, pki.client_context())
            try:

                async def send() -> None:
                    for i in range(0, size, 256 * 1024):  # upload while the echo flows back
                        writer.write(payload[i : i + 256 * 1024])
                        await writer.drain()

                sending = asyncio.ensure_future(send())
                echoed = await reader.readexactly(size)
                await sending
            finally:
                await close_writer(writer)
            assert echoed == payload
            await until(lambda: server.stats.active == 0, message="connection closed")
            stats = server.stats
            assert (stats.handshakes, stats.bytes_received, stats.bytes_sent) == (1, size, size)
            assert stats.failures == {}
            assert all(isinstance(loop, uvloop.Loop) for loop in server.loops)

    run_on_uvloop(test)


def test_plaintext_handshake_failure_is_counted(pki: Any, no_fd_leak: None) -> None:
    async def test() -> None:
        server = EchoServer(ssl_options=pki.ssl_options())
        async with serving(server) as port:
            sock = await raw_connect(port)
            try:
                await asyncio.get_running_loop().sock_sendall(
                    sock, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
                )
                await read_to_eof(sock)  # the server drops it
            finally:
                sock.close()
            await until(lambda: server.stats.failures.get("plaintext") == 1, message="counted")
            assert server.stats.handshakes == 0
            assert server.streams == []
            await until(lambda: server.stats.active == 0, message="connection closed")

    run_on_uvloop(test)


class ChunkServer(TCPServer):
    """Reads `count` chunks of exactly `size` bytes, then answers b"done"."""

    def __init__(self, count: int, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = count
        self.size = size
        self.chunks: list[bytes] = []

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            for _ in range(self.count):
                self.chunks.append(await stream.read_bytes(self.size))
            await stream.write(b"done")
        finally:
            stream.close()


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "fallback"])
def test_burst_of_records_in_one_segment(
    pki: Any, read_ahead: bool, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """Many small TLS records arrive at once, then the peer goes quiet."""
    if read_ahead and _openssl.libssl() is None:
        pytest.skip("libssl not reachable through ctypes")
    if not read_ahead:
        # The stream's own fallback seam (no public switch turns read-ahead off).
        monkeypatch.setattr(ssliostream, "prepare_connection", lambda tls: 0)
    chunks = [bytes([97 + i % 26]) * 50 for i in range(300)]

    async def test() -> None:
        server = ChunkServer(len(chunks), 50, ssl_options=pki.ssl_options())
        async with serving(server) as port:
            sock = await raw_connect(port)
            try:
                peer = await MemoryTLSClient.connect(sock, pki.client_context())
                # One sendall of ~300 records: most of them reach the server in
                # one read, much of it undecrypted inside OpenSSL.
                await asyncio.get_running_loop().sock_sendall(sock, peer.records(chunks))
                assert await peer.recv_exactly(4) == b"done"
            finally:
                sock.close()
            assert server.chunks == chunks
            await until(lambda: server.stats.active == 0, message="connection closed")

    run_on_uvloop(test)


def test_idle_timeout_closes_quiet_connections(pki: Any, no_fd_leak: None) -> None:
    async def test() -> None:
        # 1 s: the ping right after the handshake must beat it, even on a loaded machine.
        server = EchoServer(ssl_options=pki.ssl_options(), idle_timeout=1.0)
        async with serving(server) as port:
            reader, writer = await open_tls(port, pki.client_context())
            try:
                # Before the ping: the server's last I/O (its echo) comes after this.
                started = time.monotonic()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                # Quiet from here on: the server closes the connection.
                assert await asyncio.wait_for(reader.read(), 5) == b""
                assert time.monotonic() - started >= 0.99  # (timers may fire ~1 ms early)
            finally:
                await close_writer(writer)
            await until(lambda: server.stats.active == 0, message="connection closed")
            assert server.stats.handshakes == 1

    run_on_uvloop(test)


def test_run_in_new_loop_shuts_down_like_asyncio_run(no_fd_leak: None) -> None:
    """The Python 3.10 path of run(): leftovers cancelled, generators finalised, loop closed.

    `_run_in_new_loop` is private, but run() takes it only on Python 3.10
    (3.11+ has asyncio.Runner): called directly, the path is tested everywhere.
    """
    seen: dict[str, Any] = {}

    async def agen() -> Any:
        try:
            yield 1
            yield 2
        finally:
            seen["agen_closed"] = True

    async def leftover() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen["loop"] = loop
        assert isinstance(loop, uvloop.Loop)
        assert asyncio.get_event_loop() is loop
        seen["task"] = asyncio.ensure_future(leftover())
        gen = agen()
        seen["gen"] = gen  # left suspended: shutdown_asyncgens must close it
        assert await gen.__anext__() == 1

    _run_in_new_loop(uvloop.new_event_loop, main())
    assert seen["cancelled"] and seen["agen_closed"]
    assert seen["task"].cancelled()
    assert seen["loop"].is_closed()


# --------------------------------------------------------------- run()


def test_run_refuses_an_unknown_loop(pki: Any) -> None:
    server = EchoServer(ssl_options=pki.ssl_options())
    with pytest.raises(ValueError, match=r"'asyncio' or 'uvloop'.*'bogus'"):
        server.run(loop="bogus")


def test_run_names_the_extra_when_uvloop_is_missing(
    pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    server = EchoServer(ssl_options=pki.ssl_options())
    with pytest.raises(RuntimeError, match=re.escape("pip install 'securetcp[uvloop]'")):
        server.run(loop="uvloop")


SERVER_SCRIPT = """\
import asyncio, logging, sys
from securetcp.services.echo import EchoServer
from securetcp.tls import TLSConfig

logging.basicConfig(level=logging.INFO)
loops = set()

class Echo(EchoServer):
    async def handle_stream(self, stream, address):
        loops.add(type(asyncio.get_running_loop()).__module__.split(".")[0])
        await super().handle_stream(stream, address)

server = Echo(ssl_options=TLSConfig(sys.argv[1], sys.argv[2]))
server.listen(0, "127.0.0.1")
print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
server.run(loop=sys.argv[3])
print(f"stopped; loops: {sorted(loops)}", flush=True)
"""


def tls_echo(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    """A blocking TLS client: connect, send `payload`, read as much back."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        data = bytearray()
        while len(data) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return bytes(data)


@pytest.mark.parametrize(
    ("how", "loop", "stop"),
    [
        ("script", "uvloop", signal.SIGTERM),
        ("script", "uvloop", signal.SIGINT),
        ("cli", "uvloop", signal.SIGTERM),
        ("script", "asyncio", signal.SIGTERM),  # the control
    ],
    ids=["script-uvloop-SIGTERM", "script-uvloop-SIGINT", "cli-uvloop-SIGTERM", "asyncio"],
)
def test_run_end_to_end(
    pki: Any, tmp_path: Path, how: str, loop: str, stop: signal.Signals
) -> None:
    """Serve TLS echo, reload on SIGHUP, and exit 0 after a graceful close."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "server.pem", "server.key"):
        (certs / name).write_bytes((pki.ca_file.parent / name).read_bytes())
    if how == "script":
        script = tmp_path / "serve.py"
        script.write_text(SERVER_SCRIPT)
        args = [str(script), str(certs / "server.pem"), str(certs / "server.key"), loop]
    else:
        args = ["-m", "securetcp.cli", "echo", "--port", "0", "--certs", str(certs)]
        args += ["--loop", loop]
    with server_process([sys.executable, *args], tmp_path) as (proc, out, err):
        port = int(wait_for_text(out, r"127\.0\.0\.1:(\d+)", proc).group(1))
        payload = os.urandom(1024 * 1024)
        assert tls_echo(port, pki.client_context(), payload) == payload

        # SIGHUP re-reads changed certificate files (the default action would kill it).
        stat = (certs / "server.pem").stat()
        os.utime(certs / "server.pem", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        proc.send_signal(signal.SIGHUP)
        wait_for_text(err, r"certificates reloaded", proc)
        assert tls_echo(port, pki.client_context(), b"after reload") == b"after reload"

        proc.send_signal(stop)
        assert proc.wait(15) == 0, err.read_text()
    log = err.read_text()
    assert f"received {stop.name}, closing" in log
    assert "Traceback" not in log
    if how == "script":
        assert f"loops: [{loop!r}]" in out.read_text()
