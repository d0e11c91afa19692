"""`Relay`: copy one stream's bytes to another, driven by the streams' callbacks.

A relay is what an echo (a stream to itself) and a proxy (one relay each
way) are made of. Bytes go from the source's read handler straight into
`sink.write`: no task, coroutine, future or loop callback per chunk, and
none per connection either, so an idle relayed connection holds only the
relay itself. A handler that returns a relay from `handle_stream` is served
without a task (`TCPServer` keeps the relay instead).

Backpressure: a write the kernel does not take at once pauses the source
until it is out, so at most one chunk waits in the sink's queue; meanwhile
the source stops reading at its high-water mark and the kernel pushes back
on the sender.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Generator
from typing import Any

from securetcp.iostream import IOStream, StreamClosedError, _detached

__all__ = ["Relay"]

log = logging.getLogger("securetcp.relay")


class PeerBrokeError(Exception):
    """Why a stream was aborted: the connection on the other side of its relay broke."""


def broke(error: BaseException | None) -> bool:
    """Whether a stream was closed by a network or TLS error (not an idle timeout)."""
    return isinstance(error, (OSError, ssl.SSLError)) and not isinstance(
        error, (TimeoutError, StreamClosedError)
    )


_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort(stream: IOStream) -> None:
    """Close `stream` as broken: a TCP reset, and no TLS close_notify.

    Its peer then cannot mistake a truncated transfer for a complete one.
    """
    if stream.closed():
        return
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass
    stream.close(PeerBrokeError("the connection on the other side of the relay broke"))


class Relay:
    """Copies everything `source` receives to `sink`, then passes its end on.

    When `source` ends cleanly (its peer's FIN or TLS close_notify) the relay
    writes out what it read, ends the same direction on `sink`
    (`shutdown_write`: a FIN, or close_notify) and is over. When `source`
    breaks (a reset, a TLS error) `sink` is aborted with a reset. When
    `sink` closes, the relay is over with the next bytes it has for it (at
    once if a write was waiting), and `source` is no longer read for it.
    `source` must have no read pending (``RuntimeError`` otherwise).

    ``Relay(stream, stream, close=True)`` is an echo. When the relay is over
    it closes both streams if `close` is true, then calls `on_ended()` (once).
    Awaiting a relay waits for it to be over; nothing is allocated for that
    unless somebody awaits.
    """

    __slots__ = ("_close", "_on_ended", "_over", "_sink", "_source", "_waiter")

    def __init__(
        self,
        source: IOStream,
        sink: IOStream,
        *,
        on_ended: Callable[[], object] | None = None,
        close: bool = False,
    ) -> None:
        self._source = source
        self._sink = sink
        self._close = close
        self._on_ended = on_ended
        self._over = False
        self._waiter: asyncio.Future[None] | None = None
        source._deliver(self)

    @property
    def source(self) -> IOStream:
        """The stream read from."""
        return self._source

    @property
    def sink(self) -> IOStream:
        """The stream written to."""
        return self._sink

    def done(self) -> bool:
        """Whether the relay is over."""
        return self._over

    def __await__(self) -> Generator[Any, None, None]:
        if self._over:
            return
        if self._waiter is None or self._waiter.cancelled():
            self._waiter = asyncio.get_running_loop().create_future()
        yield from self._waiter.__await__()

    # ---------------------------------------------------------- callbacks

    def _on_data(self, data: bytes) -> None:
        try:
            written = self._sink.write(data)
        except Exception as e:  # a bug, not a peer: break both sides, visibly
            log.exception("relay: writing to %r failed", self._sink)
            self._source.close(_detached(e))  # logged; its frames would hold both streams
            abort(self._sink)
            self._stop()
            return
        if not written.done():
            self._source._pause_delivery()
            written.add_done_callback(self._on_written)
        elif written.exception() is not None:
            self._stop()

    def _on_written(self, written: asyncio.Future[None]) -> None:
        if written.cancelled() or written.exception() is not None:
            self._stop()  # the sink closed
        else:
            self._source._resume_delivery()

    def _stop(self) -> None:
        self._source._stop_delivery()
        self._end()

    def _on_end(self) -> None:
        sink = self._sink
        if broke(self._source.error):
            abort(sink)
        elif not sink.closed():
            # The kernel has every byte we read (a pending write paused the
            # source): pass the end of stream on.
            shut = sink.shutdown_write()
            if not shut.done():
                shut.add_done_callback(self._end)
                return
        self._end()

    def _end(self, _: object = None) -> None:
        if self._over:
            return
        self._over = True
        if self._close:
            self._source.close()
            self._sink.close()
        on_ended, self._on_ended = self._on_ended, None
        if on_ended is not None:
            on_ended()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
