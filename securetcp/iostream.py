"""Non-blocking byte streams over sockets, driven by the running asyncio loop.

`IOStream` wraps a connected socket. `SSLIOStream` (in
`securetcp.ssliostream`, importable from here too) adds TLS: a deferred
handshake driven by readiness events, and OpenSSL's read-ahead.

Design notes (these are the hot paths of every server):

* Readiness comes from ``add_reader``/``add_writer`` on the file descriptor,
  through `securetcp._poller`: on Linux one epoll set of securetcp's own per
  loop, itself one reader of the loop (the selector loop and uvloop alike),
  which holds ~250-450 bytes less per connection than a loop registration;
  elsewhere the loop itself. The reader stays registered for the life of
  the connection (one registration, not one per read, kept across the end
  of the handshake); it is only dropped to apply backpressure.
* Every read lands in one scratch buffer shared by all the streams of a
  thread, so an idle connection holds no receive buffer of its own. Data is
  copied out once: straight into the returned ``bytes`` when a read can be
  satisfied at once, otherwise into the stream's own ``bytearray``.
* ``write()`` tries to send at once; only what the kernel does not take is
  queued, and the returned future resolves once the data is handed to it (a
  shared, already-done future when the kernel took everything).
* A subclass changes how bytes move (`_read_chunk`, `_send`) and may hold
  input the socket will not signal again (`_input_buffered`: TLS keeps
  records inside OpenSSL); everything else (buffers, pending reads, write
  queue, close) lives here once.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from securetcp._poller import Poller, acquire_poller, release_poller

if TYPE_CHECKING:
    from securetcp.proxyproto import ProxyHeader

__all__ = [
    "IOStream",
    "SSLIOStream",
    "StreamBufferFullError",
    "StreamClosedError",
    "UnsatisfiableReadError",
]

#: Bytes a pending read may gather (e.g. `read_until` looking for its
#: delimiter) before the stream closes with `StreamBufferFullError`. A few MiB
#: per connection bounds what a hostile peer can make a server hold; raise it
#: (``max_buffer_size=``) for reads that legitimately need more.
DEFAULT_MAX_BUFFER_SIZE = 4 * 1024 * 1024
#: Bytes already queued behind a blocked write beyond which `write()` raises
#: `StreamBufferFullError` (a peer that does not read cannot grow the queue
#: without bound); raise it with ``max_write_buffer_size=``.
DEFAULT_MAX_WRITE_BUFFER_SIZE = 4 * 1024 * 1024
DEFAULT_READ_CHUNK_SIZE = 64 * 1024
# Unconsumed data a stream buffers before it stops reading from the socket
# (the kernel's receive window then pushes back on the peer).
_HIGH_WATER = 256 * 1024
# A relay gathers reads this large (full TLS records) while more are buffered.
_GATHER_FROM = 16 * 1024
# Small writes queued behind a blocked one are merged up to this size, so a
# burst of tiny messages becomes one send (and one TLS record), not many.
_COALESCE_LIMIT = 64 * 1024


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
    """A read needed more than ``max_buffer_size`` bytes, or a write found more
    than ``max_write_buffer_size`` bytes already queued."""


class _Receiver(Protocol):
    """What a stream delivers its bytes to (`_deliver`): a `securetcp.relay.Relay`."""

    def _on_data(self, data: bytes) -> object: ...

    def _on_end(self) -> object: ...


#: What a stream's write queue and its futures are until a write must wait
#: (two empty lists per idle connection saved). Never appended to: `write`
#: replaces it with a list of the stream's own first.
_NOTHING_QUEUED: list[Any] = []

_scratch = threading.local()


def _detached(error: BaseException) -> BaseException:
    """`error`, caught by the stream or by securetcp code that owns it, made fit to keep on it.

    Its traceback and context go: their frames hold the stream and would
    keep it, with its socket and OpenSSL connection, in a reference cycle,
    freed only when the cycle collector next runs, which for a long-lived
    connection can be long after it closed. (Log the traceback first if it
    matters. Errors a caller hands to `IOStream.close` stay untouched.)
    """
    error.__traceback__ = None
    error.__context__ = None
    return error


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


def _fail_quietly(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail a write or shutdown future that may never be awaited.

    Write futures are often not awaited (fire-and-forget writes, as in
    tornado): retrieving the exception at once keeps asyncio from logging
    it, and costs no loop callback (a done callback would cost one for
    every future, failed or not).
    """
    future.set_exception(error)
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
        "_closed",
        "_delivery",
        "_delivery_end_held",
        "_done",
        "_eof",
        "_fd",
        "_half_close",
        "_io",
        "_loop",
        "_max_buffer_size",
        "_max_write_buffer_size",
        "_on_close",
        "_rbuf",
        "_read_arg",
        "_read_future",
        "_read_kind",
        "_read_limit",
        "_read_partial",
        "_read_scanned",
        "_read_wants_write",
        "_reading",
        "_receiver",
        "_scratch",
        "_shut_future",
        "_sock",
        "_wfutures",
        "_wqueue",
        "_write_held",
        "_write_shut",
        "_writing",
        "_wsize",
        "error",
        "proxy_header",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_buffer_size: int | None = None,
        read_chunk_size: int | None = None,
        max_write_buffer_size: int | None = None,
        on_close: Callable[[IOStream], None] | None = None,
        half_close: bool = False,
    ) -> None:
        """Wrap the connected socket `sock` (made non-blocking).

        `on_close(stream)` is called synchronously when the stream closes,
        before any close callback: it is for the stream's owner (a server
        keeping count), where `set_close_callback` is for the application.

        By default the stream closes at the peer's end of stream (once queued
        writes are flushed). With `half_close`, the peer's end of stream only
        ends reading (reads then fail with `StreamClosedError`): writing goes
        on until you `close()` or `shutdown_write()`, so a client that sends
        its request and half-closes still gets the whole answer.
        """
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._max_buffer_size = max_buffer_size or DEFAULT_MAX_BUFFER_SIZE
        self._max_write_buffer_size = max_write_buffer_size or DEFAULT_MAX_WRITE_BUFFER_SIZE
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
        self._read_wants_write = False  # a read waits for writability (TLS key update)
        self._eof = False
        self._half_close = half_close
        self._write_shut = False  # shutdown_write() done: FIN (close_notify) sent
        self._shut_future: asyncio.Future[None] | None = None
        # Lists, not deques (an empty deque costs ~600 bytes), and made only
        # when a write must wait: until then both are the shared empty one.
        self._wqueue: list[bytes | bytearray | memoryview] = _NOTHING_QUEUED
        self._wsize = 0
        self._wfutures: list[tuple[int, asyncio.Future[None]]] = _NOTHING_QUEUED
        self._writing = False
        self._write_held = False  # writes wait (e.g. for the TLS handshake)
        self._done = _completed_future(self._loop)
        self._bytes_received = 0
        self._bytes_sent = 0
        self._closed = False
        self._close_callback: Callable[[], object] | None = None
        self._on_close = on_close
        # The relay reading this stream (see _deliver), and the same while it
        # is not paused (None while it is).
        self._delivery: _Receiver | None = None
        self._receiver: _Receiver | None = None
        self._delivery_end_held = False
        #: The exception that closed the stream, if any.
        self.error: BaseException | None = None
        #: The PROXY protocol header the connection started with
        #: (`securetcp.proxyproto.ProxyHeader`), or None without PROXY protocol.
        self.proxy_header: ProxyHeader | None = None
        # Readiness (see securetcp._poller); held until close(), so last.
        self._io: Poller = acquire_poller(self._loop)

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
        """Call `callback()` (soon, from the loop) once the stream closes.

        The stream then watches the socket even while no read is pending, so
        a peer that goes away is noticed at once (bytes that arrive meanwhile
        are kept for the next read, up to the usual buffer limit).
        """
        self._close_callback = callback
        if self._closed and callback is not None:
            self._close_callback = None
            self._loop.call_soon(callback)
        elif callback is not None:
            self._watch_for_close()

    def _watch_for_close(self) -> None:
        if (
            not self._reading
            and not self._closed
            and not self._eof
            and self._close_callback is not None
            and len(self._rbuf) < _HIGH_WATER
        ):
            self._add_reader()

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
        if (future is not None and not future.done()) or self._delivery is not None:
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
            # A registered reader means input was drained; after a pause a
            # subclass may hold bytes that the socket won't signal again.
            if self._input_buffered():
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
        if self._delivery is not None:
            if self._rbuf and error is None:
                # A clean end of stream (or close) with bytes held or
                # gathered: they come first (_resume_delivery ends it after).
                self._delivery_end_held = True
                if self._receiver is not None:
                    self._receiver = None
                    self._resume_delivery()
            else:
                self._end_delivery()
            return
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
        self._io.add_reader(self._fd, self._handle_read)

    def _remove_reader(self) -> None:
        if self._reading:
            self._reading = False
            self._io.remove_reader(self._fd)

    def _input_buffered(self) -> bool:
        """Whether input is held that the socket will not signal (never, here)."""
        return False

    def _handle_read(self) -> None:
        sock = self._sock
        scratch = self._scratch
        full = len(scratch)
        while True:
            try:
                n = sock.recv_into(scratch)
            except BlockingIOError:
                return
            except OSError as e:
                self._close_on_error(e)
                return
            if n == 0:
                self._on_eof()
                return
            if not self._take(n) or n < full:
                # (A short read: the kernel had no more.)
                return

    def _take(self, n: int, more_buffered: bool = False) -> bool:
        """Hand the `n` fresh bytes in the scratch buffer to the pending read,
        or keep them; False when reading should stop for now. `more_buffered`:
        the subclass holds more input already (full TLS records behind these)."""
        self._bytes_received += n
        scratch = self._scratch
        receiver = self._receiver
        if receiver is not None:
            # A relay (_deliver): no future, no loop callback, no task step.
            buf = self._rbuf
            if more_buffered and n >= _GATHER_FROM and len(buf) + n < len(scratch):
                # Full TLS records and more behind them: one write for all.
                buf += scratch[:n]
                return True
            if buf:
                buf += scratch[:n]
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(scratch[:n])
            receiver._on_data(data)
            return not self._closed
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
                    return False
        if self._read_future is None and len(self._rbuf) >= _HIGH_WATER:
            # Nobody is consuming: stop reading until someone does.
            self._remove_reader()
            return False
        return True

    # ------------------------------------------------------------- relaying

    def _deliver(self, receiver: _Receiver) -> None:
        """Hand every byte read from now on to ``receiver._on_data(data)``, as it arrives.

        For a `securetcp.relay.Relay`: per chunk this saves the future, the
        loop callback and the task step a read costs. ``_on_data`` may call
        `_pause_delivery()` (bytes are then held, up to the usual high-water
        mark, until `_resume_delivery()`). ``receiver._on_end()`` is called
        once reading is over: at the peer's end of stream, after the bytes
        held, or when the stream closes (see `error`). No read may be pending.
        """
        if self._delivery is not None or (
            self._read_future is not None and not self._read_future.done()
        ):
            raise RuntimeError("Already reading")
        self._delivery = receiver
        if self._closed or (self._eof and not self._rbuf):
            self._end_delivery()
            return
        self._delivery_end_held = self._eof
        self._resume_delivery()

    def _pause_delivery(self) -> None:
        """Hold what is read (the relay's sink is full) until `_resume_delivery`."""
        self._receiver = None

    def _resume_delivery(self) -> None:
        """Deliver the bytes held, then read on."""
        receiver = self._delivery
        if receiver is None or self._receiver is not None:
            return
        self._receiver = receiver
        if self._rbuf:
            data = bytes(self._rbuf)
            self._rbuf.clear()
            receiver._on_data(data)
            if self._receiver is None or self._delivery is None:
                return  # paused again, or detached
        if self._delivery_end_held or self._closed:
            self._end_delivery()
            return
        if not self._reading and not self._eof:
            if self._input_buffered():
                self._handle_read()
            if not self._reading and not self._closed and self._receiver is not None:
                self._add_reader()

    def _stop_delivery(self) -> None:
        """Detach the relay (its sink is gone); reads buffer as usual."""
        self._delivery = None
        self._receiver = None

    def _end_delivery(self) -> None:
        receiver = self._delivery
        self._delivery = None
        self._receiver = None
        self._delivery_end_held = False
        if receiver is not None:
            receiver._on_end()

    def _on_eof(self) -> None:
        self._eof = True
        self._remove_reader()
        if self._half_close:
            # Reading is over; writing goes on until the owner is done.
            self._fail_read(None)
            if self._write_shut:
                self.close()
            return
        if self._wqueue:
            # Let queued writes reach the peer first; close once flushed.
            self._fail_read(None)
        else:
            self.close()

    def _want_write_for_read(self) -> None:
        self._read_wants_write = True
        if not self._writing:
            self._writing = True
            self._io.add_writer(self._fd, self._on_writable)

    # ---------------------------------------------------------------- writes

    def write(self, data: bytes | bytearray | memoryview) -> asyncio.Future[None]:
        """Queue `data` for sending; the future resolves once the kernel has it.

        Any bytes-like object is taken as its bytes (a memoryview of an
        ``array("I")`` counts 4 per item). Raises `StreamBufferFullError` when
        more than ``max_write_buffer_size`` bytes are already queued (the
        peer is not reading): await writes to respect backpressure.
        """
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")  # lengths in bytes, not items
        if self._write_shut or self._shut_future is not None:
            raise RuntimeError("write() after shutdown_write()")
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
            _fail_quietly(future, StreamClosedError(real_error=self.error))
            return future
        if not data:
            return self._done
        if self._wsize > self._max_write_buffer_size:
            raise StreamBufferFullError(
                f"{self._wsize} bytes already queued for writing, over "
                f"max_write_buffer_size ({self._max_write_buffer_size}): the peer is not reading"
            )
        if queue is _NOTHING_QUEUED:
            queue = self._wqueue = []
            self._wfutures = []
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
        self._wfutures.append((self._bytes_sent + self._wsize, future))
        if not self._writing and not self._write_held:
            self._writing = True
            self._io.add_writer(self._fd, self._on_writable)
        return future

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now: the count, or -1 if the stream closed."""
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            self._close_on_error(e)
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
                # A partial send; TLS must also be retried with the same
                # bytes from here, which this keeps.
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
        if self._read_wants_write:
            # A read was waiting for writability (rare TLS case): retry it.
            self._read_wants_write = False
            self._handle_read()
            if self._closed:
                return
        if not queue and self._writing and not self._read_wants_write:
            self._writing = False
            self._io.remove_writer(self._fd)
            if self._shut_future is not None:
                self._finish_shutdown_write()
            elif self._eof and not self._half_close:
                self.close()

    def shutdown_write(self) -> asyncio.Future[None]:
        """Send end of stream (a FIN; TLS: close_notify) once queued writes are out.

        Reading goes on (for a `half_close` stream, until the peer's end of
        stream, which then closes the stream). No write may follow. The
        future resolves once the end of stream was handed to the kernel.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        if self._closed or self._write_shut or self._shut_future is not None:
            _fail_quietly(future, StreamClosedError(real_error=self.error))
            return future
        self._shut_future = future
        if not self._wqueue and not self._write_held:
            self._finish_shutdown_write()
        return future

    def _finish_shutdown_write(self) -> None:
        future, self._shut_future = self._shut_future, None
        self._write_shut = True
        try:
            self._send_end_of_stream()
        except OSError as e:
            self._close_on_error(e)
        if future is not None and not future.done():
            if self._closed and self.error is not None:
                _fail_quietly(future, StreamClosedError(real_error=self.error))
            else:
                future.set_result(None)
        if self._eof and not self._closed:
            self.close()  # both directions have ended

    def _send_end_of_stream(self) -> None:
        # After the peer's end, close() follows at once (_finish_shutdown_write)
        # and its FIN is the end of stream: a shutdown() first would be one
        # more system call, failing with ENOTCONN when the peer has reset.
        if not self._eof:
            self._sock.shutdown(socket.SHUT_WR)

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
        io = self._io
        if self._reading:
            self._reading = False
            io.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            io.remove_writer(self._fd)
        release_poller(io)
        self._close_socket(graceful=exc_info is None)
        self._fail_read(self.error)
        if self._wfutures or self._shut_future is not None:
            error = StreamClosedError(real_error=self.error)
            for _, future in self._wfutures:
                if not future.done():
                    _fail_quietly(future, error)
            self._wfutures.clear()
            if self._shut_future is not None and not self._shut_future.done():
                _fail_quietly(self._shut_future, error)
            self._shut_future = None
        self._wqueue.clear()
        self._wsize = 0
        hook = self._on_close
        if hook is not None:
            self._on_close = None
            hook(self)
        callback = self._close_callback
        if callback is not None:
            self._close_callback = None
            self._loop.call_soon(callback)

    def _close_on_error(self, error: BaseException) -> None:
        """Close because one of the stream's own socket or TLS calls failed."""
        self.close(_detached(error))

    def _close_socket(self, graceful: bool) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


if TYPE_CHECKING:
    from securetcp.ssliostream import SSLIOStream


def __getattr__(name: str) -> Any:
    # `from securetcp.iostream import SSLIOStream` keeps working; the class
    # lives in securetcp.ssliostream (imported late: it builds on this module).
    if name == "SSLIOStream":
        from securetcp.ssliostream import SSLIOStream

        return SSLIOStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
