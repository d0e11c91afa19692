"""TCPServer: accept connections, complete TLS handshakes, hand streams to you.

Subclass `TCPServer` and override `handle_stream(stream, address)`. Three ways
to start it, as in tornado::

    server = EchoServer(ssl_options=...)       # 1. one process
    server.listen(8443)
    server.run()

    server.bind(8443)                          # 2. pre-forked, via start()
    server.start(0)                            #    (forks one child per CPU)
    server.run()

    sockets = bind_sockets(8443)               # 3. pre-forked, by hand
    fork_processes(0)
    server.add_sockets(sockets)
    server.run()

With TLS, each accepted socket is wrapped with a deferred handshake that the
event loop drives under `handshake_timeout`; `handle_stream` only ever sees
connections whose handshake completed. Failures are closed quietly, logged
(rate-limited) and counted in `stats.failures` by reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import signal
import socket
import ssl
import sys
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from securetcp._logging import RateLimitedLog, format_address
from securetcp._poller import Poller, acquire_poller, release_poller
from securetcp._proxy_accept import ProxyHeaderReader, TrustedProxies
from securetcp.iostream import IOStream, StreamBufferFullError, _detached
from securetcp.netutil import add_accept_handler, bind_sockets
from securetcp.process import fork_processes
from securetcp.relay import Relay
from securetcp.ssliostream import SSLIOStream, close_lingering
from securetcp.tls import ServerTLS, classify_handshake_error, make_server_tls
from securetcp.tls.sni import (
    is_securetcp_callback,
    refused_by_strict_sni,
    silence_sni_decode_errors,
)

__all__ = ["ServerStats", "TCPServer", "classify_handshake_error"]

log = logging.getLogger("securetcp.tcpserver")

SSLOptions = Any  # None | dict[str, Any] | ssl.SSLContext | TLSConfig


@dataclasses.dataclass(frozen=True)
class ServerStats:
    """A snapshot of a server's counters."""

    accepted: int
    """Connections accepted from the listening sockets."""
    active: int
    """Connections open now (in handshake or being served)."""
    handshakes: int
    """TLS handshakes completed."""
    rejected: int
    """Connections refused or dropped for a rule or a limit: not authorized, an
    untrusted PROXY protocol source, a read or write buffer limit, idle_timeout."""
    bytes_received: int
    """Application bytes read from clients (after decryption)."""
    bytes_sent: int
    """Application bytes written to clients (before encryption)."""
    failures: dict[str, int]
    """Connections that never reached `handle_stream`, by reason: "timeout",
    "eof", "plaintext", "protocol", "certificate", "peer_alert", "sni",
    "unauthorized", "untrusted_proxy", "proxy_protocol" (and "upstream" for
    `TLSProxy`)."""
    handler_errors: int = 0
    """Exceptions raised by `handle_stream`."""


