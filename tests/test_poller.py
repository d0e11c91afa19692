"""securetcp._poller: the streams' own epoll set, dispatched from one loop reader.

Real sockets (socketpairs) on a real loop, the default one and uvloop where
installed. The streams' behaviour on top of it is covered by every stream
test; these pin the poller's own contract: the loop's readiness semantics.
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import socket
import subprocess
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

from securetcp._poller import EpollPoller, Poller, acquire_poller, release_poller

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll only")

LOOPS = ["asyncio"]
try:
    import uvloop
except ImportError:  # the uvloop extra is not installed
    uvloop = None
else:
    LOOPS.append("uvloop")


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop of the kind asked for, closed afterwards."""
    fresh = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    try:
        yield fresh
    finally:
        fresh.close()


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to completion on `loop`, bounded in time."""
    loop.run_until_complete(asyncio.wait_for(coro, 10))


class Rig:
    """The running loop's poller, held for one test, and the sockets it made."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.sockets: list[socket.socket] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """A connected pair of non-blocking sockets, closed after the test."""
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        self.sockets += [a, b]
        return a, b

    def adopt(self, sock: socket.socket) -> socket.socket:
        """Close `sock` after the test too."""
        self.sockets.append(sock)
        return sock

    async def dispatched(self) -> None:
        """Return after a dispatch that began after this call.

        One poll reports every ready descriptor, so by then each registered
        one that was ready has had its callback: what has not happened yet
        will not happen for what came before (no fixed wait).
        """
        a, b = self.pair()
        seen = asyncio.Event()
        self.poller.add_reader(a.fileno(), seen.set)
        b.send(b"!")
        await seen.wait()
        self.poller.remove_reader(a.fileno())


def with_rig(loop: asyncio.AbstractEventLoop, test: Callable[[Rig], Awaitable[None]]) -> None:
    """Run `test(rig)` on `loop`; then close its sockets and give the poller back."""

    async def main() -> None:
        rig = Rig(acquire_poller(asyncio.get_running_loop()))
        try:
            await test(rig)
        finally:
            for sock in rig.sockets:
                sock.close()
            release_poller(rig.poller)

    run(loop, main())


def test_reader_is_called_while_readable_and_not_after_removal(loop: Any) -> None:
    async def test(rig: Rig) -> None:
        a, b = rig.pair()
        calls: list[bytes] = []
        woke = asyncio.Event()

        def on_readable() -> None:
            calls.append(a.recv(100))
            woke.set()

        rig.poller.add_reader(a.fileno(), on_readable)
        await rig.dispatched()
        assert calls == []  # nothing to read yet
        b.send(b"hello")
        await woke.wait()
        assert calls == [b"hello"]
        assert rig.poller.remove_reader(a.fileno()) is True
        assert rig.poller.remove_reader(a.fileno()) is False
        b.send(b"more")
        await rig.dispatched()
        assert calls == [b"hello"]

    with_rig(loop, test)


def test_adding_a_reader_again_replaces_the_callback(loop: Any) -> None:
    async def test(rig: Rig) -> None:
        a, b = rig.pair()
        seen: list[str] = []
        woke = asyncio.Event()

        def first() -> None:
            seen.append("first")

        def second() -> None:
            seen.append("second")
            a.recv(100)
            woke.set()

        rig.poller.add_reader(a.fileno(), first)
        rig.poller.add_reader(a.fileno(), second)
        b.send(b"x")
        await woke.wait()
        assert seen == ["second"]

    with_rig(loop, test)


def test_reader_and_writer_on_one_descriptor_are_independent(loop: Any) -> None:
    async def test(rig: Rig) -> None:
        a, b = rig.pair()
        writable = asyncio.Event()
        readable = asyncio.Event()
        reads: list[bytes] = []

        def on_readable() -> None:
            reads.append(a.recv(100))
            readable.set()

        rig.poller.add_reader(a.fileno(), on_readable)
        rig.poller.add_writer(a.fileno(), writable.set)
        await writable.wait()  # an empty send buffer is writable
        assert rig.poller.remove_writer(a.fileno()) is True
        assert rig.poller.remove_writer(a.fileno()) is False
        b.send(b"still reading")
        await readable.wait()
        assert reads == [b"still reading"]

    with_rig(loop, test)


def test_a_hang_up_wakes_a_writer_that_waits_for_room(loop: Any) -> None:
    async def test(rig: Rig) -> None:
        a, b = rig.pair()
        woke = asyncio.Event()
        with pytest.raises(BlockingIOError):
            while True:  # fill every buffer: a is no longer writable
                a.send(b"x" * 65536)
        rig.poller.add_writer(a.fileno(), woke.set)
        await rig.dispatched()
        assert not woke.is_set()
        b.close()  # the peer goes away: an error / hang-up on a
        await woke.wait()

    with_rig(loop, test)


