"""Non-blocking byte streams over sockets, driven by the running asyncio loop.

`IOStream` wraps a connected socket. `SSLIOStream` adds TLS: it drives a
deferred handshake by readiness events, never blocking the loop, over either
an `ssl.SSLSocket` or (what `TCPServer` uses) a plain socket that it wraps
itself with OpenSSL's connection object, without the `ssl.SSLSocket` layer.

Design notes (these are the hot paths of every server):

* Readiness comes from ``loop.add_reader``/``loop.add_writer`` on the file
  descriptor, which works on the default selector loop and under uvloop. The
  reader stays registered for the life of the connection (one registration,
  not one per read, kept across the end of the handshake); it is only
  dropped to apply backpressure.
* Every read lands in one scratch buffer shared by all the streams of a
  thread, so an idle connection holds no receive buffer of its own. Data is
  copied out once: straight into the returned ``bytes`` when a read can be
  satisfied at once, otherwise into the stream's own ``bytearray``.
* ``write()`` tries to send at once; only what the kernel does not take is
  queued, and the returned future resolves once the data is handed to it (a
  shared, already-done future when the kernel took everything).
* TLS reads and writes call OpenSSL's connection object directly. Server
  connections read ahead (`securetcp._openssl.tune_connection`): one system
  call pulls in several records. Bytes inside OpenSSL do not make the socket
  readable, so before waiting for readiness a stream asks OpenSSL whether it
  holds any (``SSL_has_pending``, or ``pending()`` without read-ahead).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from securetcp._openssl import libssl, tune_connection
from securetcp.certs import PeerIdentity, peer_identity_from_der
from securetcp.tls import SERVER_NAME_ATTRIBUTE

__all__ = [
    "IOStream",
    "SSLIOStream",
    "StreamBufferFullError",
    "StreamClosedError",
    "UnsatisfiableReadError",
]

DEFAULT_MAX_BUFFER_SIZE = 100 * 1024 * 1024
DEFAULT_READ_CHUNK_SIZE = 64 * 1024
# Unconsumed data a stream buffers before it stops reading from the socket
# (the kernel's receive window then pushes back on the peer).
_HIGH_WATER = 256 * 1024
# Small writes queued behind a blocked one are merged up to this size, so a
# burst of tiny messages becomes one send (and one TLS record), not many.
_COALESCE_LIMIT = 64 * 1024
_TLS_RECORD = 16384


class StreamClosedError(IOError):
    """The stream was closed; `real_error` holds the cause, if there was one."""

    def __init__(self, real_error: BaseException | None = None) -> None:
        message = "Stream is closed"
        if real_error is not None:
            message = f"{message}: {real_error!r}"
        super().__init__(message)
        self.real_error = real_error


class UnsatisfiableReadError(Exception):
    """A read cannot be satisfied (e.g. ``read_until`` past ``max_bytes``)."""


class StreamBufferFullError(Exception):
    """More data was buffered for a pending read than ``max_buffer_size`` allows."""


_scratch = threading.local()

_libssl = libssl()
_has_pending: Callable[[int], int] | None = _libssl.has_pending if _libssl is not None else None


def _completed_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future of `loop` that is already done: what a write that the kernel
    took at once returns, so the common case allocates nothing."""
    if getattr(_scratch, "loop", None) is not loop:
        future = loop.create_future()
        future.set_result(None)
        _scratch.loop = loop
        _scratch.done = future
    done: asyncio.Future[None] = _scratch.done
    return done


def _scratch_buffer(size: int) -> memoryview:
    """Return this thread's shared receive buffer of at least `size` bytes.

    Streams of one thread run on one event loop, one callback at a time, and
    copy data out before returning, so they can share a single buffer.
    """
    buffer: memoryview | None = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = memoryview(bytearray(size))
        _scratch.buffer = buffer
    return buffer


def _silence(future: asyncio.Future[Any]) -> None:
    # Write futures are often not awaited (fire-and-forget writes, as in
    # tornado); retrieving the exception keeps asyncio from logging it.
    if not future.cancelled():
        future.exception()


# Kinds of pending read.
_READ_BYTES = 1
_READ_UNTIL = 2
_READ_CLOSE = 3
_READ_INTO = 4


