"""Readiness callbacks for many sockets through one registration with the loop.

Private. `acquire_poller(loop)` gives an object with the loop's own
``add_reader``/``remove_reader``/``add_writer``/``remove_writer`` calls (no
extra arguments). On Linux it is an `EpollPoller`: the streams' sockets live
in an epoll set of securetcp's own, and that set's descriptor is the one
thing registered with the asyncio loop.

Why: memory. A loop registration is what an idle connection holds most of
in Python: the selector loop keeps a selector key, a ``Handle`` and an
events record per descriptor (~250 bytes), uvloop a poll handle, its libuv
struct and a ``Handle`` (~460 bytes and more outside the Python heap). Here
it is one entry in each of two dictionaries. Measured per idle TLS
connection: Python objects (tracemalloc) 1,566 -> 1,102 bytes on uvloop,
1,355 -> 1,101 on the default loop; PSS (the bench's memory workload) 14.2
-> 13.8 KiB on uvloop (the default loop's PSS figure drifts by more than
the saving between runs). CPU per connection is unchanged (callgrind: 3.02
M instructions per handshake-echo-close either way): one ``epoll_ctl`` per
registration as before, and events dispatched with a dictionary lookup
instead of a loop callback each, but a second ``epoll_wait`` per wakeup.
Elsewhere (no ``select.epoll``) it is the loop itself.

Lifetime: `acquire_poller` and `release_poller` count the holders (a stream
from construction to close, a server while it serves); the last release
closes the set, so no descriptor outlives the streams that used it.

Semantics are the loop's: level-triggered, one reader and one writer per
descriptor (adding replaces), an error or hang-up wakes both, an exception in
a callback goes to the loop's exception handler and the others still run.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import select
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["EpollPoller", "Poller", "acquire_poller", "release_poller"]

_HAS_EPOLL = hasattr(select, "epoll")
_IN = getattr(select, "EPOLLIN", 0x001)
_OUT = getattr(select, "EPOLLOUT", 0x004)
# asyncio's selector wakes both the reader and the writer on anything but
# the other direction (errors, hang-ups): so do we.
_WAKES_READER = ~_OUT
_WAKES_WRITER = ~_IN

_Callbacks = dict[int, Callable[[], object]]  # descriptor -> reader (or writer)


class Poller(Protocol):
    """The part of an asyncio loop's readiness API the streams use."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_writer(self, fd: int) -> bool: ...


class EpollPoller:
    """An epoll set whose events are dispatched from one loop reader.

    A descriptor removed while a batch of events is being dispatched gets no
    further callback from that batch: its number may already belong to a
    new socket, which must not be woken by the old one's event (the events
    are level-triggered, so nothing real is lost).
    """

    __slots__ = (
        "__weakref__",
        "_dispatching",
        "_dropped",
        "_epoll",
        "_loop_ref",
        "_masks",
        "_readers",
        "_users",
        "_writers",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the poller is the value of a dictionary keyed weakly by
        # its loop, which a strong reference would keep alive forever.
        self._loop_ref = weakref.ref(loop)
        self._epoll = select.epoll()
        self._readers: _Callbacks = {}
        self._writers: _Callbacks = {}
        self._masks: dict[int, int] = {}
        self._dispatching = False
        self._dropped: set[int] = set()
        self._users = 0  # holders from acquire_poller
        # Registered from an empty context: the callbacks (and tasks they
        # start) must not inherit whatever context first asked for a poller.
        contextvars.Context().run(loop.add_reader, self._epoll.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Call `callback()` whenever `fd` is readable (replacing any reader)."""
        self._add(self._readers, _IN, fd, callback)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching `fd` for reading; whether it was watched."""
        return self._remove(self._readers, _IN, fd)

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        """Call `callback()` whenever `fd` is writable (replacing any writer)."""
        self._add(self._writers, _OUT, fd, callback)

    def remove_writer(self, fd: int) -> bool:
        """Stop watching `fd` for writing; whether it was watched."""
        return self._remove(self._writers, _OUT, fd)

    def close(self) -> None:
        """Drop every registration and the epoll set (the loop's reader too)."""
        if self._epoll.closed:
            return
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()

    def _release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        self.close()
        loop = self._loop_ref()
        if loop is not None and _pollers.get(loop) is self:
            del _pollers[loop]

    def _add(
        self, callbacks: _Callbacks, bit: int, fd: int, callback: Callable[[], object]
    ) -> None:
        callbacks[fd] = callback
        self._update(fd, self._masks.get(fd, 0) | bit)

    def _remove(self, callbacks: _Callbacks, bit: int, fd: int) -> bool:
        if callbacks.pop(fd, None) is None:
            return False
        self._update(fd, self._masks.get(fd, 0) & ~bit)
        return True

    def _update(self, fd: int, mask: int) -> None:
        masks = self._masks
        old = masks.get(fd, 0)
        if mask == old:
            return
        epoll = self._epoll
        if not mask:
            del masks[fd]
            if self._dispatching:
                self._dropped.add(fd)
            try:
                epoll.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it
            return
        if old:
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:
                # Closed and reused without being removed: a new socket.
                epoll.register(fd, mask)
        else:
            try:
                epoll.register(fd, mask)
            except FileExistsError:
                # A duplicate of a closed descriptor keeps its registration.
                epoll.modify(fd, mask)
        masks[fd] = mask

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, len(self._masks) or 1)
        except (OSError, ValueError):
            return  # closed under us
        readers = self._readers
        writers = self._writers
        dropped = self._dropped
        self._dispatching = True
        try:
            for fd, event in events:
                if event & _WAKES_READER:
                    callback = readers.get(fd)
                    if callback is not None and fd not in dropped:
                        self._run(callback)
                if event & _WAKES_WRITER:
                    callback = writers.get(fd)
                    if callback is not None and fd not in dropped:
                        self._run(callback)
        finally:
            self._dispatching = False
            if dropped:
                dropped.clear()

    def _run(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            loop = self._loop_ref()
            if loop is not None:
                loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc}
                )


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EpollPoller] = (
    weakref.WeakKeyDictionary()
)


def acquire_poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The poller of `loop`, held by the caller until `release_poller`.

    Made on first use; the last release closes it (its epoll set and the
    loop's reader), so once a loop's streams are all closed no descriptor
    is left, however long the loop itself lives. A stream holds it from
    construction to close, a listening server while it accepts: a busy or
    listening server never re-creates it.
    """
    if not _HAS_EPOLL:
        return loop
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = EpollPoller(loop)
    poller._users += 1
    return poller


def release_poller(poller: Poller) -> None:
    """Give back a poller from `acquire_poller` (once per acquisition)."""
    if isinstance(poller, EpollPoller):
        poller._release()


def _forget_after_fork() -> None:
    # A child must not share the parent's epoll set (one kernel object).
    _pollers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
