"""Reading a PROXY protocol header off a freshly accepted socket.

Private to `TCPServer`. The header is read before anything else (before the
TLS handshake), with no byte taken past its end: `header_length_hint` says
how far the header is known to reach, so each ``recv`` asks for at most
that, and the TLS layer then finds the ClientHello intact in the socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from securetcp.proxyproto import (
    ProxyHeader,
    ProxyProtocolError,
    header_length_hint,
    parse_proxy_header,
)

__all__ = ["ProxyHeaderReader", "TrustedProxies"]

Network: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"
Done: TypeAlias = Callable[
    ["ProxyHeaderReader", "ProxyHeader | None", "BaseException | None"], None
]


class TrustedProxies:
    """The networks allowed to send a PROXY header (None: loopback only).

    Peers on a unix socket are local processes and always trusted.
    """

    def __init__(self, networks: Iterable[Any] | None) -> None:
        self.networks: tuple[Network, ...] | None = None
        if networks is None:
            return
        if isinstance(networks, (str, bytes)):
            networks = [networks]
        parsed = []
        for item in networks:
            try:
                parsed.append(ipaddress.ip_network(item, strict=False))
            except (TypeError, ValueError):
                raise ValueError(
                    f"trusted_proxies: {item!r} is not a network like '10.0.0.0/8' or an address"
                ) from None
        self.networks = tuple(parsed)

    def __contains__(self, address: Any) -> bool:
        if not (isinstance(address, tuple) and address and isinstance(address[0], str)):
            return True  # a unix socket peer
        try:
            ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.networks is None:
            return ip.is_loopback
        return any(ip in network for network in self.networks)


class ProxyHeaderReader:
    """Reads one PROXY header from `sock`, then calls `done(reader, header, error)`.

    On failure `error` is a `ProxyProtocolError` (malformed or missing
    header), `TimeoutError` or `ConnectionError` (closed before a header);
    the socket is left to the caller either way. `cancel()` stops reading.
    """

    __slots__ = ("_buffer", "_done", "_fd", "_loop", "_timer", "address", "sock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Any,
        timeout: float | None,
        done: Done,
    ) -> None:
        self._loop = loop
        sock.setblocking(False)
        self.sock = sock
        self.address = address
        self._fd = sock.fileno()
        self._done: Done | None = done
        self._buffer = bytearray()
        self._timer = None if timeout is None else loop.call_later(timeout, self._on_timeout)
        loop.add_reader(self._fd, self._on_readable)
        # With TCP_DEFER_ACCEPT the header is usually here already.
        self._on_readable()

    @property
    def finished(self) -> bool:
        """Whether `done` was called (or reading was cancelled)."""
        return self._done is None

    def cancel(self) -> None:
        """Stop reading (the socket stays open); `done` is not called."""
        if self._done is None:
            return
        self._done = None
        self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, header: ProxyHeader | None, error: BaseException | None) -> None:
        done = self._done
        self.cancel()
        if done is not None:
            done(self, header, error)

    def _on_timeout(self) -> None:
        self._timer = None
        self._finish(None, TimeoutError("no PROXY protocol header within the handshake timeout"))

    def _on_readable(self) -> None:
        buffer = self._buffer
        while self._done is not None:
            try:
                wanted = header_length_hint(buffer) - len(buffer)
                data = self.sock.recv(wanted)
            except ProxyProtocolError as e:
                self._finish(None, e)
                return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._finish(None, e)
                return
            if not data:
                self._finish(None, ConnectionResetError("closed before a PROXY protocol header"))
                return
            buffer += data
            try:
                parsed = parse_proxy_header(buffer)
            except ProxyProtocolError as e:
                self._finish(None, e)
                return
            if parsed is not None:
                self._finish(parsed[0], None)
                return
