"""Listening sockets and the accept loop.

Modelled on ``tornado.netutil``: :func:`bind_sockets` and :func:`bind_unix_socket`
create listening sockets, :func:`add_accept_handler` accepts connections on one of
them from a running asyncio event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "AcceptCallback",
    "add_accept_handler",
    "bind_sockets",
    "bind_unix_socket",
    "sockets_from_systemd",
]

log = logging.getLogger("securetcp.netutil")

_DEFAULT_BACKLOG = 128

# How often bind_sockets(0, ...) retries when the ephemeral port picked for the
# first family is already taken on a later one.
_EPHEMERAL_BIND_ATTEMPTS = 10

# accept() errors that concern only the connection being accepted: skip it.
# Linux may also report pending network errors of the new connection here
# (accept(2), "Error handling"); these are to be treated like EAGAIN.
_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EINTR",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)

# accept() errors caused by resource exhaustion: pause accepting for a while.
_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

_MIN_PAUSE = 0.05
_MAX_PAUSE = 1.0

AcceptCallback = Callable[[socket.socket, Any], None]
"""``callback(connection, address)`` as passed to :func:`add_accept_handler`."""


def bind_sockets(
    port: int,
    address: str | None = None,
    family: socket.AddressFamily = socket.AF_UNSPEC,
    backlog: int = _DEFAULT_BACKLOG,
    flags: int | None = None,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """Create listening sockets bound to ``port`` on ``address``.

    Returns one listening, non-blocking, close-on-exec socket per distinct address
    that ``getaddrinfo`` returns for ``address`` (``None`` or ``""``: all
    interfaces).  ``family`` restricts the address family (``AF_INET`` or
    ``AF_INET6``); ``flags`` is passed to ``getaddrinfo`` (default
    ``AI_PASSIVE``).  ``SO_REUSEADDR`` is set (except on Windows) and IPv6 sockets
    are ``IPV6_V6ONLY``, so the IPv4 and IPv6 sockets are independent.

    With ``port=0`` every socket is bound to the same ephemeral port.  If the port
    the kernel chose for the first family is taken on another one, all sockets
    are closed and the allocation is retried a few times before ``OSError``
    (``EADDRINUSE``) is raised.

    ``reuse_port=True`` sets ``SO_REUSEPORT`` so that several sockets (usually in
    several processes) can share the port; ``ValueError`` where the platform does
    not support it.  On any error no socket is left open.
    """
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("SO_REUSEPORT is not supported on this platform")
    if address == "":
        address = None
    if not socket.has_ipv6 and family == socket.AF_UNSPEC:
        family = socket.AF_INET
    if flags is None:
        flags = socket.AI_PASSIVE
    infos = _unique_addrinfo(
        socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0, flags), address
    )
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"no usable address for {address!r}")

    attempts = _EPHEMERAL_BIND_ATTEMPTS if port == 0 else 1
    for _ in range(attempts):
        sockets = _bind_all(infos, address, backlog, reuse_port)
        if sockets is not None:
            return sockets
    raise OSError(
        errno.EADDRINUSE,
        f"could not bind one ephemeral port on every address of {address!r} in {attempts} attempts",
    )


_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


def _unique_addrinfo(infos: Iterable[_AddrInfo], address: str | None) -> list[_AddrInfo]:
    """Drop duplicates and unusable results, IPv4 first (as tornado does)."""
    seen: set[_AddrInfo] = set()
    result = []
    for info in sorted(infos, key=lambda info: info[0]):
        if info in seen:
            continue
        seen.add(info)
        af, sockaddr = info[0], info[4]
        # Some systems (macOS) resolve "localhost" to a link-local fe80::1%lo0 as
        # well as ::1; binding it is surprising and often fails.
        if af == socket.AF_INET6 and address == "localhost" and sockaddr[3] != 0:
            continue
        result.append(info)
    return result


def _bind_all(
    infos: list[_AddrInfo], address: str | None, backlog: int, reuse_port: bool
) -> list[socket.socket] | None:
    """Bind one socket per address; None if a shared ephemeral port was taken."""
    sockets: list[socket.socket] = []
    bound_port: int | None = None
    try:
        for af, socktype, proto, _canonname, sockaddr in infos:
            try:
                sock = socket.socket(af, socktype, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # e.g. kernel without IPv6
                    continue
                raise
            shared_ephemeral = sockaddr[1] == 0 and bound_port is not None
            if shared_ephemeral:
                sockaddr = (sockaddr[0], bound_port, *sockaddr[2:])
            try:
                _configure_listener(sock, af, reuse_port)
                sock.bind(sockaddr)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE and shared_ephemeral:
                    # The port was chosen by the kernel for an earlier family and
                    # is in use here: start over with a new port.
                    for s in sockets:
                        s.close()
                    return None
                if (
                    exc.errno == errno.EADDRNOTAVAIL
                    and address == "localhost"
                    and af == socket.AF_INET6
                ):
                    # IPv6 half-disabled (common in containers): ::1 resolves
                    # but cannot be bound.  Serve on the other families.
                    continue
                raise
            sockets.append(sock)
            bound_port = sock.getsockname()[1]
            sock.listen(backlog)
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, f"no address of {address!r} could be bound")
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def _configure_listener(sock: socket.socket, af: int, reuse_port: bool) -> None:
    sock.set_inheritable(False)  # already the default since PEP 446; be explicit
    sock.setblocking(False)
    if os.name != "nt":
        # Windows' SO_REUSEADDR lets another process steal a bound port.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:  # GNU/Hurd does not support it
                raise
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
        # Keep IPv4 and IPv6 apart: the IPv4 socket serves IPv4 clients.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def bind_unix_socket(
    path: str, mode: int = 0o600, backlog: int = _DEFAULT_BACKLOG
) -> socket.socket:
    """Create a listening, non-blocking Unix stream socket at ``path``.

    An existing socket file at ``path`` (left over by an earlier server) is
    replaced; any other kind of file raises ``ValueError``.  The file gets
    permissions ``mode``.  A ``path`` starting with ``"\\0"`` is a Linux abstract
    name: nothing is created in the file system and ``mode`` does not apply.
    """
    abstract = path.startswith("\0")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.set_inheritable(False)
        sock.setblocking(False)
        if not abstract:
            _remove_stale_socket(path)
        sock.bind(path)
        if not abstract:
            # Before listen(): nobody can connect while the mode is still loose.
            os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path!r} exists and is not a socket; refusing to replace it")
    os.remove(path)


#: The first descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def sockets_from_systemd(names: Iterable[str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd socket activation handed to this process.

    Reads ``LISTEN_PID`` (must be this process), ``LISTEN_FDS`` (descriptors
    from 3 on) and ``LISTEN_FDNAMES`` (``FileDescriptorName=`` of each
    socket unit, ``unknown`` when unset); with `names`, only the sockets so
    named. The sockets are made non-blocking and close-on-exec; ``[]`` when
    the process was not socket-activated. The variables are removed from
    the environment either way, so children do not take them as theirs.
    Raises ValueError, naming the variable or descriptor, for a malformed
    variable or a descriptor that is not a listening stream socket.
    """
    values = {name: os.environ.pop(name, None) for name in _SYSTEMD_VARIABLES}
    pid, count_text = values["LISTEN_PID"], values["LISTEN_FDS"]
    if not pid or not count_text:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (e.g. our parent)
    except ValueError:
        raise ValueError(f"LISTEN_PID={pid!r} is not a process id") from None
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number of descriptors") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number of descriptors")
    fd_names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    wanted = None if names is None else set(names)
    sockets: list[socket.socket] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = fd_names[index] if index < len(fd_names) else "unknown"
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ValueError(f"systemd socket {name!r} (fd {fd}): {exc.strerror}") from None
        if wanted is not None and name not in wanted:
            continue
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()  # not ours to close
            raise ValueError(
                f"systemd socket {name!r} (fd {fd}) is not a listening stream socket "
                "(securetcp needs ListenStream= and Accept=no)"
            )
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def add_accept_handler(sock: socket.socket, callback: AcceptCallback) -> Callable[[], None]:
    """Accept connections on the listening ``sock`` from the running event loop.

    ``callback(connection, address)`` is called for each accepted connection and
    then owns it; an exception it raises is logged.  Each readiness event
    accepts at most 128 connections so that other work gets its turn.  When
    accept() fails for lack of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``,
    ``ENOMEM``) accepting pauses, for 50 ms at first and up to 1 s while the
    failures go on, with one warning per episode.

    ``sock`` is made non-blocking. Returns ``remove()``, which stops accepting
    at once (also when called from ``callback``): no further ``callback``
    calls happen.  It is idempotent and does not close ``sock``.

    Raises ``RuntimeError`` if no asyncio event loop is running in this thread.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "add_accept_handler() needs a running asyncio event loop; "
            "call it from a coroutine or a loop callback"
        ) from None
    return _Acceptor(loop, sock, callback).remove


class _Acceptor:
    """State of one add_accept_handler() registration."""

    __slots__ = ("_callback", "_fd", "_loop", "_pause", "_removed", "_sock", "_timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, callback: AcceptCallback
    ) -> None:
        # A socket made elsewhere may be blocking: accepting until EAGAIN
        # on it would block the loop in accept().
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._callback = callback
        self._removed = False
        self._pause = 0.0  # current back-off; non-zero during an episode of failures
        self._timer: asyncio.TimerHandle | None = None
        loop.add_reader(self._fd, self._on_readable)

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        # The hot path: locals only, no per-connection logging.
        accept = self._sock.accept
        callback = self._callback
        accepted = 0
        for _ in range(_DEFAULT_BACKLOG):
            if self._removed:
                return
            try:
                conn, address = accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                self._pause_accepting(exc)
                return
            accepted += 1
            try:
                callback(conn, address)
            except Exception:
                log.exception("error in accept callback for %s", address)
        if accepted and self._pause:
            self._pause = 0.0
            log.info("accepting again on %s", _describe(self._sock))

    def _pause_accepting(self, exc: OSError) -> None:
        self._loop.remove_reader(self._fd)
        if self._pause:
            self._pause = min(self._pause * 2, _MAX_PAUSE)
        else:
            self._pause = _MIN_PAUSE
            # Once per episode; an unexpected error is retried the same way
            # rather than killing the server or spinning on it.
            level = logging.WARNING if exc.errno in _RESOURCE_ERRNOS else logging.ERROR
            log.log(
                level,
                "accept() on %s failed: %s; pausing accepts (retrying for as long as it fails)",
                _describe(self._sock),
                exc,
            )
        self._timer = self._loop.call_later(self._pause, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self._removed:
            return
        try:
            self._loop.add_reader(self._fd, self._on_readable)
        except (OSError, ValueError):  # the socket was closed under us
            log.exception("cannot watch %s any more; no longer accepting", _describe(self._sock))
            self._removed = True


def _describe(sock: socket.socket) -> str:
    try:
        return repr(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"
