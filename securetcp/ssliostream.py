"""`SSLIOStream`: an `IOStream` over TLS, with a deferred, non-blocking handshake.

The stream works over an ``ssl.SSLSocket`` (client side, or a server socket
wrapped by the caller), or over a plain socket and a server context, which
it wraps itself with OpenSSL's connection object, without the
``ssl.SSLSocket`` layer (what `TCPServer` does: less memory and time per
connection). Reads and writes call OpenSSL's connection object directly.

All TLS state lives here, including OpenSSL's read-ahead (`securetcp._openssl`):
one system call pulls in several records, into OpenSSL's default buffer during
the handshake and a 66 KiB one once it is done. Bytes
inside OpenSSL do not make the socket readable, so before waiting for
readiness the stream asks OpenSSL whether it holds any: `_input_buffered`
is the one place that rule lives.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from securetcp._openssl import enlarge_read_buffer, libssl, prepare_connection
from securetcp.certs import PeerIdentity, peer_identity_from_der
from securetcp.iostream import IOStream, StreamClosedError, _detached
from securetcp.tls.sni import (
    REFUSED_ATTRIBUTE,
    SERVER_NAME_ATTRIBUTE,
    is_securetcp_callback,
    recorded_server_name,
)

__all__ = ["SSLIOStream"]

_libssl = libssl()
_has_pending: Callable[[int], int] | None = _libssl.has_pending if _libssl is not None else None

_TLS_RECORD = 16384
#: Largest piece handed to one SSL_write: OpenSSL reports a write only once
#: all of it went out, so pieces of four records keep `bytes_sent` (and write
#: futures, and idle detection) moving during a long transfer at no cost to
#: bulk speed.
_TLS_WRITE_CHUNK = 4 * _TLS_RECORD
_IPPROTO_TCP = socket.IPPROTO_TCP
_TCP_CORK: int = getattr(socket, "TCP_CORK", 0)  # Linux only; 0: none here


#: How long, and how many bytes, a closing connection is drained (see `linger_close`).
LINGER_SECONDS = 0.5
LINGER_BYTES = 64 * 1024


def linger_close(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Close `sock` so that what was just written (a TLS alert) reaches the peer.

    Closing a socket whose receive queue holds unread bytes makes the kernel
    send a reset, which can overtake the alert: a TLS 1.3 client whose
    certificate was refused has usually sent its first request already, and
    would see "connection reset" instead of the reason (and bytes it sends
    after the alert would draw a reset too). So, as nginx's lingering close:
    send FIN, then read and discard until the peer closes, for at most
    `LINGER_SECONDS` and `LINGER_BYTES`, then close. A peer that has closed
    already is closed at once.
    """
    try:
        if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            raise ConnectionResetError  # the peer has closed: nothing more comes
    except BlockingIOError:
        pass  # nothing unread now, but the peer may still be sending
    except OSError:
        sock.close()
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        return
    fd = sock.fileno()
    drained = 0
    lingering = _lingering.setdefault(loop, set())

    def finish() -> None:
        lingering.discard(finish)
        if sock.fileno() != -1:
            loop.remove_reader(fd)
            timer.cancel()
            sock.close()

    def drain() -> None:
        nonlocal drained
        try:
            data = sock.recv(LINGER_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        drained += len(data)
        if not data or drained >= LINGER_BYTES:
            finish()

    timer = loop.call_later(LINGER_SECONDS, finish)
    loop.add_reader(fd, drain)
    lingering.add(finish)


_lingering: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def close_lingering(loop: asyncio.AbstractEventLoop) -> None:
    """Close at once every connection `linger_close` is still draining on `loop`."""
    for finish in list(_lingering.get(loop, ())):
        finish()


def _bare_ssl_object() -> ssl.SSLObject:
    """An ``ssl.SSLObject`` to wrap a connection object made here (its
    constructor refuses direct use; it is a thin layer over ``_sslobj``)."""
    return ssl.SSLObject.__new__(ssl.SSLObject)


class SSLIOStream(IOStream):
    """An `IOStream` whose TLS handshake is driven here, without blocking.

    Either pass an `ssl.SSLSocket` made with ``SSLContext.wrap_socket(...,
    do_handshake_on_connect=False)``, or a connected plain socket and
    `server_context`: the stream then wraps it as the server side itself,
    without the `ssl.SSLSocket` layer (and `socket` is then the plain
    socket). Reads and writes issued before the handshake completes wait
    for it.
    """

    __slots__ = (
        "_cork",
        "_handshake_callback",
        "_handshake_done",
        "_handshake_future",
        "_handshake_timer",
        "_peer_identity",
        "_peer_identity_parsed",
        "_ragged_eof",
        "_ssl_object",
        "_tls",
        "_tls_conn",
        "_tls_ptr",
        "handshake_error",
        REFUSED_ATTRIBUTE,
        SERVER_NAME_ATTRIBUTE,
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        server_context: ssl.SSLContext | None = None,
        max_buffer_size: int | None = None,
        read_chunk_size: int | None = None,
        max_write_buffer_size: int | None = None,
        on_close: Callable[[IOStream], None] | None = None,
        half_close: bool = False,
    ) -> None:
        # TLS first: IOStream.__init__ takes the poller as its last step, so
        # nothing that can fail runs after it (a failed wrap holds nothing).
        self._ssl_object: ssl.SSLObject | None = None
        setattr(self, SERVER_NAME_ATTRIBUTE, None)
        setattr(self, REFUSED_ATTRIBUTE, False)
        if server_context is not None:
            if isinstance(sock, ssl.SSLSocket):
                raise TypeError("server_context needs a plain socket, not an SSLSocket")
            # The SNI callback is shown the connection's owner: securetcp's
            # own callbacks get this stream (to record the name on it); any
            # other gets an ssl.SSLObject, as the stdlib promises ("an
            # SSLContext is used as given"). Without a callback, no owner
            # (its weak reference costs ~80 bytes).
            callback = server_context.sni_callback
            owner: Any = None
            if callback is not None:
                owner = self if is_securetcp_callback(callback) else _bare_ssl_object()
            self._tls_conn: Any = server_context._wrap_socket(  # type: ignore[attr-defined]
                sock, True, None, owner=owner, session=None
            )
            if owner is not None and owner is not self:
                owner._sslobj = self._tls_conn
                self._ssl_object = owner  # the owner is held weakly by OpenSSL's object
        elif isinstance(sock, ssl.SSLSocket):
            # CPython keeps OpenSSL's connection object in _sslobj; another
            # implementation's SSLSocket offers the same calls itself.
            self._tls_conn = getattr(sock, "_sslobj", None) or sock
        else:
            raise TypeError("SSLIOStream needs an ssl.SSLSocket or a server_context")
        # Read-ahead from the start, in OpenSSL's default buffer until the
        # handshake is done (see _openssl.prepare_connection).
        self._tls_ptr = prepare_connection(self._tls_conn)
        super().__init__(
            sock,
            max_buffer_size=max_buffer_size,
            read_chunk_size=read_chunk_size,
            max_write_buffer_size=max_write_buffer_size,
            on_close=on_close,
            half_close=half_close,
        )
        self._write_held = True  # until the handshake completes
        # OpenSSL's connection object once the handshake is done: reads and
        # writes then go to it directly, past ssl.py's wrappers.
        self._tls: Any = None
        self._handshake_done = False
        self._handshake_future: asyncio.Future[None] | None = None
        self._handshake_callback: Callable[[SSLIOStream, BaseException | None], None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._peer_identity: PeerIdentity | None = None
        self._peer_identity_parsed = False
        self._ragged_eof = False  # the peer closed without close_notify
        self._cork = _TCP_CORK != 0  # until the socket refuses it
        #: Why the handshake failed, if it did.
        self.handshake_error: BaseException | None = None

    @property
    def context(self) -> ssl.SSLContext:
        """The SSLContext of the connection (an SNI callback may switch it)."""
        context: ssl.SSLContext = self._tls_conn.context
        return context

    @context.setter
    def context(self, context: ssl.SSLContext) -> None:
        self._tls_conn.context = context

    # -------------------------------------------------------------- handshake

    def start_handshake(
        self,
        callback: Callable[[SSLIOStream, BaseException | None], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Begin the handshake now; `callback(stream, error)` runs when it ends.

        On failure or after `timeout` seconds the stream is closed and
        `error` says why (`TimeoutError` for the deadline). A caller that
        keeps deadlines itself (`TCPServer` sweeps them for all its
        connections) passes no timeout and calls `abort_handshake`.
        """
        if self._handshake_callback is not None or self._handshake_done:
            raise RuntimeError("handshake already started")
        self._handshake_callback = callback
        if timeout is not None:
            self._handshake_timer = self._loop.call_later(timeout, self._on_handshake_timeout)
        self._step_handshake()

    def wait_for_handshake(self) -> asyncio.Future[None]:
        """Future resolving once the handshake has completed (starting it if needed)."""
        if self._handshake_future is None or self._handshake_future.cancelled():
            # (A future cancelled by an earlier waiter's timeout is replaced.)
            self._handshake_future = self._loop.create_future()
            if self._handshake_done:
                self._handshake_future.set_result(None)
            elif self._closed:
                self._handshake_future.set_exception(
                    StreamClosedError(real_error=self.handshake_error or self.error)
                )
            elif self._handshake_callback is None:
                self.start_handshake()
        return self._handshake_future

    def _step_handshake(self) -> None:
        try:
            self._tls_conn.do_handshake()
        except ssl.SSLWantReadError:
            if self._writing:
                self._writing = False
                self._io.remove_writer(self._fd)
            if not self._reading:
                # The reader registered for the handshake stays for the
                # data: _handle_read steps the handshake until it is done.
                self._reading = True
                self._io.add_reader(self._fd, self._handle_read)
            return
        except ssl.SSLWantWriteError:
            if self._reading:
                self._reading = False
                self._io.remove_reader(self._fd)
            if not self._writing:
                self._writing = True
                self._io.add_writer(self._fd, self._step_handshake)
            return
        except (ssl.SSLError, OSError, ValueError) as e:
            # ValueError: the socket was closed under us.
            self._finish_handshake(_detached(e))
            return
        self._finish_handshake(None)

    def abort_handshake(self, error: BaseException) -> None:
        """Fail a handshake still in progress with `error` (closing the stream)."""
        if not self._handshake_done and not self._closed:
            self._finish_handshake(error)

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self._handshake_done and not self._closed:
            self._finish_handshake(TimeoutError("TLS handshake timed out"))

    def _finish_handshake(self, error: BaseException | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        io = self._io
        if self._writing:
            self._writing = False
            io.remove_writer(self._fd)
        if error is None:
            self._handshake_done = True
            self._write_held = False
            self._tls = self._tls_conn  # application data may flow now
            if self._tls_ptr:
                enlarge_read_buffer(self._tls_ptr)
        else:
            self.handshake_error = error
            self.close(error)
        callback = self._handshake_callback
        self._handshake_callback = None
        if callback is not None:
            callback(self, error)
        future = self._handshake_future
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(StreamClosedError(real_error=error))
        if error is None and not self._closed:
            # Resume I/O that was requested while the handshake ran.
            if self._wqueue and not self._writing:
                self._writing = True
                io.add_writer(self._fd, self._on_writable)
            if self._rbuf and self._read_future is not None and self._satisfy_read():
                return
            if self._read_future is not None or self._input_buffered():
                # A client's first bytes often travel with its Finished:
                # reading now saves a trip through the loop (EAGAIN if not).
                self._handle_read()
            if not self._reading and not self._closed:
                if self._read_future is not None:
                    self._add_reader()
                else:
                    self._watch_for_close()

    # While the handshake runs, reads wait for it (writes are held).

    def _add_reader(self) -> None:
        if self._handshake_done:
            super()._add_reader()

    # ------------------------------------------------------------- reading

    def _input_buffered(self) -> bool:
        """Whether OpenSSL holds bytes the socket will not signal again.

        With read-ahead that includes records not decrypted yet, which only
        ``SSL_has_pending`` sees; without it, ``pending()`` (decrypted bytes).
        """
        tls = self._tls
        if tls is None:
            return False
        if self._tls_ptr and _has_pending is not None:
            return bool(_has_pending(self._tls_ptr))
        return bool(tls.pending())

    def _handle_read(self) -> None:
        tls = self._tls
        if tls is None:
            if not self._handshake_done and not self._closed:
                self._step_handshake()
            return
        scratch = self._scratch
        full = len(scratch)
        read_ahead = bool(self._tls_ptr) and _has_pending is not None
        while True:
            try:
                n = tls.read(full, scratch)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                n = 0  # the peer's close_notify: the end of stream, handled below
            except ssl.SSLEOFError:
                # The peer closed without close_notify (a ragged EOF, which
                # most TLS peers do): an end of stream all the same. OpenSSL
                # has answered it with an alert, its connection is over.
                # (Handled below, outside this block: an error raised while
                # passing the end on must not chain to this one.)
                self._ragged_eof = True
                n = 0
            except ssl.SSLWantWriteError:
                # Rare (TLS renegotiation/key update): retry once writable.
                self._want_write_for_read()
                return
            except (ssl.SSLError, OSError) as e:
                self._close_on_error(e)
                return
            if n == 0:
                self._on_eof()
                return
            # Keep reading only where more data is likely: bytes inside
            # OpenSSL, or (without read-ahead) a full record just read.
            # (Asked once, before _take: nothing it does reads from OpenSSL.)
            more = read_ahead and self._input_buffered()
            if not self._take(n, more):
                return
            if read_ahead:
                if not more:
                    return
            elif n < _TLS_RECORD and not tls.pending():
                return

    # ------------------------------------------------------------- writing

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now, in pieces of `_TLS_WRITE_CHUNK`.

        A piece OpenSSL could not finish is retried later with the same bytes
        (the queue keeps them at its head), as SSL_write requires.
        """
        tls = self._tls
        size = len(data)
        if size <= _TLS_RECORD:
            try:
                sent: int = tls.write(data)
            except ssl.SSLWantWriteError:
                return 0
            except ssl.SSLWantReadError:
                self._want_read_for_write()
                return 0
            except (ssl.SSLError, OSError) as e:
                self._close_on_error(e)
                return -1
            self._bytes_sent += sent
            return sent
        # OpenSSL hands each 16 KiB record to the kernel in a write() of its
        # own; corked, the records of one call leave as one TCP push instead
        # of one each (the uncork sends them at once).
        if not (self._cork and self._set_cork(1)):
            return self._send_records(data)
        try:
            return self._send_records(data)
        finally:
            if not self._closed:
                self._set_cork(0)

    def _set_cork(self, on: int) -> bool:
        """Set TCP_CORK; False (and no more corking) where the socket has none."""
        try:
            self._sock.setsockopt(_IPPROTO_TCP, _TCP_CORK, on)
        except OSError:  # not TCP (a Unix socket), or the connection is gone
            self._cork = False
            return False
        return True

    def _send_records(self, data: bytes | bytearray | memoryview) -> int:
        tls = self._tls
        size = len(data)
        view = memoryview(data)
        total = 0
        while total < size:
            try:
                sent = tls.write(view[total : total + _TLS_WRITE_CHUNK])
            except ssl.SSLWantWriteError:
                break
            except ssl.SSLWantReadError:
                self._want_read_for_write()
                break
            except (ssl.SSLError, OSError) as e:
                self._close_on_error(e)
                return -1
            total += sent
            self._bytes_sent += sent
        return total

    def _send_end_of_stream(self) -> None:
        """Send close_notify, once, and keep reading what the peer still sends.

        ``SSLObject.shutdown()`` would wait for the peer's close_notify and
        discard the data before it; OpenSSL's SSL_shutdown called once only
        sends ours. Without that call (no ctypes path) a TCP FIN ends the
        direction instead (a TLS peer may call that a truncation). After a
        ragged EOF OpenSSL has sent its alert: no close_notify follows it.
        """
        lib = _libssl
        if not self._ragged_eof and self._tls_ptr and lib is not None and self._handshake_done:
            if lib.shutdown(self._tls_ptr) >= 0:
                return
            lib.clear_errors()  # leave no stale error for the ssl module
        super()._send_end_of_stream()

    def _want_read_for_write(self) -> None:
        # TLS must read before it can write (a key update); the reader, once
        # registered, reads and the writer's next turn retries.
        if not self._reading:
            super()._add_reader()

    # --------------------------------------------------------------- close

    def _close_socket(self, graceful: bool) -> None:
        if graceful and self._handshake_done and not self._eof and not self._write_shut:
            # Send close_notify so the peer sees a clean end of stream; the
            # peer's reply is not awaited.
            try:
                self._tls_conn.shutdown()
            except (ssl.SSLError, OSError, ValueError):
                pass
        elif (
            not self._handshake_done
            and isinstance(self.handshake_error, ssl.SSLError)
            and not isinstance(self._sock, ssl.SSLSocket)
        ):
            # OpenSSL wrote an alert; closing with the client's bytes unread
            # would turn it into a reset that the client may see first.
            linger_close(self._loop, self._sock)
            return
        self._sock.close()

    def close(self, exc_info: BaseException | None = None) -> None:
        """Close the stream (see `IOStream.close`); a running handshake fails."""
        if self._closed:
            return
        if not self._handshake_done and self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        super().close(exc_info)
        if not self._handshake_done:
            self.handshake_error = self.handshake_error or exc_info or StreamClosedError()
            future = self._handshake_future
            if future is not None and not future.done():
                future.set_exception(StreamClosedError(real_error=self.handshake_error))

    # ------------------------------------------------------------- TLS facts

    @property
    def handshake_done(self) -> bool:
        """Whether the TLS handshake has completed."""
        return self._handshake_done

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate as `SSLSocket.getpeercert()` gives it, or None."""
        try:
            cert = self._tls_conn.getpeercert()
        except (ValueError, OSError):
            return None
        return dict(cert) if cert else None

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """Who the peer is, from its certificate (parsed once), or None without one.

        Raises ValueError if the certificate, though accepted by OpenSSL,
        cannot be parsed (cryptography is stricter); `TCPServer` closes and
        counts such connections before `handle_stream`.
        """
        if not self._peer_identity_parsed:
            try:
                der = self._tls_conn.getpeercert(True)
            except (ValueError, OSError):
                der = None
            if der:
                self._peer_identity = peer_identity_from_der(der)
            self._peer_identity_parsed = True
        return self._peer_identity

    @property
    def server_name(self) -> str | None:
        """The SNI host name the client sent (recorded by securetcp's sni_callback), or None."""
        return recorded_server_name(self) or recorded_server_name(self._sock)

    def selected_alpn_protocol(self) -> str | None:
        """The ALPN protocol agreed with the peer, or None."""
        try:
            protocol: str | None = self._tls_conn.selected_alpn_protocol()
        except (ValueError, OSError):
            return None
        return protocol

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol version, as `SSLSocket.version()`."""
        try:
            version: str | None = self._tls_conn.version()
        except (ValueError, OSError):
            return None
        return version

    @property
    def cipher(self) -> tuple[str, str, int] | None:
        """The negotiated cipher, as `SSLSocket.cipher()`."""
        try:
            cipher: tuple[str, str, int] | None = self._tls_conn.cipher()
        except (ValueError, OSError):
            return None
        return cipher
