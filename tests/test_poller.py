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
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from securetcp._poller import EpollPoller, acquire_poller, release_poller

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll only")

LOOPS = ["asyncio"]
try:
    import uvloop
except ImportError:  # the uvloop extra is not installed
    uvloop = None
else:
    LOOPS.append("uvloop")


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, None]], None]]:
    """Run a coroutine to completion on a fresh loop of the kind asked for."""
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()

    def run_bounded(coro: Coroutine[Any, Any, None]) -> None:
        loop.run_until_complete(asyncio.wait_for(coro, 10))

    try:
        yield run_bounded
    finally:
        loop.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _turns(n: int = 5) -> None:
    """Let the loop run `n` iterations (events that are due get dispatched)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_reader_is_called_while_readable_and_not_after_removal(run: Any) -> None:
    async def main() -> None:
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = _pair()
        calls: list[bytes] = []
        woke = asyncio.Event()

        def on_readable() -> None:
            calls.append(a.recv(100))
            woke.set()

        try:
            poller.add_reader(a.fileno(), on_readable)
            await _turns()
            assert calls == []  # nothing to read yet
            b.send(b"hello")
            await woke.wait()
            assert calls == [b"hello"]
            assert poller.remove_reader(a.fileno()) is True
            assert poller.remove_reader(a.fileno()) is False
            b.send(b"more")
            await _turns()
            assert calls == [b"hello"]
        finally:
            a.close()
            b.close()
            release_poller(poller)

    run(main())


def test_adding_a_reader_again_replaces_the_callback(run: Any) -> None:
    async def main() -> None:
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = _pair()
        seen: list[str] = []
        woke = asyncio.Event()

        def first() -> None:
            seen.append("first")

        def second() -> None:
            seen.append("second")
            a.recv(100)
            woke.set()

        try:
            poller.add_reader(a.fileno(), first)
            poller.add_reader(a.fileno(), second)
            b.send(b"x")
            await woke.wait()
            assert seen == ["second"]
        finally:
            poller.remove_reader(a.fileno())
            a.close()
            b.close()
            release_poller(poller)

    run(main())


def test_reader_and_writer_on_one_descriptor_are_independent(run: Any) -> None:
    async def main() -> None:
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = _pair()
        writable = asyncio.Event()
        readable = asyncio.Event()
        reads: list[bytes] = []

        def on_readable() -> None:
            reads.append(a.recv(100))
            readable.set()

        try:
            poller.add_reader(a.fileno(), on_readable)
            poller.add_writer(a.fileno(), writable.set)
            await writable.wait()  # an empty send buffer is writable
            assert poller.remove_writer(a.fileno()) is True
            assert poller.remove_writer(a.fileno()) is False
            b.send(b"still reading")
            await readable.wait()
            assert reads == [b"still reading"]
        finally:
            poller.remove_reader(a.fileno())
            a.close()
            b.close()
            release_poller(poller)

    run(main())


def test_a_hang_up_wakes_a_writer_that_waits_for_room(run: Any) -> None:
    async def main() -> None:
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = _pair()
        woke = asyncio.Event()
        try:
            with pytest.raises(BlockingIOError):
                while True:  # fill every buffer: a is no longer writable
                    a.send(b"x" * 65536)
            poller.add_writer(a.fileno(), woke.set)
            await _turns()
            assert not woke.is_set()
            b.close()  # the peer goes away: an error / hang-up on a
            await woke.wait()
        finally:
            poller.remove_writer(a.fileno())
            a.close()
            b.close()
            release_poller(poller)

    run(main())


def test_a_descriptor_dropped_in_a_batch_gets_no_stale_event(run: Any) -> None:
    """A socket closed by another's callback, its number reused at once.

    Both sockets are readable in the same batch of events; whichever callback
    runs first closes the other socket and registers a new, unreadable one
    under the same number. The old socket's event from that batch must not
    reach the new socket's callback.
    """

    async def main() -> None:
        poller = acquire_poller(asyncio.get_running_loop())
        (a, a_peer), (b, b_peer) = _pair(), _pair()
        sockets = {"a": a, "b": b}
        calls: list[str] = []
        replacements: list[socket.socket] = []
        done = asyncio.Event()

        def make_callback(name: str, other: str) -> Callable[[], None]:
            def callback() -> None:
                calls.append(name)
                sockets[name].recv(100)
                if other not in sockets:
                    return
                victim = sockets.pop(other)
                fd = victim.fileno()
                poller.remove_reader(fd)
                victim.close()
                fresh, fresh_peer = _pair()
                if fresh.fileno() != fd:  # give the new socket the old number
                    os.dup2(fresh.fileno(), fd)
                    fresh.close()
                    fresh = socket.socket(fileno=fd)
                replacements.extend([fresh, fresh_peer])
                poller.add_reader(fd, lambda: calls.append("stale"))
                done.set()

            return callback

        try:
            poller.add_reader(a.fileno(), make_callback("a", "b"))
            poller.add_reader(b.fileno(), make_callback("b", "a"))
            a_peer.send(b"1")
            b_peer.send(b"2")
            await done.wait()
            await _turns()
            assert len(calls) == 1, calls
        finally:
            for sock in [*sockets.values(), *replacements]:
                poller.remove_reader(sock.fileno())
                sock.close()
            a_peer.close()
            b_peer.close()
            release_poller(poller)

    run(main())


def test_an_exception_in_a_callback_goes_to_the_loop_and_others_still_run(run: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        poller = acquire_poller(loop)
        (a, a_peer), (b, b_peer) = _pair(), _pair()
        b_woke = asyncio.Event()

        def broken() -> None:
            a.recv(100)
            raise RuntimeError("callback bug")

        def fine() -> None:
            b.recv(100)
            b_woke.set()

        try:
            poller.add_reader(a.fileno(), broken)
            poller.add_reader(b.fileno(), fine)
            a_peer.send(b"1")
            b_peer.send(b"2")
            await b_woke.wait()
            await _turns()
            assert [type(c["exception"]) for c in reported] == [RuntimeError]
            assert "broken" in reported[0]["message"]
            # The poller keeps dispatching after the exception.
            b_woke.clear()
            b_peer.send(b"3")
            await b_woke.wait()
        finally:
            for sock in (a, b):
                poller.remove_reader(sock.fileno())
                sock.close()
            a_peer.close()
            b_peer.close()
            release_poller(poller)

    run(main())


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


def test_the_last_release_closes_the_epoll_set(run: Any) -> None:
    """No descriptor is left once every holder gave the poller back."""

    async def main() -> None:
        before = set(os.listdir("/proc/self/fd"))
        poller = acquire_poller(asyncio.get_running_loop())
        a, b = _pair()
        try:
            poller.add_reader(a.fileno(), lambda: None)
            poller.remove_reader(a.fileno())
        finally:
            a.close()
            b.close()
        assert set(os.listdir("/proc/self/fd")) != before  # the epoll set
        release_poller(poller)
        assert set(os.listdir("/proc/self/fd")) == before

    run(main())


def test_a_poller_does_not_keep_its_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    acquire_poller(loop)  # never released: the loop still goes
    loop.close()
    alive = weakref.ref(loop)
    del loop
    gc.collect()
    assert alive() is None


def test_close_releases_the_epoll_set_and_the_loop_reader(run: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = _pair()
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

    run(main())


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