class IOStream:
    """A non-blocking, buffered byte stream over a connected socket.

    Reads return futures; only one read may be pending at a time. Writes
    return futures that resolve once the data has been handed to the kernel;
    they may be awaited or not (a later write is queued behind them).
    """

    __slots__ = (
        "__weakref__",
        "_bytes_received",
        "_bytes_sent",
        "_close_callback",
        "_close_hook",
        "_closed",
        "_done",
        "_eof",
        "_fd",
        "_loop",
        "_max_buffer_size",
        "_rbuf",
        "_read_arg",
        "_read_future",
        "_read_kind",
        "_read_limit",
        "_read_partial",
        "_read_scanned",
        "_reading",
        "_scratch",
        "_sock",
        "_tls",
        "_tls_ptr",
        "_wfutures",
        "_wqueue",
        "_write_held",
        "_writing",
        "_wsize",
        "error",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_buffer_size: int | None = None,
        read_chunk_size: int | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._max_buffer_size = max_buffer_size or DEFAULT_MAX_BUFFER_SIZE
        self._scratch = _scratch_buffer(read_chunk_size or DEFAULT_READ_CHUNK_SIZE)
        if read_chunk_size:
            self._scratch = self._scratch[:read_chunk_size]
        self._rbuf = bytearray()
        self._read_future: asyncio.Future[Any] | None = None
        self._read_kind = 0
        self._read_arg: Any = None
        self._read_limit: int | None = None
        self._read_partial = False
        self._read_scanned = 0  # read_until: where the delimiter search resumes
        self._reading = False
        self._eof = False
        # Lists, not deques: an empty deque costs ~600 bytes per idle connection.
        self._wqueue: list[bytes | bytearray | memoryview] = []
        self._wsize = 0
        self._wfutures: list[tuple[int, asyncio.Future[None]]] = []
        self._writing = False
        self._write_held = False  # writes wait (e.g. for the TLS handshake)
        self._done = _completed_future(self._loop)
        # OpenSSL's connection object once a TLS stream's handshake is done:
        # reads and writes then go to it directly, past ssl.py's wrappers.
        self._tls: Any = None
        # Its SSL* when OpenSSL reads ahead (see _tls_buffered), else 0.
        self._tls_ptr = 0
        self._bytes_received = 0
        self._bytes_sent = 0
        self._closed = False
        self._close_callback: Callable[[], object] | None = None
        # Called synchronously with the stream when it closes (for its server).
        self._close_hook: Callable[[IOStream], None] | None = None
        #: The exception that closed the stream, if any.
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ info

    @property
    def socket(self) -> socket.socket:
        """The underlying socket."""
        return self._sock

    @property
    def bytes_received(self) -> int:
        """Bytes read from the socket so far (after decryption for TLS)."""
        return self._bytes_received

    @property
    def bytes_sent(self) -> int:
        """Bytes handed to the socket so far (before encryption for TLS)."""
        return self._bytes_sent

    def closed(self) -> bool:
        """Whether the stream has been closed."""
        return self._closed

    def set_close_callback(self, callback: Callable[[], object] | None) -> None:
        """Call `callback()` (soon, from the loop) once the stream closes."""
        self._close_callback = callback
        if self._closed and callback is not None:
            self._close_callback = None
            self._loop.call_soon(callback)

    def set_nodelay(self, value: bool) -> None:
        """Set TCP_NODELAY (disable Nagle) on a TCP socket; no-op otherwise."""
        if self._closed or self._sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if value else 0)
        except OSError as e:
            # The peer may already have reset the connection.
            if e.errno != errno.EINVAL:
                raise

    # ----------------------------------------------------------------- reads

    def read_bytes(self, num_bytes: int, partial: bool = False) -> asyncio.Future[bytes]:
        """Read `num_bytes` bytes; with `partial`, return as soon as any arrive."""
        if num_bytes < 0:
            raise ValueError("num_bytes must be >= 0")
        return self._start_read(_READ_BYTES, num_bytes, None, partial)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> asyncio.Future[bytes]:
        """Read up to and including `delimiter`.

        With `max_bytes`, fails with `UnsatisfiableReadError` (and closes the
        stream) if the delimiter is not found within that many bytes.
        """
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        return self._start_read(_READ_UNTIL, bytes(delimiter), max_bytes, False)

    def read_until_close(self) -> asyncio.Future[bytes]:
        """Read everything until the peer closes the connection."""
        return self._start_read(_READ_CLOSE, None, None, False)

    def read_into(
        self, buffer: bytearray | memoryview, partial: bool = False
    ) -> asyncio.Future[int]:
        """Fill `buffer` (with `partial`, once any bytes arrive); resolves to the count."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("read_into needs a writable buffer")
        return self._start_read(_READ_INTO, view, None, partial)

    def _start_read(
        self, kind: int, arg: Any, limit: int | None, partial: bool
    ) -> asyncio.Future[Any]:
        future = self._read_future
        if future is not None and not future.done():
            raise RuntimeError("Already reading")
        future = self._loop.create_future()
        self._read_future = future
        self._read_kind = kind
        self._read_arg = arg
        self._read_limit = limit
        self._read_partial = partial
        self._read_scanned = 0
        if self._rbuf:
            if self._satisfy_read():
                return future
        elif (kind == _READ_BYTES and not arg) or (kind == _READ_INTO and not len(arg)):
            self._satisfy_read()  # a zero-length read needs no data: done now
            return future
        if self._reading:
            return future  # the common case: data will be signalled
        if self._closed or self._eof:
            self._fail_read(self.error)
            return future
        if not self._reading:
            # A registered reader means OpenSSL's buffer was drained; after a
            # pause it may hold decrypted bytes that the socket won't signal.
            if self._tls is not None and self._tls_buffered():
                self._handle_read()
            if not self._reading and not self._closed and self._read_future is not None:
                self._add_reader()
        return future

    def _satisfy_read(self) -> bool:
        """Complete the pending read from the buffer if possible."""
        if self._read_future is None or self._read_future.done():
            # Cancelled by its awaiter (e.g. asyncio.wait_for): drop it, keep the data.
            self._read_future = None
            self._read_arg = None
            return False
        buf = self._rbuf
        kind = self._read_kind
        size = len(buf)
        result: Any
        if kind == _READ_BYTES:
            wanted: int = self._read_arg
            if size < wanted and not (self._read_partial and size):
                return self._check_buffer_limit(wanted)
            n = min(size, wanted)
            result = bytes(buf[:n])
            del buf[:n]
        elif kind == _READ_UNTIL:
            delimiter: bytes = self._read_arg
            index = buf.find(delimiter, self._read_scanned)
            limit = self._read_limit
            if index == -1:
                # Don't rescan what was searched (long lines in small chunks).
                self._read_scanned = max(0, size - len(delimiter) + 1)
                if limit is not None and size >= limit:
                    self.close(UnsatisfiableReadError(f"delimiter not found within {limit} bytes"))
                    return True
                return self._check_buffer_limit(size + 1)
            end = index + len(delimiter)
            if limit is not None and end > limit:
                self.close(UnsatisfiableReadError(f"delimiter not found within {limit} bytes"))
                return True
            result = bytes(buf[:end])
            del buf[:end]
        elif kind == _READ_INTO:
            view: memoryview = self._read_arg
            wanted = len(view)
            if size < wanted and not (self._read_partial and size):
                return False
            n = min(size, wanted)
            view[:n] = buf[:n]
            del buf[:n]
            result = n
        else:  # _READ_CLOSE completes only at end of stream
            return self._check_buffer_limit(size + 1)
        self._resolve_read(result)
        return True

    def _check_buffer_limit(self, needed: int) -> bool:
        if needed > self._max_buffer_size:
            self.close(StreamBufferFullError(f"reached max_buffer_size ({self._max_buffer_size})"))
            return True
        return False

    def _resolve_read(self, result: Any) -> None:
        future = self._read_future
        self._read_future = None
        self._read_arg = None
        if future is not None and not future.done():
            future.set_result(result)

    def _fail_read(self, error: BaseException | None) -> None:
        future = self._read_future
        if future is None or future.done():
            self._read_future = None  # cancelled by its awaiter
            self._read_arg = None
            return
        if self._read_kind == _READ_CLOSE and not isinstance(error, StreamBufferFullError):
            # Reading until close ends normally when the stream ends.
            result = bytes(self._rbuf)
            self._rbuf.clear()
            self._resolve_read(result)
            return
        if self._read_partial and self._rbuf:
            self._satisfy_read()
            return
        self._read_future = None
        self._read_arg = None
        if not future.done():
            if isinstance(error, (UnsatisfiableReadError, StreamBufferFullError)):
                future.set_exception(error)
            else:
                future.set_exception(StreamClosedError(real_error=error))

    def _add_reader(self) -> None:
        self._reading = True
        self._loop.add_reader(self._fd, self._handle_read)

    def _remove_reader(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _handle_read(self) -> None:
        sock = self._sock
        tls = self._tls
        tls_ptr = self._tls_ptr
        has_pending = _has_pending
        scratch = self._scratch
        full = len(scratch)
        while True:
            try:
                n = tls.read(full, scratch) if tls is not None else sock.recv_into(scratch)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except ssl.SSLEOFError:
                # The peer closed without close_notify: a normal end of stream.
                self._on_eof()
                return
            except ssl.SSLWantWriteError:
                # Rare (TLS renegotiation/key update): retry once writable.
                self._want_write_for_read()
                return
            except (ssl.SSLError, OSError) as e:
                self.close(e)
                return
            if n == 0:
                self._on_eof()
                return
            self._bytes_received += n
            future = self._read_future
            if (
                future is not None
                and not future.done()
                and self._read_kind == _READ_BYTES
                and not self._rbuf
                and (self._read_partial or n == self._read_arg)
            ):
                # Fast path: hand the fresh bytes straight to the reader.
                wanted: int = self._read_arg
                self._read_future = None
                self._read_arg = None
                if n <= wanted:
                    future.set_result(bytes(scratch[:n]))
                else:
                    future.set_result(bytes(scratch[:wanted]))
                    self._rbuf += scratch[wanted:n]
            else:
                self._rbuf += scratch[:n]
                if future is not None:
                    self._satisfy_read()
                    if self._closed:
                        return
            if self._read_future is None and len(self._rbuf) >= _HIGH_WATER:
                # Nobody is consuming: stop reading until someone does.
                self._remove_reader()
                return
            # Keep reading only where more data is likely: a full buffer for
            # plain sockets, a full record or already-decrypted bytes for TLS.
            if tls is not None:
                if tls_ptr and has_pending is not None:
                    if not has_pending(tls_ptr):
                        return
                # Without read-ahead a full record hints that more is queued.
                elif n < _TLS_RECORD and not tls.pending():
                    return
            elif n < full:
                return

    def _tls_buffered(self) -> bool:
        """Whether OpenSSL holds bytes the socket will not signal again.

        With read-ahead that includes records not decrypted yet, which only
        ``SSL_has_pending`` sees; without it, a full record just read is
        taken as a sign that more may follow.
        """
        has_pending = _has_pending
        if self._tls_ptr and has_pending is not None:
            return bool(has_pending(self._tls_ptr))
        return bool(self._tls.pending())

    def _on_eof(self) -> None:
        self._eof = True
        self._remove_reader()
        if self._wqueue:
            # Let queued writes reach the peer first; close once flushed.
            self._fail_read(None)
        else:
            self.close()

    def _want_write_for_read(self) -> None:
        self._loop.add_writer(self._fd, self._on_writable)
        self._writing = True

    # ---------------------------------------------------------------- writes

    def write(self, data: bytes | bytearray | memoryview) -> asyncio.Future[None]:
        """Queue `data` for sending; the future resolves once the kernel has it."""
        queue = self._wqueue
        if not queue and not self._write_held and not self._closed:
            # The common case: the kernel takes it all at once.
            if not data:
                return self._done
            sent = self._send(data)
            if sent == len(data):
                return self._done
            if sent >= 0:
                data = memoryview(data)[sent:]
        if self._closed:
            future = self._loop.create_future()
            future.add_done_callback(_silence)
            future.set_exception(StreamClosedError(real_error=self.error))
            return future
        if not data:
            return self._done
        tail = queue[-1] if len(queue) > 1 else None
        if isinstance(tail, bytearray) and len(tail) + len(data) <= _COALESCE_LIMIT:
            # Never the head: a TLS write must be retried with the same buffer.
            tail += data
        elif len(data) < _COALESCE_LIMIT:
            queue.append(bytearray(data))
        else:
            queue.append(data)
        self._wsize += len(data)
        future = self._loop.create_future()
        future.add_done_callback(_silence)
        self._wfutures.append((self._bytes_sent + self._wsize, future))
        if not self._writing and not self._write_held:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        return future

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now: the count, or -1 if the stream closed."""
        tls = self._tls
        try:
            sent = tls.write(data) if tls is not None else self._sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            return 0
        except ssl.SSLWantReadError:
            # TLS needs to read first (key update); the reader is registered.
            if not self._reading:
                self._add_reader()
            return 0
        except (ssl.SSLError, OSError) as e:
            self.close(e)
            return -1
        self._bytes_sent += sent
        return sent

    def _on_writable(self) -> None:
        queue = self._wqueue
        while queue:
            head = queue[0]
            sent = self._send(head)
            if sent < 0:
                return
            if sent == 0:
                break
            self._wsize -= sent
            if sent == len(head):
                del queue[0]
            else:
                # Plain sockets send partially; TLS sends all or nothing and
                # must be retried with the same buffer, which this keeps.
                queue[0] = memoryview(head)[sent:]
                break
        futures = self._wfutures
        total = self._bytes_sent
        done = 0
        for target, future in futures:
            if target > total:
                break
            done += 1
            if not future.done():
                future.set_result(None)
        if done:
            del futures[:done]
        if not queue:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._eof:
                self.close()
            elif self._read_future is not None and self._tls is not None:
                # A read may have been waiting for writability (rare TLS case).
                self._handle_read()

    # ----------------------------------------------------------------- close

    def close(self, exc_info: BaseException | None = None) -> None:
        """Close the stream, waking every pending reader and writer.

        Pending reads and writes fail with `StreamClosedError` whose
        `real_error` is `exc_info` (the cause), if given.
        """
        if self._closed:
            return
        self._closed = True
        if exc_info is not None and self.error is None:
            self.error = exc_info
        loop = self._loop
        if self._reading:
            self._reading = False
            loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            loop.remove_writer(self._fd)
        self._close_socket(graceful=exc_info is None)
        self._fail_read(self.error)
        error = StreamClosedError(real_error=self.error)
        for _, future in self._wfutures:
            if not future.done():
                future.set_exception(error)
        self._wfutures.clear()
        self._wqueue.clear()
        self._wsize = 0
        hook = self._close_hook
        if hook is not None:
            self._close_hook = None
            hook(self)
        callback = self._close_callback
        if callback is not None:
            self._close_callback = None
            loop.call_soon(callback)

    def _close_socket(self, graceful: bool) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


