"""Tests for securetcp.netutil: real sockets on loopback."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import select
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from servers import until

from securetcp.netutil import add_accept_handler, bind_sockets, bind_unix_socket

LOGGER = "securetcp.netutil"


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback_works()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="::1 is not available")
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def close_later() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


@pytest.fixture
def dual_stack_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make "localhost" resolve to both 127.0.0.1 and ::1, as on many hosts."""
    if not HAS_IPV6:
        pytest.skip("::1 is not available")
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, family: int = 0, *args: Any) -> Any:
        if host != "localhost":
            return real(host, port, family, *args)
        infos = []
        for af, addr in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            if family in (socket.AF_UNSPEC, af):
                infos += real(addr, port, af, *args)
        return infos

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def bind_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Record the address of every socket.bind() call."""
    calls: list[tuple[Any, ...]] = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        calls.append(address)
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    return calls


# --- bind_sockets ------------------------------------------------------------


def test_port_zero_localhost_same_port(close_later: list[socket.socket]) -> None:
    socks = bind_sockets(0, "localhost")
    close_later += socks
    assert socks
    assert len({s.getsockname()[1] for s in socks}) == 1
    assert socks[0].getsockname()[1] != 0


@pytest.mark.usefixtures("dual_stack_localhost")
def test_port_zero_dual_stack_same_port(close_later: list[socket.socket]) -> None:
    socks = bind_sockets(0, "localhost")
    close_later += socks
    assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
    port = socks[0].getsockname()[1]
    assert socks[1].getsockname()[1] == port
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, port), timeout=5):
            pass


@pytest.mark.usefixtures("dual_stack_localhost")
def test_socket_options(monkeypatch: pytest.MonkeyPatch, close_later: list[socket.socket]) -> None:
    backlogs: list[int] = []
    real_listen = socket.socket.listen

    def listen(self: socket.socket, backlog: int) -> None:
        backlogs.append(backlog)
        real_listen(self, backlog)

    monkeypatch.setattr(socket.socket, "listen", listen)
    socks = bind_sockets(0, "localhost")
    close_later += socks
    assert backlogs == [128, 128]
    close_later += bind_sockets(0, "127.0.0.1", backlog=7)
    assert backlogs[-1] == 7
    for s in socks:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert not s.getblocking()
        assert not s.get_inheritable()
        assert s.type == socket.SOCK_STREAM
    v6 = [s for s in socks if s.family == socket.AF_INET6]
    assert v6[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_family_restricts(close_later: list[socket.socket]) -> None:
    socks = bind_sockets(0, "localhost", family=socket.AF_INET)
    close_later += socks
    assert [s.family for s in socks] == [socket.AF_INET]


def test_empty_address_means_all_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts: list[Any] = []

    def getaddrinfo(host: Any, port: Any, *args: Any) -> Any:
        hosts.append(host)
        return []  # nothing to bind: the request itself is what is checked

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for address in ("", None):
        with pytest.raises(OSError):
            bind_sockets(0, address)
    assert hosts == [None, None]


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
def test_reuse_port(close_later: list[socket.socket]) -> None:
    [first] = bind_sockets(0, "127.0.0.1", reuse_port=True)
    close_later.append(first)
    port = first.getsockname()[1]
    [second] = bind_sockets(port, "127.0.0.1", reuse_port=True)
    close_later.append(second)
    assert second.getsockname()[1] == port
    assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    with pytest.raises(OSError) as exc_info:
        bind_sockets(port, "127.0.0.1")
    assert exc_info.value.errno == errno.EADDRINUSE


def test_reuse_port_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    with pytest.raises(ValueError, match="SO_REUSEPORT"):
        bind_sockets(0, "127.0.0.1", reuse_port=True)


def _bind_where_ipv4_is_free(ipv6_sock: socket.socket) -> int:
    """Bind ``ipv6_sock`` to ::1 on a port that 127.0.0.1 can bind too.

    A port the kernel picks for ::1 may still be held on 127.0.0.1 by an
    earlier test's client connection in TIME_WAIT; a port it picks for
    127.0.0.1 is free there.
    """
    for _ in range(50):
        with socket.socket() as ipv4:
            ipv4.bind(("127.0.0.1", 0))  # never listens: leaves no TIME_WAIT
            port: int = ipv4.getsockname()[1]
            try:
                ipv6_sock.bind(("::1", port))
            except OSError:
                continue
            return port
    raise AssertionError("found no port free on both 127.0.0.1 and ::1")


@needs_linux
@pytest.mark.usefixtures("dual_stack_localhost")
def test_fixed_port_in_use_closes_partial_sockets() -> None:
    with socket.socket(socket.AF_INET6) as blocker:
        port = _bind_where_ipv4_is_free(blocker)
        blocker.listen()
        before = _open_fds()
        with pytest.raises(OSError) as exc_info:
            bind_sockets(port, "localhost")  # IPv4 binds, then ::1 fails
        assert exc_info.value.errno == errno.EADDRINUSE
        assert _open_fds() == before
    # The IPv4 socket was really closed: its port is free again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


@pytest.mark.usefixtures("dual_stack_localhost")
def test_ephemeral_port_taken_on_other_family_is_retried(
    monkeypatch: pytest.MonkeyPatch, close_later: list[socket.socket]
) -> None:
    # Occupy ::1 on the port the kernel picked for IPv4, right before bind_sockets
    # binds it there: a real EADDRINUSE, once.
    binds: list[Any] = []
    blockers: list[socket.socket] = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        binds.append(address)
        if self.family == socket.AF_INET6 and address[1] != 0 and not blockers:
            blocker = socket.socket(socket.AF_INET6)
            blockers.append(blocker)
            real_bind(blocker, ("::1", address[1]))
            blocker.listen()
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    socks = bind_sockets(0, "localhost")
    close_later += socks + blockers
    taken = blockers[0].getsockname()[1]
    assert len(binds) == 4  # v4, v6 (EADDRINUSE), then v4 and v6 again
    assert len(socks) == 2
    port = socks[0].getsockname()[1]
    assert socks[1].getsockname()[1] == port != taken


@needs_linux
@pytest.mark.usefixtures("dual_stack_localhost")
def test_ephemeral_port_retries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    blockers: list[socket.socket] = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_INET6 and address[1] != 0:
            blocker = socket.socket(socket.AF_INET6)
            blockers.append(blocker)
            real_bind(blocker, ("::1", address[1]))
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    try:
        before = _open_fds()
        with pytest.raises(OSError) as exc_info:
            bind_sockets(0, "localhost")
        assert exc_info.value.errno == errno.EADDRINUSE
        assert len(blockers) == 10
        assert _open_fds() - before == {b.fileno() for b in blockers}
    finally:
        for b in blockers:
            b.close()


def test_unbindable_ipv6_localhost_is_skipped(
    monkeypatch: pytest.MonkeyPatch, close_later: list[socket.socket]
) -> None:
    # Containers often resolve localhost to ::1 but cannot bind it; simulate that
    # with an IPv6 address that is not configured here (EADDRNOTAVAIL).
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, family: int = 0, *args: Any) -> Any:
        v4 = real("127.0.0.1", port, socket.AF_INET, *args)
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0))
        return [v6, *v4]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support at all")
    socks = bind_sockets(0, "localhost")
    close_later += socks
    assert [s.family for s in socks] == [socket.AF_INET]


# --- bind_unix_socket ----------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short: AF_UNIX paths are limited to ~100 bytes, pytest's tmp_path may not be.
    with tempfile.TemporaryDirectory(prefix="stcp") as d:
        yield d


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no AF_UNIX")
class TestBindUnixSocket:
    def test_creates_listening_socket(self, sock_dir: str) -> None:
        path = os.path.join(sock_dir, "s")
        with bind_unix_socket(path) as sock:
            assert not sock.getblocking()
            assert not sock.get_inheritable()
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)

    def test_mode(self, sock_dir: str) -> None:
        path = os.path.join(sock_dir, "s")
        with bind_unix_socket(path, mode=0o660):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    def test_replaces_stale_socket(self, sock_dir: str) -> None:
        path = os.path.join(sock_dir, "s")
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(path)  # closing leaves the file behind
        with bind_unix_socket(path) as sock:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
            conn, _ = sock.accept()
            conn.close()

    def test_refuses_regular_file(self, sock_dir: str) -> None:
        path = os.path.join(sock_dir, "f")
        with open(path, "w") as f:
            f.write("keep me")
        before = _open_fds() if sys.platform.startswith("linux") else set()
        with pytest.raises(ValueError, match="not a socket") as exc_info:
            bind_unix_socket(path)
        assert repr(path) in str(exc_info.value)
        with open(path) as f:
            assert f.read() == "keep me"
        if before:
            assert _open_fds() == before

    @needs_linux
    def test_abstract_name(self) -> None:
        name = f"\0securetcp-test-{os.getpid()}"
        with bind_unix_socket(name) as sock:
            assert sock.getsockname() == name.encode()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(name)
            conn, _ = sock.accept()
            conn.close()


# --- add_accept_handler --------------------------------------------------------


def test_accept_handler_needs_running_loop(close_later: list[socket.socket]) -> None:
    [sock] = bind_sockets(0, "127.0.0.1")
    close_later.append(sock)
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        add_accept_handler(sock, lambda conn, addr: conn.close())


@pytest.mark.timeout(10)
def test_a_blocking_listening_socket_does_not_stall_the_loop(
    close_later: list[socket.socket],
) -> None:
    """A socket made by hand (``socket.create_server``) is blocking: accepting
    until EAGAIN on it would block the loop in accept() for good."""
    sock = socket.create_server(("127.0.0.1", 0))
    close_later.append(sock)
    close_later += _connect_clients(sock.getsockname()[1], 2)

    async def main() -> int:
        accepted: list[socket.socket] = []
        remove = add_accept_handler(sock, lambda conn, address: accepted.append(conn))
        try:
            await until(lambda: len(accepted) == 2, message="both clients accepted")
        finally:
            remove()
            for conn in accepted:
                conn.close()
        return len(accepted)

    assert asyncio.run(main()) == 2
    assert sock.getblocking() is False


def _connect_clients(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        clients.append(c)
        err = c.connect_ex(("127.0.0.1", port))
        assert err in (0, errno.EINPROGRESS), os.strerror(err)
    return clients


def test_accepts_a_burst_in_bounded_batches(close_later: list[socket.socket]) -> None:
    total = 500
    [sock] = bind_sockets(0, "127.0.0.1", backlog=1024)
    close_later.append(sock)
    close_later += _connect_clients(sock.getsockname()[1], total)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        batches: list[int] = []
        count = 0

        def end_of_batch() -> None:
            batches.append(count - sum(batches))

        def on_accept(conn: socket.socket, address: Any) -> None:
            nonlocal count
            if count == sum(batches):  # first of a batch: mark its end
                loop.call_soon(end_of_batch)
            count += 1
            assert address[0] == "127.0.0.1"
            conn.close()
            if count == total:
                done.set()

        remove = add_accept_handler(sock, on_accept)
        await asyncio.wait_for(done.wait(), 20)
        remove()
        await until(lambda: sum(batches) == total, message="the last batch to end")
        return batches

    batches = asyncio.run(main())
    assert sum(batches) == total
    assert max(batches) <= 128


def test_remove_from_callback_stops_mid_batch(close_later: list[socket.socket]) -> None:
    [sock] = bind_sockets(0, "127.0.0.1")
    close_later.append(sock)
    port = sock.getsockname()[1]
    for _ in range(10):
        close_later.append(socket.create_connection(("127.0.0.1", port), timeout=5))

    async def main() -> int:
        calls = 0
        first = asyncio.Event()

        def on_accept(conn: socket.socket, address: Any) -> None:
            nonlocal calls
            calls += 1
            conn.close()
            if calls == 3:
                remove()
                remove()  # idempotent
                first.set()

        remove = add_accept_handler(sock, on_accept)
        await asyncio.wait_for(first.wait(), 10)
        # The batch stopped in the callback (calls is still 3) and the
        # listener's reader is gone, so no later readiness event calls back.
        assert calls == 3
        assert not asyncio.get_running_loop().remove_reader(sock.fileno())
        return calls

    assert asyncio.run(main()) == 3
    # The remaining connections are still queued, untouched.
    sock.setblocking(True)
    sock.settimeout(5)
    conn, _ = sock.accept()
    conn.close()


def test_remove_after_loop_closed_is_harmless(close_later: list[socket.socket]) -> None:
    [sock] = bind_sockets(0, "127.0.0.1")
    close_later.append(sock)

    async def main() -> Any:
        return add_accept_handler(sock, lambda conn, addr: conn.close())

    remove = asyncio.run(main())
    remove()
    remove()


class FlakySocket:
    """A real listening socket whose accept() first fails with given errnos."""

    def __init__(self, sock: socket.socket, errnos: list[int]) -> None:
        self.sock = sock
        self.errnos = errnos
        self.calls: list[float] = []
        #: How many accept() calls ran before the loop's next turn: those of
        #: the first readiness event (one batch).
        self.first_batch: int | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls.append(time.monotonic())
        if len(self.calls) == 1:
            asyncio.get_running_loop().call_soon(self._end_of_first_batch)
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, os.strerror(code))
        return self.sock.accept()

    def _end_of_first_batch(self) -> None:
        self.first_batch = len(self.calls)


@pytest.fixture
def pending(close_later: list[socket.socket]) -> socket.socket:
    """A listening socket with one connection waiting to be accepted."""
    [sock] = bind_sockets(0, "127.0.0.1")
    close_later.append(sock)
    close_later.append(socket.create_connection(sock.getsockname(), timeout=5))
    return sock


def _run_until_accepted(flaky: FlakySocket, n: int = 1) -> list[socket.socket]:
    async def main() -> list[socket.socket]:
        conns: list[socket.socket] = []
        done = asyncio.Event()

        def on_accept(conn: socket.socket, address: Any) -> None:
            conns.append(conn)
            if len(conns) == n:
                done.set()

        remove = add_accept_handler(flaky, on_accept)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(done.wait(), 10)
        finally:
            remove()
        return conns

    conns = asyncio.run(main())
    for c in conns:
        c.close()
    return conns


def test_connection_errors_are_skipped(
    pending: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakySocket(pending, [errno.ECONNABORTED, errno.EPROTO])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_until_accepted(flaky)
    # Two skipped errors, the connection, then EAGAIN: all in one batch (no pause).
    assert len(flaky.calls) == 4
    assert flaky.first_batch == 4
    assert caplog.records == []


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_resource_errors_back_off(
    code: int, pending: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakySocket(pending, [code] * 3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_until_accepted(flaky)
    # Three failures, the connection, then EAGAIN; a doubling pause after each failure.
    assert len(flaky.calls) == 5
    gaps = [b - a for a, b in zip(flaky.calls[:3], flaky.calls[1:4], strict=True)]
    for gap, pause in zip(gaps, [0.05, 0.1, 0.2], strict=True):
        assert gap >= pause * 0.9
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == ["WARNING", "INFO"]
    assert os.strerror(code) in levels[0][1]
    assert "accepting again" in levels[1][1]


def test_remove_cancels_back_off(pending: socket.socket) -> None:
    flaky = FlakySocket(pending, [errno.EMFILE] * 100)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        remove = add_accept_handler(flaky, lambda c, a: c.close())  # type: ignore[arg-type]
        # Paused at least once, then resumed.
        await until(lambda: len(flaky.calls) >= 2, timeout=10, message="a retry after a pause")
        remove()
        calls = len(flaky.calls)
        # A barrier in loop time, not a wait for something to happen: pauses
        # are at most 1 s (add_accept_handler's docstring) and timers fire in
        # deadline order, so any back-off timer that survived remove() fires
        # (and accepts again) before this sleep returns.
        await asyncio.sleep(1.05)
        assert len(flaky.calls) == calls
        assert not loop.remove_reader(pending.fileno())

    asyncio.run(main())


def test_callback_error_is_logged_and_accepting_goes_on(
    close_later: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    [sock] = bind_sockets(0, "127.0.0.1")
    close_later.append(sock)
    for _ in range(2):
        close_later.append(socket.create_connection(sock.getsockname(), timeout=5))
    calls = 0

    def on_accept(conn: socket.socket, address: Any) -> None:
        nonlocal calls
        calls += 1
        conn.close()
        if calls == 1:
            raise ZeroDivisionError("boom")
        done.set()

    async def main() -> None:
        remove = add_accept_handler(sock, on_accept)
        await asyncio.wait_for(done.wait(), 10)
        remove()

    done = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        asyncio.run(main())
    assert calls == 2
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


EMFILE_SERVER = r"""
import asyncio, json, logging, os, resource, sys, time
from securetcp.netutil import add_accept_handler, bind_sockets

