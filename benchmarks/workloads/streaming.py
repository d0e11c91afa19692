"""Workloads 2 and 3: echo traffic over established TLS connections.

One non-blocking, selectors-based client in the harness process (pinned to
the load-generator core) drives every connection. Each connection keeps at
most ``window`` bytes in flight: it writes ``chunk``-sized messages while
under that bound and counts what comes back.

- bulk: a few connections, 64 KiB writes, 256 KiB in flight each;
- small: 64 connections, 100-byte ping-pong (one message in flight each).
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import time
from dataclasses import dataclass

from benchmarks.certs import HOST, SERVER_NAME
from benchmarks.workloads.base import Measurement, Params, Target, Window, Workload

STALL_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024


@dataclass
class _Conn:
    sock: socket.socket  # non-blocking, raw TCP
    tls: ssl.SSLObject  # TLS state over memory BIOs
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    unsent: memoryview | None = None  # ciphertext the socket did not take yet
    in_flight: int = 0  # plaintext bytes sent and not yet echoed back
    want_write: bool = False


def bio_handshake(sock: socket.socket, ctx: ssl.SSLContext) -> _Conn:
    """Complete a client handshake on a blocking socket, TLS over memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("server closed during the handshake") from None
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())
    return _Conn(sock, tls, incoming, outgoing)


class EchoDriver:
    """Drives echo traffic on many non-blocking TLS connections with one selector.

    TLS runs over memory BIOs (as in asyncio and uvloop), so each readiness
    event costs one recv system call and each message one send, rather than
    the two reads per record an SSLSocket does.
    """

    def __init__(self, conns: list[_Conn], chunk: int, window: int) -> None:
        self.message = os.urandom(chunk)
        self.window = window
        self.selector = selectors.DefaultSelector()
        self.conns = conns
        self.received = 0  # plaintext bytes echoed back so far, all connections
        for conn in conns:
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _send(self, conn: _Conn) -> None:
        while True:
            if conn.unsent is None:
                if conn.in_flight + len(self.message) > self.window:
                    break
                conn.tls.write(self.message)
                conn.in_flight += len(self.message)
                conn.unsent = memoryview(conn.outgoing.read())
            try:
                sent = conn.sock.send(conn.unsent)
            except BlockingIOError:
                self._interest(conn, write=True)
                return
            conn.unsent = conn.unsent[sent:] if sent < len(conn.unsent) else None
        self._interest(conn, write=False)

    def _interest(self, conn: _Conn, *, write: bool) -> None:
        if conn.want_write != write:
            conn.want_write = write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
            self.selector.modify(conn.sock, events, conn)

    def _recv(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("server closed an echo connection")
        conn.incoming.write(data)
        tls = conn.tls
        while conn.incoming.pending or tls.pending():
            try:
                plain = tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break  # a partial record, or only a session ticket
            self.received += len(plain)
            conn.in_flight -= len(plain)

    def run_until(self, end: float) -> None:
        """Pump traffic until the monotonic time ``end`` (raises on a stall)."""
        for conn in self.conns:
            self._send(conn)
        last_activity = time.monotonic()
        while (now := time.monotonic()) < end:
            events = self.selector.select(min(0.2, end - now))
            for key, mask in events:
                conn = key.data
                if mask & selectors.EVENT_READ:
                    self._recv(conn)
                self._send(conn)
            if events:
                last_activity = now
            elif now - last_activity > STALL_TIMEOUT:
                raise TimeoutError(f"no echo traffic for {STALL_TIMEOUT:.0f}s")

    def close(self) -> None:
        """Release the selector (the caller owns the sockets)."""
        self.selector.close()


def _run(target: Target, params: Params, connections: int, chunk: int, window: int) -> Measurement:
    socks: list[socket.socket] = []
    try:
        conns = []
        for _ in range(connections):
            sock = socket.create_connection((HOST, target.port), timeout=10.0)
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(bio_handshake(sock, target.ctx))
        driver = EchoDriver(conns, chunk, window)
        try:
            driver.run_until(time.monotonic() + params.warmup)
            measured = Window(target.server)
            before = driver.received
            measured.start()
            driver.run_until(measured.t0 + params.duration)
            received = driver.received - before
            measured.stop()
        finally:
            driver.close()
        target.server.check_alive()
        return measured.measurement(received)
    finally:
        for sock in socks:
            sock.close()


BULK_CHUNK = 64 * 1024
BULK_WINDOW = 4 * BULK_CHUNK
SMALL_SIZE = 100


def run_bulk(target: Target, params: Params) -> Measurement:
    """Measure echoed MB/s (10**6 bytes) over ``params.bulk_connections``."""
    m = _run(target, params, params.bulk_connections, BULK_CHUNK, BULK_WINDOW)
    return _scaled(m, 1e6)


def run_small(target: Target, params: Params) -> Measurement:
    """Measure 100-byte round trips/s over ``params.small_connections``."""
    m = _run(target, params, params.small_connections, SMALL_SIZE, SMALL_SIZE)
    return _scaled(m, SMALL_SIZE)


def _scaled(m: Measurement, bytes_per_unit: float) -> Measurement:
    m.value /= bytes_per_unit
    if m.per_cpu is not None:
        m.per_cpu /= bytes_per_unit
    return m


BULK = Workload("bulk", "MB/s", "MB/CPU-s", run_bulk)
SMALL = Workload("small", "msg/s", "msg/CPU-s", run_small)
