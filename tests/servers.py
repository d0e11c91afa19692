"""Helpers for the iostream and tcpserver tests: polling, socket pairs, TLS peers.

Everything here uses real sockets on loopback and real TLS (the trustme PKI
from conftest). Nothing sleeps to wait for a condition: `until` polls with a
deadline and fails when it passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import queue
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from securetcp.certs import PeerIdentity
from securetcp.iostream import IOStream, SSLIOStream
from securetcp.services import echo as services_echo
from securetcp.tcpserver import ServerStats, TCPServer

HOST = "127.0.0.1"


async def until(
    predicate: Callable[[], object], timeout: float = 5.0, message: str = "condition"
) -> None:
    """Poll `predicate` every few ms; fail once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(0.005)


def whole_lines(text: str) -> str:
    """`text` up to its last newline: what a process writing it has finished.

    A reader polling a file that a server writes to may catch a line half
    written (a port cut short, JSON cut mid-string); it is read whole next time.
    """
    return text[: text.rfind("\n") + 1]


def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, message: str = "condition"
) -> None:
    """`until` for plain (blocking) tests: poll `predicate`, fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.005)  # polling interval, not a wait for the condition


def server_context(pki: Any) -> ssl.SSLContext:
    """A server-side context with the PKI's server certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.cert_file), str(pki.key_file))
    return context


async def socket_pair(host: str = HOST) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: (accepted side, connecting side)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        listener.setblocking(False)
        client = socket.socket(family, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, listener.getsockname()[:2])
            accepted, _ = await loop.sock_accept(listener)
        except BaseException:
            client.close()
            raise
    return accepted, client


@contextlib.asynccontextmanager
async def stream_pair(
    kind: str, pki: Any, **server_kwargs: Any
) -> AsyncIterator[tuple[IOStream, IOStream]]:
    """(server stream, client stream), plain TCP or TLS with the handshake done."""
    accepted, connecting = await socket_pair()
    server: IOStream
    client: IOStream
    if kind == "plain":
        server = IOStream(accepted, **server_kwargs)
        client = IOStream(connecting)
    else:
        server_sock = server_context(pki).wrap_socket(
            accepted, server_side=True, do_handshake_on_connect=False
        )
        client_sock = pki.client_context().wrap_socket(
            connecting, server_hostname="localhost", do_handshake_on_connect=False
        )
        server = SSLIOStream(server_sock, **server_kwargs)
        client = SSLIOStream(client_sock)
        assert isinstance(server, SSLIOStream) and isinstance(client, SSLIOStream)
        await asyncio.gather(server.wait_for_handshake(), client.wait_for_handshake())
    try:
        yield server, client
    finally:
        server.close()
        client.close()


async def unstarted_tls_pair(pki: Any) -> tuple[SSLIOStream, SSLIOStream]:
    """(server, client) TLS streams over SSLSockets whose handshake has not started."""
    accepted, connecting = await socket_pair()
    server = SSLIOStream(
        server_context(pki).wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    )
    client = SSLIOStream(
        pki.client_context().wrap_socket(
            connecting, server_hostname="localhost", do_handshake_on_connect=False
        )
    )
    return server, client


