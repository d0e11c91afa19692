"""Outgoing TCP and TLS connections: :func:`connect` and :func:`client_context`.

``connect(host, port, ssl=...)`` resolves the host, connects a non-blocking
socket on the running loop, and for TLS drives the handshake through
:class:`~securetcp.iostream.SSLIOStream`, all within one ``timeout``. It
returns a stream whose handshake has completed, so the server's certificate
has been verified and every TLS fact is known.

Every failure is one specific exception whose message names ``host:port``
and the reason: ``ConnectionRefusedError``, ``TimeoutError``,
``ssl.SSLCertVerificationError`` (untrusted certificate, hostname mismatch;
``verify_code``/``verify_message`` kept), another ``ssl.SSLError`` for a
handshake the server refused, ``socket.gaierror`` when the name does not
resolve, ``ConnectionError`` for anything else on the way. No socket is left
open on any failure path, cancellation included.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import ssl as _ssl
from collections.abc import Awaitable, Sequence
from typing import Any, TypeAlias, TypeVar

import certifi

from securetcp._logging import format_address
from securetcp.iostream import IOStream, SSLIOStream, StreamClosedError
from securetcp.tls import INTERMEDIATE_CIPHERS, SSLOptionsError
from securetcp.tls.files import load_ca, load_pair, use_pair

__all__ = ["client_context", "connect"]

StrPath: TypeAlias = "str | os.PathLike[str]"
_T = TypeVar("_T")

_PROFILES = ("intermediate", "modern")


# -- contexts --------------------------------------------------------------------


def client_context(
    cafile: StrPath | None = None,
    *,
    certfile: StrPath | None = None,
    keyfile: StrPath | None = None,
    password: str | bytes | None = None,
    alpn_protocols: Sequence[str] = (),
    profile: str = "intermediate",
) -> _ssl.SSLContext:
    """A verifying, hostname-checking client context.

    ``cafile`` is a PEM file (or a directory of PEM files) of trusted CAs;
    None trusts certifi's bundle. ``certfile``/``keyfile`` (``keyfile=None``:
    the key is in ``certfile``; ``password`` for an encrypted key) present a
    client certificate for mutual TLS. ``profile`` is ``"intermediate"``
    (TLS 1.2+, Mozilla's cipher list) or ``"modern"`` (TLS 1.3 only).

    Files are checked as strictly as a server's: :class:`SSLOptionsError`,
    naming the option and the path, for a missing or unreadable file, a file
    without a certificate, a key that does not match the certificate, an
    encrypted key without (or with a wrong) password, a client certificate
    outside its validity period.
    """
    if profile not in _PROFILES:
        raise SSLOptionsError(
            f"client_context profile: {profile!r} is not one of {', '.join(_PROFILES)}"
        )
    if isinstance(alpn_protocols, (str, bytes)) or not all(
        isinstance(p, str) and 0 < len(p.encode()) < 256 for p in alpn_protocols
    ):
        raise SSLOptionsError(
            "client_context alpn_protocols: expected a sequence of protocol names like "
            f"['h2', 'http/1.1'], got {alpn_protocols!r}"
        )
    if certfile is None and keyfile is not None:
        raise SSLOptionsError(
            f"client_context keyfile: {os.fspath(keyfile)!s} is given without certfile"
        )
    context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.options |= _ssl.OP_NO_COMPRESSION | _ssl.OP_NO_RENEGOTIATION
    if profile == "modern":
        context.minimum_version = _ssl.TLSVersion.TLSv1_3
    else:
        context.minimum_version = _ssl.TLSVersion.TLSv1_2
        # The server profile's TLS 1.2 suites (ECDHE with AEAD only); a client
        # offering just these reaches every server following Mozilla's profiles.
        context.set_ciphers(INTERMEDIATE_CIPHERS)
    if cafile is None:
        context.load_verify_locations(cafile=certifi.where())
    else:
        _load_trust(context, cafile)
    if certfile is not None:
        _load_client_certificate(context, certfile, keyfile, password)
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    return context


def _load_trust(context: _ssl.SSLContext, cafile: StrPath) -> None:
    # The same rules as the server's client_ca: a PEM file or a directory of
    # them, every file checked (an unreadable one is an error naming it).
    load_ca(context, cafile, "client_context cafile")


def _load_client_certificate(
    context: _ssl.SSLContext,
    certfile: StrPath,
    keyfile: StrPath | None,
    password: str | bytes | None,
) -> None:
    # Checked as strictly as a server's certificate: it parses, the key
    # matches, it is in its validity period.
    pair = load_pair(
        certfile, keyfile, password, "client_context certfile", "client_context keyfile"
    )
    use_pair(context, pair)


# -- connecting --------------------------------------------------------------------


class _Expired(Exception):
    """The shared deadline passed; `connect` turns it into a TimeoutError.

    Kept apart from TimeoutError so that a kernel's ETIMEDOUT for one address
    is told from the deadline itself (the next address is then tried).
    """


class _Deadline:
    """One time budget shared by resolution, TCP connect and the TLS handshake."""

    def __init__(self, timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = None if timeout is None else self._loop.time() + timeout

    async def run(self, awaitable: Awaitable[_T], stage: str) -> _T:
        """Await `awaitable` within what is left; raise `_Expired(stage)` after."""
        if self._end is None:
            return await awaitable
        remaining = self._end - self._loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(awaitable, remaining)
        except asyncio.TimeoutError:
            # (asyncio.TimeoutError is not the builtin one before 3.11.)
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started when no time was left
            raise _Expired(stage) from None


def _os_error(error: OSError, message: str) -> OSError:
    """``error`` restated with `message`: the same errno and class (ConnectionRefusedError,
    ConnectionResetError, TimeoutError...); ConnectionError where there is no subclass."""
    code = error.errno
    if not code:
        return ConnectionError(message)
    new = OSError(code, message)  # picks the subclass for the errno
    if type(new) is OSError:
        return ConnectionError(code, message)
    return new


@functools.lru_cache(maxsize=1)
def _default_context() -> _ssl.SSLContext:
    # Loading certifi's bundle takes tens of milliseconds: do it once.
    return client_context()


def _resolve_context(option: object) -> _ssl.SSLContext | None:
    if option is None or option is False:
        return None
    if option is True:
        return _default_context()
    if isinstance(option, _ssl.SSLContext):
        return option
    raise TypeError(f"connect: ssl must be None, True or an ssl.SSLContext, not {option!r}")


async def connect(
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    timeout: float | None = 10.0,
    source_address: tuple[str, int] | None = None,
    max_buffer_size: int | None = None,
) -> IOStream | SSLIOStream:
    """Connect to ``host:port``; return an `IOStream`, or with ``ssl`` an `SSLIOStream`
    whose handshake has completed.

    ``ssl=None`` is plain TCP, ``True`` means :func:`client_context` (certifi's
    CAs; one context, made on first use, shared by every such call), an
    ``ssl.SSLContext`` is used as given. ``server_hostname`` (default
    ``host``) is sent as SNI and checked against the certificate. Resolution,
    TCP connect and handshake together take at most ``timeout`` seconds
    (None: no bound). ``source_address`` binds the local end first. Each
    address ``host`` resolves to is tried in turn. TCP_NODELAY is set.

    Raises ``ConnectionRefusedError``, ``TimeoutError``,
    ``ssl.SSLCertVerificationError``, ``ssl.SSLError`` (another handshake
    failure), ``socket.gaierror`` (name not resolved) or ``ConnectionError``;
    each message names ``host:port`` and the reason.

    With TLS 1.3 the client's handshake completes before the server has
    checked a client certificate: a server that refuses it closes the
    stream afterwards, so the first read fails with `StreamClosedError`.
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"connect: host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"connect: port must be an integer in 1..65535, got {port!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"connect: timeout must be a positive number of seconds, got {timeout!r}")
    context = _resolve_context(ssl)
    if server_hostname is not None and context is None:
        raise ValueError("connect: server_hostname is only meaningful with ssl")
    where = format_address((host, port))
    deadline = _Deadline(timeout)
    try:
        sock = await _connect_socket(host, port, where, deadline, source_address)
        if context is None:
            try:
                return IOStream(sock, max_buffer_size=max_buffer_size)
            except BaseException:
                sock.close()
                raise
        return await _start_tls(
            sock, context, server_hostname or host, where, deadline, max_buffer_size
        )
    except _Expired as exc:
        raise TimeoutError(
            errno.ETIMEDOUT, f"{exc.args[0]} {where}: timed out after {timeout} s"
        ) from None


async def _connect_socket(
    host: str,
    port: int,
    where: str,
    deadline: _Deadline,
    source_address: tuple[str, int] | None,
) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        infos = await deadline.run(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), "resolving"
        )
    except socket.gaierror as exc:
        raise socket.gaierror(
            exc.errno, f"cannot resolve {host!r} (connecting to {where}): {exc.strerror}"
        ) from None
    # (address tried, what failed if not the connect itself, the error)
    errors: list[tuple[str, str, OSError]] = []
    for family, type_, proto, _, address in infos:
        label = format_address((str(address[0]), port))
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if source_address is not None:
                try:
                    sock.bind(source_address)
                except OSError as exc:
                    errors.append((label, f"cannot bind to {source_address!r}: ", exc))
                    sock.close()
                    continue
            await deadline.run(loop.sock_connect(sock, address), "connecting to")
        except OSError as exc:
            errors.append((label, "", exc))
            sock.close()
            continue
        except BaseException:
            sock.close()  # the deadline, or cancelled
            raise
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # the peer reset already
            sock.close()
            raise _os_error(exc, f"connecting to {where}: {exc.strerror or exc}") from None
        return sock
    raise _connect_failure(where, errors)