total = int(sys.argv[1])
records = []

class Recorder(logging.Handler):
    def emit(self, record):
        records.append(record.levelname)
        if record.levelname == "WARNING":
            warned.set()

logger = logging.getLogger("securetcp.netutil")
logger.addHandler(Recorder())
logger.setLevel(logging.INFO)

class Counting:
    # The listening socket, counting accept() calls (a spinning loop makes thousands).
    def __init__(self, sock):
        self.sock, self.calls = sock, 0
    def fileno(self):
        return self.sock.fileno()
    def getsockname(self):
        return self.sock.getsockname()
    def setblocking(self, flag):
        self.sock.setblocking(flag)
    def accept(self):
        self.calls += 1
        return self.sock.accept()

async def main():
    global warned
    warned = asyncio.Event()
    [sock] = bind_sockets(0, "127.0.0.1")
    held, accepted, releasing = [], 0, False
    done = asyncio.Event()

    def on_accept(conn, address):
        nonlocal accepted
        accepted += 1
        if releasing:
            conn.close()
        else:
            held.append(conn)
        if accepted == total:
            done.set()

    # Room for only a few connections.
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 6, hard))
    counting = Counting(sock)
    add_accept_handler(counting, on_accept)
    print(sock.getsockname()[1], flush=True)

    await asyncio.wait_for(warned.wait(), 20)
    before = counting.calls
    await asyncio.sleep(1.0)  # the measured episode: accept() keeps failing
    calls = counting.calls - before
    held_at_emfile = len(held)
    releasing = True
    for conn in held:
        conn.close()
    await asyncio.wait_for(done.wait(), 20)
    print(json.dumps({"calls": calls, "held": held_at_emfile, "accepted": accepted,
                      "records": records}), flush=True)

asyncio.run(main())
"""


@needs_linux
def test_emfile_pauses_without_spinning_and_recovers() -> None:
    total = 30
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, str(total)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "server did not start"
        port = int(proc.stdout.readline())
        for _ in range(total):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        out, err = proc.communicate(timeout=40)
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["accepted"] == total
    assert 0 < result["held"] < total
    assert result["records"] == ["WARNING", "INFO"]  # once per episode
    # Back-off pauses of 50 ms doubling to 1 s allow a handful of attempts in
    # the measured second; a loop that spins retries thousands of times.
    assert 0 < result["calls"] <= 10, result
