"""Fuzz targets: each takes the fuzzer's bytes and fails (raises) on a defect.

- ``handshake``: the bytes (seeded with real clients' ClientHellos, which the
  fuzzer mutates) go to a running securetcp TLS server over TCP, then the
  client half-closes. The server must close the connection within its
  handshake deadline, count it (accepted = handshakes + failures + active)
  and keep running.
- ``after_handshake``: a real TLS handshake, then the bytes raw on the socket
  (broken records, garbage): the server must close, nothing else.
- ``framing``: `IOStream.read_until` / `read_bytes` over a socket pair with a
  tiny read chunk size, against the same split done on the whole buffer.
- ``proxyproto``: `parse_proxy_header` returns None or a header and a length
  within the data, or raises `ProxyProtocolError`, nothing else; a header it
  parsed encodes and parses back to itself.
- ``all``: the first byte picks one of the above (one process for short runs).

In every target, an exception the server could not even report
(`sys.unraisablehook`: a traceback printed for a peer's bytes) is a finding.

The server runs on an event loop in a background thread, started once per
process; each input costs one TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import trustme

from securetcp import TCPServer, TLSConfig
from securetcp.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from securetcp.services.echo import EchoServer

T = TypeVar("T")
HANDSHAKE_TIMEOUT = 2.0
CLOSE_DEADLINE = HANDSHAKE_TIMEOUT + 3.0


class FuzzFinding(AssertionError):
    """A defect: what the fuzzer saves as a crash."""


class _Harness:
    """An event loop thread with a TLS echo server on it, and a client context."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="securetcp-fuzz-")
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        path = Path(self.directory.name)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path / "server.pem"))
        ca.cert_pem.write_to_path(str(path / "ca.pem"))
        self.client_context = ssl.create_default_context(cafile=str(path / "ca.pem"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: TCPServer = self.call(self._start(str(path / "server.pem")))
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _start(self, pem: str) -> TCPServer:
        server = EchoServer(TLSConfig(pem), handshake_timeout=HANDSHAKE_TIMEOUT)
        server.listen(0, "127.0.0.1")
        return server

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coroutine` on the harness loop; its result (or its exception)."""
        if not self.thread.is_alive():
            raise FuzzFinding("the server's event loop thread died")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stats_consistent(self) -> None:
        """Every accepted connection is in handshake (active), or counted once."""

        async def check() -> None:
            stats = self.server.stats
            counted = stats.handshakes + sum(stats.failures.values())
            if not counted <= stats.accepted <= counted + stats.active:
                raise FuzzFinding(f"stats do not add up: {stats}")

        self.call(check())

    def converse(self, data: bytes) -> bytes:
        """Send `data`, half-close, and read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_DEADLINE) as sock:
            with contextlib.suppress(OSError):  # the server may have closed already
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            return _read_to_close(sock)


def _read_to_close(sock: socket.socket) -> bytes:
    received = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(received)
            received += chunk
    except ConnectionError:
        return bytes(received)
    except TimeoutError:
        raise FuzzFinding(f"the server kept the connection open for {CLOSE_DEADLINE} s") from None


_harness: _Harness | None = None
_inputs = 0

# Exceptions nobody could catch (sys.unraisablehook): the server printed a
# traceback for a peer's bytes, a finding.
_unraisable: list[str] = []

# Known, reported defects not to report again while they are open (add an
# entry with its defects.md reference; remove it once the fix lands).
KNOWN_UNRAISABLE: tuple[str, ...] = ()


def _on_unraisable(info: Any) -> None:
    text = f"{info.exc_type.__name__}: {info.exc_value}"
    if not any(text.startswith(known) for known in KNOWN_UNRAISABLE):
        _unraisable.append(f"{text} (in {info.object!r})")


def harness() -> _Harness:
    global _harness
    if _harness is None:
        sys.unraisablehook = _on_unraisable
        _harness = _Harness()
    return _harness


def _count_and_check(h: _Harness) -> None:
    global _inputs
    _inputs += 1
    if _unraisable:
        raise FuzzFinding(f"unraisable exception in the server: {_unraisable[0]}")
    if _inputs % 64 == 0:
        h.stats_consistent()


def fuzz_handshake(data: bytes) -> None:
    h = harness()
    h.converse(data)
    _count_and_check(h)


def fuzz_after_handshake(data: bytes) -> None:
    h = harness()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = h.client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", h.port), timeout=CLOSE_DEADLINE) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                if not chunk:
                    raise FuzzFinding("the server closed a good handshake") from None
                incoming.write(chunk)
        sock.sendall(outgoing.read())
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        _read_to_close(sock)
    _count_and_check(h)


async def _frames(data: bytes, mode: int, arg: bytes, chunk: int) -> list[bytes]:
    """What an IOStream reading `data` with read_chunk_size=`chunk` returns."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    stream = IOStream(a, read_chunk_size=chunk)
    b.setblocking(False)
    frames: list[bytes] = []
    try:
        await loop.sock_sendall(b, data)
        b.shutdown(socket.SHUT_WR)
        while True:
            if mode == 0:
                frames.append(await stream.read_until(arg))
            elif mode == 1:
                frames.append(await stream.read_bytes(len(arg) or 1))
            else:
                frames.append(await stream.read_bytes(len(arg) or 1, partial=True))
    except (StreamClosedError, UnsatisfiableReadError):
        pass
    finally:
        stream.close()
        b.close()
    return frames


def reference_frames(data: bytes, mode: int, arg: bytes) -> list[bytes]:
    """The frames `_frames` must return, computed on the whole buffer."""
    if mode == 0:
        frames = []
        start = 0
        while (end := data.find(arg, start)) != -1:
            frames.append(data[start : end + len(arg)])
            start = end + len(arg)
        return frames
    size = len(arg) or 1
    whole = len(data) - len(data) % size if mode == 1 else len(data)
    return [data[i : min(i + size, whole)] for i in range(0, whole, size)]


def fuzz_framing(data: bytes) -> None:
    if len(data) < 3:
        return
    mode, chunk, arg_length = data[0] % 3, data[1] % 16 + 1, data[2] % 4 + 1
    arg, payload = data[3 : 3 + arg_length], data[3 + arg_length :]
    if not arg:
        return
    got = harness().call(_frames(payload, mode, arg, chunk))
    expected = reference_frames(payload, mode, arg)
    if mode == 2:  # partial reads may split differently: compare the bytes
        if b"".join(got) != payload or any(len(f) > len(arg) for f in got):
            raise FuzzFinding(f"read_bytes(partial) returned {got!r} for {payload!r}")
    elif got != expected:
        raise FuzzFinding(f"mode {mode} arg {arg!r} chunk {chunk}: {got!r} != {expected!r}")


def fuzz_proxyproto(data: bytes) -> None:
    from securetcp.proxyproto import ProxyProtocolError, encode_proxy_header, parse_proxy_header

    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if result is None:
        return
    header, used = result
    if not 0 < used <= len(data):
        raise FuzzFinding(f"header length {used} outside the data ({len(data)} bytes)")
    again = parse_proxy_header(data[:used])
    if again is None or again[0] != header or again[1] != used:
        raise FuzzFinding(f"the header alone parses differently: {again!r} != {result!r}")
    fields = dataclasses.asdict(header) if dataclasses.is_dataclass(header) else {}
    if fields.get("command") == "PROXY" and fields.get("source") is not None:
        encoded = encode_proxy_header(header.source, header.destination, version=header.version)
        reparsed = parse_proxy_header(encoded)
        if reparsed is None or reparsed[0].source != header.source:
            raise FuzzFinding(f"{header!r} does not survive encode/parse: {reparsed!r}")


def fuzz_all(data: bytes) -> None:
    """Every target in one process: the first byte picks it (for short runs)."""
    if data:
        SINGLE[data[0] % len(SINGLE)](data[1:])


SINGLE: list[Callable[[bytes], None]] = [
    fuzz_handshake,
    fuzz_after_handshake,
    fuzz_framing,
    fuzz_proxyproto,
]

TARGETS: dict[str, Callable[[bytes], None]] = {
    "handshake": fuzz_handshake,
    "after_handshake": fuzz_after_handshake,
    "framing": fuzz_framing,
    "proxyproto": fuzz_proxyproto,
    "all": fuzz_all,
}