def _connect_failure(where: str, errors: list[tuple[str, str, OSError]]) -> OSError:
    """One exception for every address that failed: the class of the last error."""
    if not errors:  # getaddrinfo never returns an empty list, but be clear if it did
        return ConnectionError(f"connecting to {where}: no address to connect to")

    def reason(exc: OSError) -> str:
        # asyncio's sock_connect words every error "connect call failed (...)".
        return (os.strerror(exc.errno) if exc.errno else str(exc)).lower()

    last = errors[-1][2]
    if len(errors) == 1:
        message = f"connecting to {where}: {errors[0][1]}{reason(last)}"
    else:
        tried = "; ".join(f"{label} {what}{reason(exc)}" for label, what, exc in errors)
        message = f"connecting to {where}: every address failed ({tried})"
    return _os_error(last, message)


async def _start_tls(
    sock: socket.socket,
    context: _ssl.SSLContext,
    server_hostname: str,
    where: str,
    deadline: _Deadline,
    max_buffer_size: int | None,
) -> SSLIOStream:
    try:
        tls_sock = context.wrap_socket(
            sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
    except BaseException:
        sock.close()
        raise
    try:
        stream = SSLIOStream(tls_sock, max_buffer_size=max_buffer_size)
    except BaseException:
        tls_sock.close()
        raise
    try:
        await deadline.run(stream.wait_for_handshake(), "TLS handshake with")
    except StreamClosedError as exc:
        stream.close()
        raise _handshake_failure(exc.real_error, where, server_hostname) from None
    finally:
        if not stream.handshake_done:
            stream.close()  # timed out or cancelled
    return stream


def _handshake_failure(error: BaseException | None, where: str, server_hostname: str) -> Exception:
    """Restate why the handshake failed, naming the server."""
    prefix = f"TLS handshake with {where}"
    if server_hostname not in where:
        prefix += f" (server_hostname {server_hostname!r})"
    if isinstance(error, _ssl.SSLCertVerificationError):
        verify = error.verify_message or error.reason or "certificate verify failed"
        new: _ssl.SSLError = _ssl.SSLCertVerificationError(
            error.errno, f"{prefix}: certificate verify failed: {verify}"
        )
        _copy_ssl_attributes(error, new)
        new.verify_code = error.verify_code  # type: ignore[attr-defined]
        new.verify_message = error.verify_message  # type: ignore[attr-defined]
        return new
    if isinstance(error, _ssl.SSLEOFError):
        new = _ssl.SSLEOFError(
            error.errno, f"{prefix}: the server closed the connection during the handshake"
        )
        _copy_ssl_attributes(error, new)
        return new
    if isinstance(error, _ssl.SSLError):
        detail = error.reason or error.strerror or str(error)
        new = type(error)(error.errno, f"{prefix} failed: {str(detail).lower()}")
        _copy_ssl_attributes(error, new)
        return new
    if isinstance(error, OSError):
        return _os_error(error, f"{prefix}: {str(error.strerror or error).lower()}")
    return ConnectionError(f"{prefix} failed: {error!r}")


def _copy_ssl_attributes(source: _ssl.SSLError, target: _ssl.SSLError) -> None:
    target_any: Any = target
    target_any.library = getattr(source, "library", None)
    target_any.reason = getattr(source, "reason", None)