class MemoryTLSClient:
    """A TLS client on `ssl.SSLObject` over a plain socket: full control of the bytes.

    It can send a burst of many TLS records at once, stop after part of a
    ClientHello, or drop the TCP connection without a close_notify.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        #: Raw (encrypted) bytes read from the socket so far.
        self.wire_received = 0

    @classmethod
    async def connect(cls, sock: socket.socket, context: ssl.SSLContext) -> MemoryTLSClient:
        """Wrap an already connected socket and complete the handshake."""
        client = cls(sock, context)
        await client.handshake()
        return client

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def fill(self) -> None:
        """Read once from the socket into OpenSSL (end of stream if the peer closed)."""
        data = await self.loop.sock_recv(self.sock, 65536)
        self.wire_received += len(data)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self, *, flush: bool = True) -> None:
        """Complete the handshake; with ``flush=False`` the client's last flight
        stays in `outgoing`, so a caller can send it together with data."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self.fill()
        if flush:
            await self.flush()

    def client_hello(self) -> bytes:
        """The bytes of the ClientHello (before any handshake step was taken)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def records(self, chunks: list[bytes]) -> bytes:
        """Encrypt each chunk as its own TLS record; return the wire bytes."""
        for chunk in chunks:
            self.tls.write(chunk)
        return self.outgoing.read()

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self.flush()

    async def recv(self, size: int = 65536) -> bytes:
        """Decrypted bytes (b"" at the end of the stream)."""
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                await self.flush()
                await self.fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await self.recv(size - len(data))
            if not chunk:
                raise EOFError(f"got {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        """Drop the TCP connection without a TLS close_notify."""
        self.sock.close()


# ----------------------------------------------------------------- servers


@dataclass(frozen=True)
class Handled:
    """The TLS facts of one connection, as `handle_stream` saw them."""

    identity: PeerIdentity | None
    peer_certificate: dict[str, Any] | None
    server_name: str | None
    alpn: str | None
    version: str | None
    cipher: tuple[str, str, int] | None
    #: Why `identity` is None for a certificate cryptography cannot parse.
    identity_error: str | None = None

    @classmethod
    def of(cls, stream: SSLIOStream) -> Handled:
        identity, error = None, None
        try:
            identity = stream.peer_identity
        except ValueError as e:  # without `authorize`, TCPServer does not parse it first
            error = str(e)
        return cls(
            identity=identity,
            peer_certificate=stream.peer_certificate,
            server_name=stream.server_name,
            alpn=stream.selected_alpn_protocol(),
            version=stream.tls_version,
            cipher=stream.cipher,
            identity_error=error,
        )


class EchoServer(services_echo.EchoServer):
    """securetcp's echo service, remembering what it was handed.

    `streams`, `addresses` and `loops` (the loop that ran each handler) grow
    as connections reach `handle_stream`; `handled` receives the TLS facts of
    each TLS one. It is a thread-safe queue: read it with `next_handled` from
    the server's loop, or with ``handled.get(timeout=...)`` from another
    thread (`ServerThread`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[IOStream] = []
        self.addresses: list[Any] = []
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.handled: queue.Queue[Handled] = queue.Queue()

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.streams.append(stream)
        self.addresses.append(address)
        self.loops.append(asyncio.get_running_loop())
        if isinstance(stream, SSLIOStream):
            assert stream.handshake_done
            self.handled.put(Handled.of(stream))
        await super().handle_stream(stream, address)

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        port: int = self.sockets[0].getsockname()[1]
        return port

    async def next_handled(self, timeout: float = 5.0) -> Handled:
        """The next connection's TLS facts, once one reached `handle_stream`."""
        await until(lambda: not self.handled.empty(), timeout, "a connection to be handled")
        return self.handled.get_nowait()


class ServerThread:
    """Runs `server` on its own event loop in a thread, listening on 127.0.0.1.

    For blocking clients (stdlib ``ssl`` sockets, sslyze, ``openssl
    s_client``) in a plain test: ``with ServerThread(EchoServer(...)) as t:``
    then connect to ``t.port``. The server is closed on exit.
    """

    def __init__(self, server: TCPServer, start_timeout: float = 10.0) -> None:
        self.server = server
        self._timeout = start_timeout
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _run(self) -> None:
        async def main() -> None:
            self.server.listen(0, HOST)
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self.server.serve_forever()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by __enter__/__exit__
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(self._timeout), "server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.close(timeout=5.0), loop)
            future.result(self._timeout)
        self._thread.join(self._timeout)
        assert not self._thread.is_alive(), "server thread did not stop"
        assert self._error is None, self._error

    @property
    def stats(self) -> ServerStats:
        """The server's stats, read on its own loop."""
        assert self._loop is not None
        done: concurrent.futures.Future[ServerStats] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(lambda: done.set_result(self.server.stats))
        return done.result(self._timeout)

    def handled(self, timeout: float = 5.0) -> Handled:
        """The next connection that reached an `EchoServer`'s `handle_stream`."""
        assert isinstance(self.server, EchoServer)
        return self.server.handled.get(timeout=timeout)

    def wait_for_failures(self, expected: dict[str, int], timeout: float = 5.0) -> None:
        """Wait until ``stats.failures`` (failed handshakes by kind) is `expected`."""
        wait_until(
            lambda: self.stats.failures == expected,
            timeout,
            f"failures == {expected} (now {self.stats.failures})",
        )


# ------------------------------------------------------- blocking clients

#: Bound on each blocking client's socket operations and subprocesses.
TIMEOUT = 5.0
OPENSSL = "/usr/bin/openssl"


@dataclass
class ClientResult:
    """What a blocking client saw of one TLS conversation with an echo server."""

    version: str | None
    cipher: tuple[str, str, int] | None
    alpn: str | None
    peer_der: bytes | None
    data: bytes
    session: ssl.SSLSession | None


def tls_connect(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    payload: bytes = b"hello",
) -> ClientResult:
    """Handshake with an echo server, send `payload`, read it back (`data`).

    Raises `ssl.SSLError` (or an `OSError`) when the server refuses: with
    TLS 1.3 a refused client certificate shows only when reading.
    """
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(payload)
        data = bytearray()
        while len(data) < len(payload):
            chunk = tls.recv(len(payload) - len(data))
            if not chunk:
                break
            data += chunk
        return ClientResult(
            version=tls.version(),
            cipher=tls.cipher(),
            alpn=tls.selected_alpn_protocol(),
            peer_der=tls.getpeercert(binary_form=True),
            data=bytes(data),
            session=tls.session,
        )


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``openssl s_client`` against the server (no verification)."""
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{HOST}:{port}", "-brief", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )


@contextlib.asynccontextmanager
async def serving(
    server: TCPServer, address: str = HOST, close_timeout: float = 5.0
) -> AsyncIterator[int]:
    """Listen on an ephemeral port of `address`; close the server afterwards."""
    server.listen(0, address)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        await server.close(timeout=close_timeout)


async def open_tls(
    port: int, context: ssl.SSLContext, host: str = HOST
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio TLS client connection (an implementation independent of ours)."""
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname="localhost"), 10
    )


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