# Linux copies TCP_NODELAY from a listening socket to the sockets it accepts;
# elsewhere it is set on each accepted socket.
_NODELAY_INHERITED = sys.platform.startswith("linux")
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Linux: hand over a connection only once its first bytes arrived (the
# client speaks first in TLS and PROXY protocol), so silent connections
# never cost a descriptor or a handshake slot.
_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", None)

#: Default cap on TLS handshakes (and PROXY headers) in progress at once.
DEFAULT_MAX_CONCURRENT_HANDSHAKES = 1024
# Handshake deadlines are swept by one timer per server, not a timer per
# connection; a handshake may outlive its deadline by up to this much.
_SWEEP_SLACK = 0.05
# Python 3.12+: a handler's first step runs at once, in the callback that
# completed the handshake, instead of one loop iteration later.
_EAGER_TASKS = sys.version_info >= (3, 12)


class TCPServer:
    """A non-blocking TCP server, TLS-first. Override `handle_stream`.

    `ssl_options` may be None (plain TCP), a dict with tornado's keys, an
    `ssl.SSLContext` (used as given) or a `TLSConfig`; it is validated here,
    at construction, and raises `SSLOptionsError` if anything is wrong.

    Limits, all safe for a public server by default: `max_buffer_size` (what
    one read may gather, 4 MiB) and `max_write_buffer_size` (bytes queued
    behind a slow reader before `write()` raises, 4 MiB) per stream;
    `max_connections` (beyond it new clients wait in the kernel's backlog);
    `max_concurrent_handshakes` (1024: beyond it accepting pauses, so a flood
    of ClientHellos cannot use unbounded memory); `handshake_timeout`;
    `idle_timeout`. With `proxy_protocol`, every connection must start with
    a PROXY protocol v1 or v2 header from one of `trusted_proxies` (networks;
    None means loopback only).
    """

    #: Streams keep writing after the peer's end of stream (see `IOStream`'s
    #: `half_close`): for servers that answer, or relay, after the client
    #: half-closed. The handler must then close its stream.
    half_close: bool = False

    def __init__(
        self,
        ssl_options: SSLOptions = None,
        *,
        max_buffer_size: int | None = None,
        read_chunk_size: int | None = None,
        handshake_timeout: float | None = 10.0,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
        proxy_protocol: bool = False,
        trusted_proxies: Iterable[Any] | None = None,
        max_write_buffer_size: int | None = None,
        max_concurrent_handshakes: int | None = DEFAULT_MAX_CONCURRENT_HANDSHAKES,
    ) -> None:
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive or None")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1 or None")
        if max_concurrent_handshakes is not None and max_concurrent_handshakes < 1:
            raise ValueError("max_concurrent_handshakes must be at least 1 or None")
        self.ssl_options = ssl_options
        self._tls: ServerTLS | None = make_server_tls(ssl_options)
        if self._tls is not None:
            silence_sni_decode_errors()
        self.max_buffer_size = max_buffer_size
        self.read_chunk_size = read_chunk_size
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_write_buffer_size = max_write_buffer_size
        self.max_concurrent_handshakes = max_concurrent_handshakes
        self.proxy_protocol = bool(proxy_protocol)
        self.trusted_proxies = TrustedProxies(trusted_proxies)

        self._sockets: dict[int, socket.socket] = {}  # fd -> listening socket
        self._accept_removers: dict[int, Callable[[], None]] = {}
        self._pending_sockets: list[socket.socket] = []  # from bind(), for start()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Held while serving, so that the streams' poller outlives each one.
        self._poller: Poller | None = None
        self._accepting = False  # handlers installed (not paused, not stopped)
        self._stopped = False
        # Open streams, each with the relay serving it when handle_stream returned one.
        self._streams: dict[IOStream, Relay | None] = {}
        # One bound method for all the streams (each would hold its own).
        self._stream_closed = self._on_stream_closed
        self._tasks: set[asyncio.Task[Any]] = set()  # the server's own (signal handling)
        # Running handle_stream coroutines, with the stream and address they serve.
        self._handlers: dict[asyncio.Task[Any], tuple[IOStream, Any]] = {}
        self._closed_event: asyncio.Event | None = None
        self._closing = False
        self._idle_timers: dict[IOStream, asyncio.TimerHandle] = {}
        self._header_readers: set[ProxyHeaderReader] = set()
        # Handshakes in progress and their deadlines, oldest first.
        self._deadlines: OrderedDict[SSLIOStream, float] = OrderedDict()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._handshaking = 0  # TLS handshakes and PROXY headers in progress
        self._fail_log = RateLimitedLog(log)

        self._accepted = 0
        self._handshakes = 0
        self._rejected = 0
        self._handler_errors = 0
        self._bytes_received_closed = 0
        self._bytes_sent_closed = 0
        self._failures: dict[str, int] = {}

    # ------------------------------------------------------------ sockets

    def listen(
        self,
        port: int,
        address: str | None = None,
        *,
        family: socket.AddressFamily = socket.AF_UNSPEC,
        backlog: int = 128,
        flags: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        """Bind to `port` on `address` and start accepting (once a loop runs).

        May be called several times to listen on several ports or addresses.
        """
        sockets = bind_sockets(
            port, address, family=family, backlog=backlog, flags=flags, reuse_port=reuse_port
        )
        self.add_sockets(sockets)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Accept connections on these listening sockets (from `bind_sockets`)."""
        for sock in sockets:
            if _NODELAY_INHERITED and sock.family in _TCP_FAMILIES:
                # Accepted sockets inherit it: no system call per connection.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if (
                _DEFER_ACCEPT is not None
                and sock.family in _TCP_FAMILIES
                and (self._tls is not None or self.proxy_protocol)
            ):
                # After this many seconds of silence the kernel hands the
                # connection over anyway, and the handshake deadline applies.
                seconds = max(1, round(self.handshake_timeout or 10))
                sock.setsockopt(socket.IPPROTO_TCP, _DEFER_ACCEPT, seconds)
            self._sockets[sock.fileno()] = sock
        self._stopped = False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: serve_forever() or run() starts accepting
        self._attach_loop()

    def add_socket(self, sock: socket.socket) -> None:
        """Accept connections on one listening socket."""
        self.add_sockets([sock])

    def bind(
        self,
        port: int,
        address: str | None = None,
        *,
        family: socket.AddressFamily = socket.AF_UNSPEC,
        backlog: int = 128,
        flags: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        """Bind sockets now; `start()` begins accepting on them (maybe after forking)."""
        self._pending_sockets.extend(
            bind_sockets(
                port, address, family=family, backlog=backlog, flags=flags, reuse_port=reuse_port
            )
        )

    def start(self, num_processes: int | None = 1, max_restarts: int | None = None) -> None:
        """Start serving the sockets from `bind()`, forking first if `num_processes != 1`.

        `num_processes` None or <= 0 forks one process per CPU. Call it before
        any event loop runs; then `run()` in every process.
        """
        if num_processes != 1:
            fork_processes(num_processes, 100 if max_restarts is None else max_restarts)
        sockets, self._pending_sockets = self._pending_sockets, []
        self.add_sockets(sockets)

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (including those from `bind()` not yet started)."""
        return list(self._sockets.values()) + self._pending_sockets

    def stop(self) -> None:
        """Stop accepting and close the listening sockets; open connections go on.

        Idempotent, and safe to call from `handle_stream`.
        """
        self._stopped = True
        self._pause_accepting()
        for sock in [*self._sockets.values(), *self._pending_sockets]:
            sock.close()
        self._sockets.clear()
        self._pending_sockets.clear()
        if self._poller is not None:
            release_poller(self._poller)
            self._poller = None

    # --------------------------------------------------------------- loop

    def _attach_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("this TCPServer already runs on another event loop")
        if self._loop is None:
            self._loop = loop
            self._closed_event = asyncio.Event()
            if self._tls is not None:
                self._tls.start_reloading()
        if not self._stopped:
            if self._poller is None:
                self._poller = acquire_poller(loop)
            self._resume_accepting()

    async def serve_forever(self) -> None:
        """Accept and serve connections until `close()` completes."""
        self._attach_loop()
        assert self._closed_event is not None
        await self._closed_event.wait()

    def run(self, loop: str = "asyncio") -> None:
        """Serve until SIGINT or SIGTERM, then close gracefully (SIGHUP reloads certificates).

        `loop` chooses the event loop: ``"asyncio"`` (the default loop, as
        `asyncio.run` makes it) or ``"uvloop"`` (the ``securetcp[uvloop]``
        extra). Either way a fresh loop runs `serve_forever` and is closed when
        it returns; signal handling is the same on both.

        Raises ValueError for any other `loop`, and RuntimeError when
        ``"uvloop"`` is asked for but cannot be imported, before any loop starts.
        """
        factory = _loop_factory(loop)

        async def main() -> None:
            self._attach_loop()
            loop = asyncio.get_running_loop()
            installed: list[int] = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_stop_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread, or no signals here
            if self._tls is not None and hasattr(signal, "SIGHUP"):
                try:
                    loop.add_signal_handler(signal.SIGHUP, self._tls.reload)
                    installed.append(signal.SIGHUP)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            try:
                await self.serve_forever()
            finally:
                for signum in installed:
                    loop.remove_signal_handler(signum)

        if factory is None:
            asyncio.run(main())
        elif sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(main())
        else:
            _run_in_new_loop(factory, main())

    def _on_stop_signal(self, sig: int) -> None:
        log.info("received %s, closing", signal.Signals(sig).name)
        if not self._closing:
            task = asyncio.ensure_future(self.close(timeout=30.0))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, let handlers finish (up to `timeout` s), then close the rest."""
        self.stop()
        self._closing = True
        # Connections still in their handshake never reached a handler.
        for reader in list(self._header_readers):
            self._drop_header_reader(reader)
        for stream in list(self._streams):
            if isinstance(stream, SSLIOStream) and not stream.handshake_done:
                stream.close()
        tasks = [t for t in self._handlers if t is not asyncio.current_task()]
        tasks += [
            asyncio.ensure_future(relay)
            for relay in self._streams.values()
            if relay is not None and not relay.done()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for stream in list(self._streams):
            stream.close()
        # Handlers woken by the closes get a moment to unwind, then are cancelled.
        tasks = [t for t in self._handlers if not t.done() and t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._loop is not None:
            close_lingering(self._loop)
        if self._tls is not None:
            self._tls.stop_reloading()
        if self._closed_event is not None:
            self._closed_event.set()

    # ------------------------------------------------------------- accept

    def _at_limit(self) -> bool:
        """Whether a limit says: accept no more for now."""
        if self.max_connections is not None and self._open_count() >= self.max_connections:
            return True
        limit = self.max_concurrent_handshakes
        return limit is not None and self._handshaking >= limit

    def _open_count(self) -> int:
        return len(self._streams) + len(self._header_readers)

    def _maybe_resume(self) -> None:
        if not self._accepting and not self._stopped and not self._at_limit():
            self._resume_accepting()

    def _resume_accepting(self) -> None:
        # Not skipped when already accepting: sockets added since need handlers.
        if self._stopped or self._at_limit():
            return
        self._accepting = True
        for fd, sock in self._sockets.items():
            if fd not in self._accept_removers:
                self._accept_removers[fd] = add_accept_handler(sock, self._on_accept)

    def _pause_accepting(self) -> None:
        self._accepting = False
        removers = list(self._accept_removers.values())
        self._accept_removers.clear()
        for remove in removers:
            remove()

    def _on_accept(self, conn: socket.socket, address: Any) -> None:
        self._accepted += 1
        if not _NODELAY_INHERITED and conn.family in _TCP_FAMILIES:
            # Nagle would stall each TLS 1.3 handshake ~40 ms on the session
            # tickets, and small replies in general.
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.proxy_protocol:
            self._read_proxy_header(conn, address)
        else:
            self._open_stream(conn, address, None)
        if self._accepting and self._at_limit():
            # Further clients wait in the kernel's backlog until a slot frees.
            self._pause_accepting()

    def _read_proxy_header(self, conn: socket.socket, address: Any) -> None:
        if address not in self.trusted_proxies:
            conn.close()
            self._rejected += 1
            self._count_failure("untrusted_proxy", address, None, "not in trusted_proxies")
            return
        assert self._loop is not None
        self._handshaking += 1
        try:
            reader = ProxyHeaderReader(
                self._loop, conn, address, self.handshake_timeout, self._on_proxy_header
            )
        except OSError as e:  # the socket died at once
            self._handshaking -= 1
            conn.close()
            self._count_failure("eof", address, e)
            return
        if not reader.finished:  # (with TCP_DEFER_ACCEPT it often finished at once)
            self._header_readers.add(reader)

    def _drop_header_reader(self, reader: ProxyHeaderReader) -> None:
        reader.cancel()
        reader.sock.close()
        if reader in self._header_readers:
            self._header_readers.discard(reader)
            self._handshaking -= 1

    def _on_proxy_header(
        self, reader: ProxyHeaderReader, header: Any, error: BaseException | None
    ) -> None:
        self._header_readers.discard(reader)
        self._handshaking -= 1
        address = reader.address
        if error is not None or header is None:
            reader.sock.close()
            if isinstance(error, TimeoutError):
                reason = "timeout"
            elif isinstance(error, ConnectionError):
                reason = "eof"
            else:
                reason = "proxy_protocol"
            self._count_failure(reason, address, error)
        else:
            source = header.source if header.source is not None else address
            self._open_stream(reader.sock, source, header)
        self._maybe_resume()

    def _open_stream(self, conn: socket.socket, address: Any, header: Any) -> None:
        tls = self._tls
        stream: IOStream
        try:
            if tls is None:
                stream = IOStream(
                    conn,
                    max_buffer_size=self.max_buffer_size,
                    read_chunk_size=self.read_chunk_size,
                    max_write_buffer_size=self.max_write_buffer_size,
                    on_close=self._stream_closed,
                    half_close=self.half_close,
                )
            else:
                # Wrapped by the stream itself: no ssl.SSLSocket layer.
                stream = SSLIOStream(
                    conn,
                    server_context=tls.context,
                    max_buffer_size=self.max_buffer_size,
                    read_chunk_size=self.read_chunk_size,
                    max_write_buffer_size=self.max_write_buffer_size,
                    on_close=self._stream_closed,
                    half_close=self.half_close,
                )
        except (OSError, ValueError, ssl.SSLError) as e:
            # Reset before we could wrap it: count it like a handshake EOF.
            conn.close()
            self._count_failure("eof", address, e)
            return
        stream.proxy_header = header
        self._streams[stream] = None
        if isinstance(stream, SSLIOStream):
            self._handshaking += 1
            if self.handshake_timeout is not None:
                self._watch_deadline(stream, self.handshake_timeout)
            stream.start_handshake(lambda s, error: self._on_handshake(s, address, error))
        else:
            self._start_handler(stream, address)

    def _watch_deadline(self, stream: SSLIOStream, timeout: float) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        self._deadlines[stream] = deadline
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_at(deadline, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        """Fail the handshakes whose deadline passed; wait for the next one."""
        assert self._loop is not None
        self._sweep_handle = None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines:
            stream, deadline = next(iter(deadlines.items()))
            if deadline > now:
                self._sweep_handle = self._loop.call_at(
                    max(deadline, now + _SWEEP_SLACK), self._sweep_deadlines
                )
                return
            del deadlines[stream]
            stream.abort_handshake(TimeoutError("TLS handshake timed out"))

    def _on_handshake(self, stream: SSLIOStream, address: Any, error: BaseException | None) -> None:
        self._handshaking -= 1
        self._deadlines.pop(stream, None)
        if error is not None:
            reason = classify_handshake_error(error)
            if reason == "sni" and self._sni_failed_before_callback(stream):
                reason = "protocol"  # a malformed name, not an SNI rule
            self._count_failure(reason, address, error)
            self._maybe_resume()
            return
        self._handshakes += 1
        try:
            allowed = self._authorized(stream, address)
        except ValueError as e:
            # A certificate OpenSSL accepted but cryptography cannot parse
            # (it is stricter, and gets stricter each release).
            self._count_failure("certificate", address, e, f"unparseable peer certificate: {e}")
            stream.close(_detached(e))  # its frames would hold the stream in a cycle
            return
        except Exception as e:
            log.exception("unexpected error after the TLS handshake with %s", address)
            self._count_failure("internal_error", address, e)
            stream.close(_detached(e))  # logged above, traceback and all
            return
        if not allowed:
            self._rejected += 1
            self._count_failure("unauthorized", address, None, stream.peer_identity)
            stream.close()
            return
        self._maybe_resume()
        self._start_handler(stream, address)

    @staticmethod
    def _sni_failed_before_callback(stream: SSLIOStream) -> bool:
        """Whether an SNI failure came from CPython decoding the name before
        securetcp's callback ran (a user's own callback's refusals stay "sni")."""
        try:
            callback = stream.context.sni_callback
        except (ValueError, AttributeError):
            return False
        return is_securetcp_callback(callback) and not refused_by_strict_sni(stream)

    def _authorized(self, stream: SSLIOStream, address: Any) -> bool:
        """What `authorize` says of the peer (True without it); ValueError if
        the peer's certificate cannot be parsed."""
        tls = self._tls
        if tls is None or tls.authorize is None:
            return True
        identity = stream.peer_identity  # ValueError: unparseable
        try:
            return identity is not None and bool(tls.authorize(identity))
        except Exception:
            log.exception("authorize() raised for %s; refusing the peer", address)
            return False

    def count_failure(self, reason: str) -> None:
        """Count one failed connection under `reason` in ``stats.failures``.

        For subclasses that fail connections for reasons of their own (a
        proxy's unreachable upstream, an application's protocol error): they
        show in `stats` and the metrics next to the server's own reasons.
        """
        self._failures[reason] = self._failures.get(reason, 0) + 1

    def _count_failure(
        self, reason: str, address: Any, error: BaseException | None, detail: object = None
    ) -> None:
        self.count_failure(reason)
        self._fail_log.info(
            "TLS handshake with %s failed (%s): %s",
            format_address(address),
            reason,
            detail if error is None else error,
        )

    def _start_handler(self, stream: IOStream, address: Any) -> None:
        if self.idle_timeout is not None:
            self._arm_idle_timer(stream)
        try:
            result = self.handle_stream(stream, address)
        except Exception:
            self._handler_failed(stream, address)
            return
        if isinstance(result, Relay):
            # It runs on the stream's callbacks: no task to keep, only the relay.
            if stream in self._streams:
                self._streams[stream] = result
        elif inspect.isawaitable(result):
            if _EAGER_TASKS and asyncio.iscoroutine(result):
                task = asyncio.Task(result, loop=self._loop, eager_start=True)  # type: ignore[call-arg]
            else:
                task = asyncio.ensure_future(result)
            # A dict entry and a bound method: lighter per connection than a closure.
            self._handlers[task] = (stream, address)
            task.add_done_callback(self._on_handler_done)

    def _on_handler_done(self, task: asyncio.Task[Any]) -> None:
        stream, address = self._handlers.pop(task)
        if task.cancelled():
            stream.close()
            return
        error = task.exception()
        if error is not None:
            self._handler_failed(stream, address, error)

    def _handler_failed(
        self, stream: IOStream, address: Any, error: BaseException | None = None
    ) -> None:
        self._handler_errors += 1
        if error is None:
            log.exception("Error in handle_stream for %s", format_address(address))
        else:
            log.error(
                "Error in handle_stream for %s",
                format_address(address),
                exc_info=(type(error), error, error.__traceback__),
            )
        stream.close()

    def _on_stream_closed(self, stream: IOStream) -> None:
        self._streams.pop(stream, None)
        self._bytes_received_closed += stream.bytes_received
        self._bytes_sent_closed += stream.bytes_sent
        if isinstance(stream.error, StreamBufferFullError):
            self._rejected += 1
        timer = self._idle_timers.pop(stream, None)
        if timer is not None:
            timer.cancel()
        self._maybe_resume()

    # ---------------------------------------------------------- idle timer

    # Idle connections are found by sampling their byte counters a few times
    # per idle_timeout, so the read and write paths pay nothing for it. A
    # connection is closed between 1 and 1.25 idle_timeouts after its last I/O.
    _IDLE_CHECKS = 4

    def _arm_idle_timer(self, stream: IOStream, seen: int = -1, quiet_checks: int = 0) -> None:
        assert self._loop is not None and self.idle_timeout is not None
        self._idle_timers[stream] = self._loop.call_later(
            self.idle_timeout / self._IDLE_CHECKS, self._check_idle, stream, seen, quiet_checks
        )

    def _check_idle(self, stream: IOStream, seen: int, quiet_checks: int) -> None:
        if stream.closed():
            self._idle_timers.pop(stream, None)
            return
        activity = stream.bytes_received + stream.bytes_sent
        quiet_checks = quiet_checks + 1 if activity == seen else 0
        if quiet_checks >= self._IDLE_CHECKS:
            self._idle_timers.pop(stream, None)
            self._rejected += 1
            stream.close(TimeoutError(f"idle for {self.idle_timeout} s"))
        else:
            self._arm_idle_timer(stream, activity, quiet_checks)

    # --------------------------------------------------------------- stats

    @property
    def stats(self) -> ServerStats:
        """A snapshot of this server's counters."""
        received = self._bytes_received_closed
        sent = self._bytes_sent_closed
        # A copy (atomic under the GIL): a metrics thread may take this snapshot.
        for stream in list(self._streams):
            received += stream.bytes_received
            sent += stream.bytes_sent
        return ServerStats(
            accepted=self._accepted,
            active=self._open_count(),
            handshakes=self._handshakes,
            rejected=self._rejected,
            bytes_received=received,
            bytes_sent=sent,
            failures=dict(self._failures),
            handler_errors=self._handler_errors,
        )

    def certificate_not_after(self) -> dict[str, float]:
        """Each certificate file this server serves and when it expires (Unix
        time), as loaded now (it changes after a reload). Empty without TLS or
        for an ``ssl.SSLContext`` given as is."""
        return {} if self._tls is None else self._tls.certificate_not_after()

    # ------------------------------------------------------------ override

    def handle_stream(self, stream: IOStream, address: Any) -> Any:
        """Serve one connection; override this. May be a coroutine function,
        or return a `Relay` (served on the stream's callbacks, without a task).

        With TLS, `stream` is an `SSLIOStream` whose handshake has completed.
        The stream is yours: close it when done (the server closes it if this
        raises, and at `close()`).
        """
        raise NotImplementedError


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for `TCPServer.run`'s `loop` (None: asyncio's default)."""
    if loop == "asyncio":
        return None
    if loop != "uvloop":
        raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {loop!r}")
    try:
        import uvloop
    except ImportError as e:
        raise RuntimeError(
            "loop='uvloop' needs uvloop, which is not installed: pip install 'securetcp[uvloop]'"
        ) from e
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_in_new_loop(
    factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, None]
) -> None:
    """Run `main` in a new loop from `factory`, as `asyncio.run` does (Python 3.10).

    Python 3.10 has no `asyncio.Runner`; this is its shutdown sequence: cancel
    the tasks left over, finish async generators and the default executor,
    then close the loop.
    """
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_remaining_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the loop's unfinished tasks, wait for them, report their errors."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during TCPServer.run() shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