class SSLIOStream(IOStream):
    """An `IOStream` whose TLS handshake is driven here, without blocking.

    Either pass an `ssl.SSLSocket` made with ``SSLContext.wrap_socket(...,
    do_handshake_on_connect=False)``, or a connected plain socket and
    `server_context`: the stream then wraps it as the server side itself,
    without the `ssl.SSLSocket` layer (what `TCPServer` does; it saves memory
    and time per connection, and `socket` is then the plain socket). Reads
    and writes issued before the handshake completes wait for it.
    """

    __slots__ = (
        "_handshake_callback",
        "_handshake_done",
        "_handshake_future",
        "_handshake_timer",
        "_peer_identity",
        "_peer_identity_parsed",
        "_tls_conn",
        "handshake_error",
        "securetcp_server_name",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        server_context: ssl.SSLContext | None = None,
        max_buffer_size: int | None = None,
        read_chunk_size: int | None = None,
    ) -> None:
        super().__init__(sock, max_buffer_size=max_buffer_size, read_chunk_size=read_chunk_size)
        self._write_held = True  # until the handshake completes
        #: The SNI name the client sent, recorded by securetcp's sni_callback.
        self.securetcp_server_name: str | None = None
        if server_context is not None:
            if isinstance(sock, ssl.SSLSocket):
                raise TypeError("server_context needs a plain socket, not an SSLSocket")
            # With an sni_callback, OpenSSL's object reports this stream to it
            # (the weak reference costs ~80 bytes, so only then).
            owner = self if server_context.sni_callback is not None else None
            self._tls_conn: Any = server_context._wrap_socket(  # type: ignore[attr-defined]
                sock, True, None, owner=owner, session=None
            )
        elif isinstance(sock, ssl.SSLSocket):
            # CPython keeps OpenSSL's connection object in _sslobj; another
            # implementation's SSLSocket offers the same calls itself.
            self._tls_conn = getattr(sock, "_sslobj", None) or sock
        else:
            raise TypeError("SSLIOStream needs an ssl.SSLSocket or a server_context")
        # One read system call per TLS record or more, instead of two.
        self._tls_ptr = tune_connection(self._tls_conn) if _has_pending is not None else 0
        self._handshake_done = False
        self._handshake_future: asyncio.Future[None] | None = None
        self._handshake_callback: Callable[[SSLIOStream, BaseException | None], None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._peer_identity: PeerIdentity | None = None
        self._peer_identity_parsed = False
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
        `error` says why (`TimeoutError` for the deadline).
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
                self._loop.remove_writer(self._fd)
            if not self._reading:
                self._reading = True
                self._loop.add_reader(self._fd, self._step_handshake)
            return
        except ssl.SSLWantWriteError:
            if self._reading:
                self._reading = False
                self._loop.remove_reader(self._fd)
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._fd, self._step_handshake)
            return
        except (ssl.SSLError, OSError, ValueError) as e:
            # ValueError: the socket was closed under us.
            self._finish_handshake(e)
            return
        self._finish_handshake(None)

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self._handshake_done and not self._closed:
            self._finish_handshake(TimeoutError("TLS handshake timed out"))

    def _finish_handshake(self, error: BaseException | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        loop = self._loop
        if self._writing:
            self._writing = False
            loop.remove_writer(self._fd)
        if error is None:
            self._handshake_done = True
            self._write_held = False
            self._tls = self._tls_conn  # application data may flow now
            if self._tls_ptr and self._tls_buffered():
                # Read ahead with the handshake's last records: the socket
                # won't signal these bytes, so take them in now.
                self._handle_read()
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
            if self._reading:
                # Keep the registration, swap the callback: re-registering
                # for the first read would cost two epoll_ctl calls.
                loop.add_reader(self._fd, self._handle_read)
            # Resume I/O that was requested while the handshake ran.
            if self._wqueue and not self._writing:
                self._writing = True
                loop.add_writer(self._fd, self._on_writable)
            if self._read_future is not None:
                if self._rbuf and self._satisfy_read():
                    return
                if self._tls_buffered():
                    self._handle_read()
                if not self._reading and not self._closed and self._read_future is not None:
                    self._add_reader()

    # While the handshake runs, reads wait for it (writes are held).

    def _add_reader(self) -> None:
        if self._handshake_done:
            super()._add_reader()

    def _close_socket(self, graceful: bool) -> None:
        if graceful and self._handshake_done and not self._eof:
            # Send close_notify so the peer sees a clean end of stream; the
            # peer's reply is not awaited.
            try:
                self._tls_conn.shutdown()
            except (ssl.SSLError, OSError, ValueError):
                pass
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
        """Who the peer is, from its certificate (parsed once), or None without one."""
        if not self._peer_identity_parsed:
            self._peer_identity_parsed = True
            try:
                der = self._tls_conn.getpeercert(True)
            except (ValueError, OSError):
                der = None
            if der:
                self._peer_identity = peer_identity_from_der(der)
        return self._peer_identity

    @property
    def server_name(self) -> str | None:
        """The SNI host name the client sent, or None."""
        # Recorded by securetcp's sni_callback on whichever object OpenSSL
        # reports the connection as: this stream, or the SSLSocket given.
        name = self.securetcp_server_name or getattr(self._sock, SERVER_NAME_ATTRIBUTE, None)
        return name if isinstance(name, str) else None

    def selected_alpn_protocol(self) -> str | None:
        """The ALPN protocol agreed with the client, or None."""
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