def test_a_descriptor_dropped_in_a_batch_gets_no_stale_event(loop: Any) -> None:
    """A socket closed by another's callback, its number reused at once.

    Both sockets are readable in the same batch of events; whichever callback
    runs first closes the other socket and registers a new, unreadable one
    under the same number. The old socket's event from that batch must not
    reach the new socket's callback.
    """

    async def test(rig: Rig) -> None:
        (a, a_peer), (b, b_peer) = rig.pair(), rig.pair()
        sockets = {"a": a, "b": b}
        calls: list[str] = []
        done = asyncio.Event()

        def make_callback(name: str, other: str) -> Callable[[], None]:
            def callback() -> None:
                calls.append(name)
                sockets[name].recv(100)
                if other not in sockets:
                    return
                victim = sockets.pop(other)
                fd = victim.fileno()
                rig.poller.remove_reader(fd)
                victim.close()
                fresh, _ = rig.pair()
                if fresh.fileno() != fd:  # give the new socket the old number
                    os.dup2(fresh.fileno(), fd)
                    rig.adopt(socket.socket(fileno=fd))
                rig.poller.add_reader(fd, lambda: calls.append("stale"))
                done.set()

            return callback

        rig.poller.add_reader(a.fileno(), make_callback("a", "b"))
        rig.poller.add_reader(b.fileno(), make_callback("b", "a"))
        a_peer.send(b"1")
        b_peer.send(b"2")
        await done.wait()
        await rig.dispatched()
        assert len(calls) == 1, calls

    with_rig(loop, test)


def test_an_exception_in_a_callback_goes_to_the_loop_and_others_still_run(loop: Any) -> None:
    async def test(rig: Rig) -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reported.append(context)
        )
        (a, a_peer), (b, b_peer) = rig.pair(), rig.pair()
        b_woke = asyncio.Event()

        def broken() -> None:
            a.recv(100)
            raise RuntimeError("callback bug")

        def fine() -> None:
            b.recv(100)
            b_woke.set()

        rig.poller.add_reader(a.fileno(), broken)
        rig.poller.add_reader(b.fileno(), fine)
        a_peer.send(b"1")
        b_peer.send(b"2")
        await b_woke.wait()
        await rig.dispatched()
        assert [type(c["exception"]) for c in reported] == [RuntimeError]
        assert "broken" in reported[0]["message"]
        # The poller keeps dispatching after the exception.
        b_woke.clear()
        b_peer.send(b"3")
        await b_woke.wait()

    with_rig(loop, test)


def test_one_poller_per_loop_until_the_last_release() -> None:
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        held = acquire_poller(first)
        assert acquire_poller(first) is held
        assert acquire_poller(second) is not held
        release_poller(held)
        assert acquire_poller(first) is held  # still held once
        release_poller(held)
        release_poller(held)
        # Released by all: the next holder gets a new one.
        fresh = acquire_poller(first)
        assert fresh is not held
        release_poller(fresh)
        release_poller(acquire_poller(second))  # given back as often as taken
        release_poller(acquire_poller(second))
    finally:
        first.close()
        second.close()


def test_the_last_release_closes_the_epoll_set(loop: Any) -> None:
    """No descriptor is left once every holder gave the poller back."""

    async def main() -> None:
        before = set(os.listdir("/proc/self/fd"))
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        try:
            poller.add_reader(a.fileno(), lambda: None)
            poller.remove_reader(a.fileno())
        finally:
            a.close()
            b.close()
        assert set(os.listdir("/proc/self/fd")) != before  # the epoll set
        release_poller(poller)
        assert set(os.listdir("/proc/self/fd")) == before

    run(loop, main())


def test_a_poller_does_not_keep_its_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    acquire_poller(loop)  # never released: the loop still goes
    loop.close()
    alive = weakref.ref(loop)
    del loop
    gc.collect()
    assert alive() is None


def test_close_releases_the_epoll_set_and_the_loop_reader(loop: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        open_before = set(os.listdir("/proc/self/fd"))
        poller = EpollPoller(loop)
        try:
            poller.add_reader(a.fileno(), lambda: None)
            assert set(os.listdir("/proc/self/fd")) != open_before
            poller.close()
            poller.close()  # idempotent
            assert set(os.listdir("/proc/self/fd")) == open_before
            assert poller.remove_reader(a.fileno()) is False
        finally:
            a.close()
            b.close()

    run(loop, main())


FORK_CHECK = """
import asyncio, os
from securetcp._poller import acquire_poller, release_poller

loop = asyncio.new_event_loop()
parent = acquire_poller(loop)
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write_end, b"new" if acquire_poller(loop) is not parent else b"same")
    os._exit(0)
os.close(write_end)
child = os.read(read_end, 16).decode()
os.waitpid(pid, 0)
print(child, "same" if acquire_poller(loop) is parent else "new")
"""


def test_a_forked_child_gets_its_own_epoll_set() -> None:
    """The parent's set is one kernel object: a child must not change it.

    Forked from a fresh interpreter, which has no threads (forking this
    multi-threaded test process would be unsafe, and warned about).
    """
    done = subprocess.run(
        [sys.executable, "-c", FORK_CHECK], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["new", "same"]