@contextlib.asynccontextmanager
async def echoed_clients(
    port: int, context: ssl.SSLContext, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`count` open TLS clients, each of which has had one echo back; closed on exit."""
    clients = [await open_tls(port, context) for _ in range(count)]
    try:
        for reader, writer in clients:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        yield clients
    finally:
        for _, writer in clients:
            await close_writer(writer)


async def echo_once(port: int, context: ssl.SSLContext | None, payload: bytes) -> bytes:
    """Connect, send `payload`, read as many bytes back, disconnect."""
    if context is None:
        reader, writer = await asyncio.open_connection(HOST, port)
    else:
        reader, writer = await open_tls(port, context)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        await close_writer(writer)


async def raw_connect(port: int, host: str = HOST) -> socket.socket:
    """A plain, non-blocking TCP connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    loop = asyncio.get_running_loop()
    data = bytearray()

    async def read() -> None:
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                return
            if not chunk:
                return
            data.extend(chunk)

    await asyncio.wait_for(read(), timeout)
    return bytes(data)


async def tls_attempt(
    port: int, context: ssl.SSLContext, payload: bytes = b"ping"
) -> BaseException | None:
    """Try a TLS conversation; return the error it ended with (None if it echoed)."""
    try:
        got = await echo_once(port, context, payload)
    except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError) as e:
        return e
    assert got == payload
    return None


# ------------------------------------------------------------ subprocesses

ROOT = Path(__file__).resolve().parent.parent


def wait_for_text(path: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """Poll `path` until `pattern` appears in its complete lines; fail on a deadline
    or an early exit.

    The process writes while we read: a line still being written (say a port
    with digits to come) is matched only once it is whole.
    """
    deadline = time.monotonic() + 15.0
    while True:
        text = path.read_text(errors="replace")
        match = re.search(pattern, whole_lines(text))
        if match:
            return match
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} (exit {proc.returncode}); output:\n{text}")
        time.sleep(0.01)


@contextlib.contextmanager
def server_process(command: list[str], tmp_path: Path) -> Iterator[tuple[Any, Path, Path]]:
    """Start `command`; yield (process, stdout file, stderr file); kill it if still alive."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=tmp_path)
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def ragged_client(port: int, context: ssl.SSLContext) -> None:
    """Echo once, then close the socket without close_notify (most clients do)."""
    assert tls_connect(port, context).data == b"hello"


def half_close_without_close_notify(port: int, context: ssl.SSLContext) -> bytes:
    """Echo once, end the sending side with a bare TCP FIN, read to the end.

    Returns the echo; raises if the server's end is a reset instead of a FIN.
    """
    with socket.create_connection((HOST, port), timeout=10) as raw:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"hello")
        echoed = b""
        while len(echoed) < 5:
            echoed += tls.recv(5 - len(echoed))
        # socket.socket's own methods: the TCP stream under TLS, no close_notify.
        socket.socket.shutdown(tls, socket.SHUT_WR)
        while socket.socket.recv(tls, 4096):  # OpenSSL's alert, then the FIN
            pass
        return echoed


def resetting_client(port: int, context: ssl.SSLContext) -> None:
    """Echo once, then reset the connection."""
    with socket.create_connection((HOST, port), timeout=10) as raw:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()


@contextlib.contextmanager
def without_cycle_collector() -> Iterator[None]:
    """Turn the cycle collector off: objects left are then those in reference cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
