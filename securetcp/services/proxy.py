"""A TLS proxy: terminate TLS in front of a plain service, or re-originate it.

`TLSProxy` accepts clients (over TLS, or plain TCP with ``ssl_options=None``)
and pipes their bytes to one upstream: plain TCP (TLS termination), TLS
(re-origination, with certificate verification, SNI and an optional client
certificate for upstream mutual TLS), or a unix socket. Each connection gets
its own upstream connection; nothing is shared between clients.

Both directions are pumped with backpressure: a chunk is read only once the
previous one has been handed to the kernel on the other side, so memory per
connection stays bounded (one chunk in flight plus the reading stream's
high-water mark) whatever the speed of either peer.

End of stream is passed on, one direction at a time: when one peer ends its
side (a TCP FIN, or a TLS close_notify), the proxy delivers everything it
already read from that peer, then ends the same direction towards the other
peer (a FIN, or close_notify for TLS), and goes on carrying the other
direction: a client that half-closes (``shutdown(SHUT_WR)``) and then waits
for the reply gets it. Once both directions have ended, both connections
close. A TLS peer that vanishes without close_notify is read as an end of
stream, like any stream of the engine does.
A connection that breaks with an error (a reset, a TLS error) is aborted on
the other side too and counted. An upstream that refuses, times out or fails
its TLS handshake closes the client at once; it is logged (rate-limited) and
counted in ``stats.failures["upstream"]``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from securetcp._logging import RateLimitedLog, format_address
from securetcp._poller import acquire_poller, release_poller
from securetcp.certs import PeerIdentity
from securetcp.iostream import IOStream, SSLIOStream, StreamClosedError
from securetcp.relay import PeerBrokeError, Relay, abort, broke
from securetcp.tcpserver import TCPServer

__all__ = ["TLSProxy", "UpstreamError", "allow_list", "parse_upstream"]

log = logging.getLogger("securetcp.proxy")

Upstream: TypeAlias = "tuple[str, int] | str"

#: Bytes read per chunk: four full TLS records.
CHUNK_SIZE = 65536

# Reasons counted in `stats.failures` besides the server's own.
UPSTREAM = "upstream"  # could not reach the upstream (refused, timed out, TLS failed)
UPSTREAM_RESET = "upstream_reset"  # the upstream connection broke mid-transfer
CLIENT_RESET = "client_reset"  # the client connection broke mid-transfer


class UpstreamError(ConnectionError):
    """The upstream could not be reached: refused, timed out, or its TLS handshake failed."""


# ----------------------------------------------------------------- options


def parse_upstream(upstream: Upstream) -> tuple[str, int] | str:
    """`upstream` as ``(host, port)`` or a unix socket path; ValueError if malformed.

    Accepts ``(host, port)``, ``"host:port"``, ``"[v6addr]:port"``, and unix
    socket paths (anything with a ``/``, or ``"unix:"`` followed by a path).
    """
    if isinstance(upstream, tuple):
        if len(upstream) != 2:
            raise ValueError(f"upstream: expected (host, port), got {upstream!r}")
        host, port = upstream
        return _checked_address(str(host), port, upstream)
    if not isinstance(upstream, str) or not upstream:
        raise ValueError(f"upstream: expected 'HOST:PORT' or a unix socket path, got {upstream!r}")
    if upstream.startswith("unix:"):
        path = upstream[len("unix:") :]
        if not path:
            raise ValueError("upstream: 'unix:' needs a socket path after it")
        return path
    if "/" in upstream:
        return upstream
    host, sep, port_text = upstream.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(
            f"upstream: expected HOST:PORT (e.g. 127.0.0.1:8080) or a unix socket path "
            f"(e.g. /run/app.sock), got {upstream!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"upstream: write an IPv6 address in brackets, [{host}]:{port_text}")
    return _checked_address(host, int(port_text), upstream)


def _checked_address(host: str, port: object, given: object) -> tuple[str, int]:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"upstream: port must be in 1..65535, got {given!r}")
    if not host:
        raise ValueError(f"upstream: empty host in {given!r}")
    return host, port


def allow_list(
    cns: Iterable[str] = (), uris: Iterable[str] = (), dns: Iterable[str] = ()
) -> Callable[[PeerIdentity], bool]:
    """An ``authorize`` callable for `TLSConfig`: allow peers named in any list.

    A peer is allowed when its certificate's subject common name is one of
    `cns`, or one of its URI subject alternative names (SPIFFE IDs such as
    ``spiffe://example.org/billing``) is one of `uris`, or one of its DNS
    names is one of `dns` (compared case-insensitively). Matches are exact;
    ValueError if all three lists are empty.
    """
    allowed_cns = frozenset(cns)
    allowed_uris = frozenset(uris)
    allowed_dns = frozenset(name.lower().rstrip(".") for name in dns)
    if not (allowed_cns or allowed_uris or allowed_dns):
        raise ValueError("allow_list: give at least one common name, URI or DNS name")

    def authorize(peer: PeerIdentity) -> bool:
        if peer.common_name is not None and peer.common_name in allowed_cns:
            return True
        if not allowed_uris.isdisjoint(peer.uris):
            return True
        return any(name.lower().rstrip(".") in allowed_dns for name in peer.dns_names)

    return authorize


def _reason(error: BaseException) -> str:
    """A short, lower-case reason for a log line."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed: {error.reason or error}"
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.errno:
        # asyncio's messages ("Connect call failed ...") say less than errno.
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


# ------------------------------------------------------------------ proxy


class TLSProxy(TCPServer):
    """Pipe each client connection to `upstream`, with TLS on either side or both.

    `upstream` is ``(host, port)``, ``"host:port"`` or a unix socket path.
    `upstream_ssl` is None (plain TCP to the upstream), True (TLS verified
    against certifi's CAs, `securetcp.client.client_context()`), or an
    `ssl.SSLContext` (your CA, a client certificate for mutual TLS...).
    `upstream_server_hostname` is the name sent as SNI and checked against
    the upstream's certificate (default: the upstream host; required for TLS
    over a unix socket with hostname checking). `connect_timeout` bounds the
    TCP connect and TLS handshake together. `send_proxy` (1 or 2) starts each
    upstream connection with a PROXY protocol header carrying the client's
    address, before any TLS byte. Every other keyword goes to `TCPServer`
    (``ssl_options=None`` accepts plain TCP clients).

    Besides the server's own, ``stats.failures`` counts ``"upstream"`` (the
    upstream refused, timed out or failed its TLS handshake) and
    ``"upstream_reset"`` / ``"client_reset"`` (that side's connection broke
    with an error mid-transfer).
    """

    half_close = True  # one direction may end while the other goes on

    def __init__(
        self,
        upstream: Upstream,
        *,
        upstream_ssl: ssl.SSLContext | bool | None = None,
        upstream_server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        send_proxy: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.upstream = parse_upstream(upstream)
        if upstream_ssl is True:
            from securetcp.client import client_context

            context: ssl.SSLContext | None = client_context()
        elif upstream_ssl is None or upstream_ssl is False:
            context = None
        elif isinstance(upstream_ssl, ssl.SSLContext):
            context = upstream_ssl
        else:
            raise TypeError(
                f"upstream_ssl must be None, True or an ssl.SSLContext, not {upstream_ssl!r}"
            )
        if upstream_server_hostname is not None and context is None:
            raise ValueError("upstream_server_hostname needs upstream_ssl")
        unix = isinstance(self.upstream, str)
        if unix and context is not None and context.check_hostname and not upstream_server_hostname:
            raise ValueError(
                "TLS to a unix socket upstream needs upstream_server_hostname "
                "(the name to check the upstream's certificate against)"
            )
        if send_proxy not in (None, 1, 2):
            raise ValueError(f"send_proxy must be None, 1 or 2, not {send_proxy!r}")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        super().__init__(**kwargs)
        self.upstream_ssl = context
        self.upstream_server_hostname = upstream_server_hostname or (
            None if isinstance(self.upstream, str) else self.upstream[0]
        )
        self.connect_timeout = connect_timeout
        self.send_proxy = send_proxy
        self._encode_proxy_header: Callable[..., bytes] | None = None
        if send_proxy is not None:
            from securetcp.proxyproto import encode_proxy_header

            self._encode_proxy_header = encode_proxy_header
        # An IP literal is connected to directly: no resolver thread per connection.
        self._sockaddr: tuple[socket.AddressFamily, Any] | None = None
        if isinstance(self.upstream, str):
            self._sockaddr = (socket.AF_UNIX, self.upstream)
        else:
            try:
                ip = ipaddress.ip_address(self.upstream[0])
            except ValueError:
                pass
            else:
                family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                self._sockaddr = (family, (str(ip), self.upstream[1]))
        self._log = RateLimitedLog(log)
        self._upstreams: set[IOStream] = set()

    # -------------------------------------------------------------- serve

    def handle_stream(self, stream: IOStream, address: Any) -> asyncio.Future[None]:
        """Connect to the upstream, then pipe bytes both ways until both ends close.

        Runs on the streams' callbacks, without a task (a task only resolves
        an upstream's name or sends a PROXY header); the future resolves
        once both connections are over.
        """
        return _ProxiedConnection(self, stream, address).done

    def _side_closed(
        self, closed: IOStream, other: IOStream, timers: list[asyncio.TimerHandle]
    ) -> None:
        """One side's stream closed; make sure the other cannot outlive it for ever.

        A relay blocked writing to a peer that stopped reading is woken only
        by that peer's stream closing. After an error or a timeout
        (idle_timeout, say) the other side is aborted at once. After a clean
        end, the relay still delivers what it read, but a peer that stopped
        reading gets at most `idle_timeout` for it.
        """
        if other.closed():
            return
        error = closed.error
        if error is not None and not isinstance(error, PeerBrokeError):
            abort(other)
        elif self.idle_timeout is not None:
            timers.append(asyncio.get_running_loop().call_later(self.idle_timeout, abort, other))

    def _upstream_failed(self, address: Any, error: BaseException) -> None:
        self.count_failure(UPSTREAM)
        self._log.log(
            logging.WARNING,
            "upstream %s for client %s: %s",
            format_address(self.upstream),
            format_address(address),
            error,
        )

    def _finish(self, client: IOStream, upstream: IOStream, address: Any) -> None:
        """Close both ends; count a side that broke with an error."""
        self._upstreams.discard(upstream)
        if broke(client.error):
            self.count_failure(CLIENT_RESET)
            self._log.log(
                logging.INFO,
                "client connection broke (%s): %s",
                format_address(address),
                client.error,
            )
        error = upstream.error
        if broke(error):
            if isinstance(error, ssl.SSLError) and upstream.bytes_received == 0:
                # TLS 1.3: an upstream that refuses our client certificate
                # says so after our side of the handshake has completed.
                self._upstream_failed(address, UpstreamError(_reason(error)))
            else:
                self.count_failure(UPSTREAM_RESET)
                self._log.log(
                    logging.INFO,
                    "upstream connection broke (client %s): %s",
                    format_address(address),
                    error,
                )
        client.close()
        upstream.close()

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, let connections finish (up to `timeout` s), close the rest."""
        await super().close(timeout)
        for upstream in list(self._upstreams):
            upstream.close()

    # ----------------------------------------------------------- upstream

    async def _connect_upstream(self, client: IOStream, address: Any) -> IOStream:
        """A connected (and TLS-handshaken) upstream stream, or UpstreamError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        header = self._proxy_header(client, address) if self.send_proxy else None
        sock = await self._connect_socket(loop, self.upstream, deadline)
        try:
            if header:
                # Before any TLS byte: the upstream reads it first. A fresh
                # socket's send buffer takes it at once (else wait for room).
                try:
                    sent = sock.send(header)
                except BlockingIOError:
                    sent = 0
                if sent < len(header):
                    await self._within(loop.sock_sendall(sock, header[sent:]), deadline)
            if self.upstream_ssl is None:
                return IOStream(sock, max_buffer_size=self.max_buffer_size, half_close=True)
            tls_sock = self.upstream_ssl.wrap_socket(
                sock, server_hostname=self.upstream_server_hostname, do_handshake_on_connect=False
            )
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            raise UpstreamError(_reason(e)) from e
        except BaseException:
            sock.close()
            raise
        stream = SSLIOStream(tls_sock, max_buffer_size=self.max_buffer_size, half_close=True)
        try:
            await self._within(stream.wait_for_handshake(), deadline)
        except StreamClosedError as e:
            stream.close()
            error = e.real_error or e
            raise UpstreamError(_reason(error)) from error
        except asyncio.TimeoutError as e:
            stream.close()
            raise UpstreamError(f"TLS handshake timed out after {self.connect_timeout:g} s") from e
        except BaseException:
            stream.close()
            raise
        return stream

    async def _connect_socket(
        self, loop: asyncio.AbstractEventLoop, upstream: tuple[str, int] | str, deadline: float
    ) -> socket.socket:
        if self._sockaddr is not None:
            candidates = [self._sockaddr]
        else:
            assert isinstance(upstream, tuple)
            host, port = upstream
            try:
                infos = await self._within(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), deadline
                )
            except socket.gaierror as e:
                raise UpstreamError(f"cannot resolve {host!r}: {e.strerror}") from e
            except asyncio.TimeoutError as e:
                raise UpstreamError("timed out resolving the upstream's name") from e
            candidates = [(info[0], info[4]) for info in infos]
        error: BaseException | None = None
        for family, sockaddr in candidates:
            try:
                sock = _upstream_socket(family)
            except UpstreamError:
                raise  # no socket to be had: another address would not help
            except OSError as e:
                error = e
                continue
            try:
                if family == socket.AF_UNIX:
                    await self._within(loop.sock_connect(sock, sockaddr), deadline)
                else:
                    await _connect_tcp(loop, sock, sockaddr, deadline)
                return sock
            except asyncio.TimeoutError:
                sock.close()
                raise UpstreamError(f"connect timed out after {self.connect_timeout:g} s") from None
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        assert error is not None
        raise UpstreamError(_reason(error)) from error

    @staticmethod
    async def _within(awaitable: Any, deadline: float) -> Any:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise asyncio.TimeoutError
        return await asyncio.wait_for(awaitable, remaining)

    def _proxy_header(self, client: IOStream, address: Any) -> bytes:
        """The PROXY header naming the client: its address and the one it reached."""
        assert self._encode_proxy_header is not None
        received = getattr(client, "proxy_header", None)
        destination: Any = received.destination if received is not None else None
        source: Any = None
        if isinstance(address, tuple) and len(address) >= 2:
            source = (address[0], address[1])
            if destination is None:
                try:
                    local = client.socket.getsockname()
                except OSError:
                    local = None
                if isinstance(local, tuple):
                    destination = (local[0], local[1])
        if source is None or destination is None:
            source = destination = None  # unix socket clients: LOCAL / UNKNOWN
        try:
            return self._encode_proxy_header(source, destination, version=self.send_proxy)
        except ValueError:
            # Mixed families (an IPv4 client behind an IPv6 listener...): say nothing.
            return self._encode_proxy_header(None, None, version=self.send_proxy)


class _ProxiedConnection:
    """One client and its upstream: connect, relay both ways, finish.

    Driven by callbacks: the upstream socket's writability ends the connect
    (a timer bounds it), then two `Relay`s carry the bytes, and the second
    one to end closes both sides. Upstreams that need a name resolved, a
    PROXY header or a TLS handshake are connected by
    `TLSProxy._connect_upstream` in a task instead.
    """

    __slots__ = (
        "abandon",
        "address",
        "client",
        "done",
        "ended",
        "proxy",
        "sock",
        "task",
        "timers",
        "upstream",
    )

    def __init__(self, proxy: TLSProxy, client: IOStream, address: Any) -> None:
        self.proxy = proxy
        self.client = client
        self.address = address
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.upstream: IOStream | None = None
        self.sock: socket.socket | None = None  # while connecting
        self.abandon: Callable[[], None] | None = None  # ends that connect
        self.timers: list[asyncio.TimerHandle] = []
        self.task: asyncio.Task[IOStream] | None = None  # a connect that needs one
        self.ended = 0
        # A client that leaves (or a server that closes) while the upstream
        # is still connecting ends the connect too.
        client.set_close_callback(self._client_closed)
        sockaddr = proxy._sockaddr
        if (
            sockaddr is not None
            and sockaddr[0] != socket.AF_UNIX
            and proxy.upstream_ssl is None
            and proxy.send_proxy is None
        ):
            self._connect(loop, sockaddr)
        else:
            self.task = loop.create_task(proxy._connect_upstream(client, address))
            self.task.add_done_callback(self._on_connect_task)

    # ----------------------------------------------------------- connect

    def _connect(self, loop: asyncio.AbstractEventLoop, sockaddr: tuple[int, Any]) -> None:
        try:
            sock = _upstream_socket(sockaddr[0])
        except UpstreamError as e:
            self._failed(e)
            return
        except OSError as e:
            self._failed(UpstreamError(_reason(e)))
            return
        self.sock = sock
        try:
            self.abandon = _start_connect(
                loop, sock, sockaddr[1], self.proxy.connect_timeout, self._on_connect_done
            )
        except OSError as e:
            self.sock = None
            sock.close()
            self._failed(UpstreamError(_reason(e)))

    def _on_connect_done(self, error: BaseException | None) -> None:
        sock, self.sock, self.abandon = self.sock, None, None
        assert sock is not None
        if error is None:
            self._relay(IOStream(sock, max_buffer_size=self.proxy.max_buffer_size, half_close=True))
            return
        sock.close()
        if isinstance(error, asyncio.TimeoutError):
            timeout = self.proxy.connect_timeout
            self._failed(UpstreamError(f"connect timed out after {timeout:g} s"))
        else:
            self._failed(UpstreamError(_reason(error)))

    def _on_connect_task(self, task: asyncio.Task[IOStream]) -> None:
        self.task = None
        if task.cancelled():
            self.client.close()
            self._resolve()
            return
        error = task.exception()
        if isinstance(error, UpstreamError):
            self._failed(error)
        elif error is not None:
            self.client.close()
            if not self.done.done():
                self.done.set_exception(error)  # the server logs it as a handler error
        else:
            self._relay(task.result())

    def _failed(self, error: UpstreamError) -> None:
        self.proxy._upstream_failed(self.address, error)
        self.client.close()
        self._resolve()

    # ------------------------------------------------------------ relay

    def _relay(self, upstream: IOStream) -> None:
        proxy, client = self.proxy, self.client
        self.upstream = upstream
        proxy._upstreams.add(upstream)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client %s: connected to upstream %s",
                format_address(self.address),
                format_address(proxy.upstream),
            )
        upstream.set_close_callback(self._upstream_closed)
        Relay(client, upstream, on_ended=self._one_ended)
        Relay(upstream, client, on_ended=self._one_ended)

    def _client_closed(self) -> None:
        if self.upstream is not None:
            self.proxy._side_closed(self.client, self.upstream, self.timers)
        elif self.task is not None:
            self.task.cancel()  # _on_connect_task finishes
        elif self.sock is not None:
            if self.abandon is not None:
                self.abandon()
            self.sock.close()
            self.sock = self.abandon = None
            self._resolve()

    def _upstream_closed(self) -> None:
        if self.upstream is not None:
            self.proxy._side_closed(self.upstream, self.client, self.timers)

    def _one_ended(self) -> None:
        self.ended += 1
        if self.ended == 2:
            for timer in self.timers:
                timer.cancel()
            upstream = self.upstream
            assert upstream is not None
            # _finish closes both sides: their close callbacks would only
            # find the other side closed too (two loop callbacks for nothing).
            self.client.set_close_callback(None)
            upstream.set_close_callback(None)
            self.proxy._finish(self.client, upstream, self.address)
            self._resolve()

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _upstream_socket(family: int) -> socket.socket:
    """A new non-blocking socket for an upstream connection (TCP_NODELAY for TCP).

    Raises UpstreamError if there is none to be had (out of descriptors or
    memory), OSError if setting it up failed (it is then closed).
    """
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UpstreamError(f"cannot create a socket: {_reason(e)}") from e
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _start_connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: Any,
    timeout: float,
    on_done: Callable[[BaseException | None], object],
) -> Callable[[], None] | None:
    """Start connecting the non-blocking TCP socket `sock`, within `timeout` s.

    `on_done(error)` runs once it is over: None when connected, else an
    OSError or asyncio.TimeoutError. One writer registration and one timer,
    no task or future. Returns a function that abandons the connect
    (`on_done` is then not called), or None when it ended at once (`on_done`
    has run). `sock` is never closed here.
    """
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        # To a nearby upstream (loopback, often the LAN) the TCP handshake is
        # over by the time connect() returns; asking again says so (0 or
        # EISCONN, or the refusal) and saves a trip through the loop.
        # EALREADY: still in progress.
        error = sock.connect_ex(address)
    if error in (0, errno.EISCONN):
        on_done(None)
        return None
    if error not in (errno.EALREADY, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
        on_done(OSError(error, os.strerror(error)))
        return None
    fd = sock.fileno()
    io = acquire_poller(loop)  # the streams' epoll set: no loop registration
    watching = True

    def stop_watching() -> None:
        nonlocal watching
        if watching:  # once: a second release would close it under other streams
            watching = False
            io.remove_writer(fd)
            release_poller(io)

    def abandon() -> None:
        stop_watching()
        timer.cancel()

    def writable() -> None:
        abandon()
        try:
            failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            failed = e.errno or errno.EIO
        on_done(OSError(failed, os.strerror(failed)) if failed else None)

    def timed_out() -> None:
        stop_watching()
        on_done(asyncio.TimeoutError())

    try:
        io.add_writer(fd, writable)
    except BaseException:
        release_poller(io)
        raise
    timer = loop.call_later(timeout, timed_out)
    return abandon


async def _connect_tcp(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Any, deadline: float
) -> None:
    """Connect the non-blocking TCP socket `sock` by the loop time `deadline`.

    `_start_connect` awaited: what ``asyncio.wait_for(loop.sock_connect(...))``
    does without its task and wrapper futures. Raises OSError or
    asyncio.TimeoutError.
    """
    over: asyncio.Future[BaseException | None] = loop.create_future()
    abandon = _start_connect(loop, sock, address, deadline - loop.time(), over.set_result)
    try:
        error = await over
    except BaseException:
        if abandon is not None and (over.cancelled() or not over.done()):
            abandon()  # still connecting (a cancel cancels `over` too)
        raise
    if error is not None:
        raise error
