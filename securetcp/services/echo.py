"""A TLS echo service: every byte a client sends comes back to it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from securetcp.iostream import IOStream
from securetcp.relay import Relay
from securetcp.ssliostream import SSLIOStream
from securetcp.tcpserver import TCPServer

__all__ = ["EchoServer"]

log = logging.getLogger("securetcp.echo")


class EchoServer(TCPServer):
    """Echo every byte back to the client until it closes the connection.

    A client's half-close (``shutdown(SHUT_WR)``, or TLS close_notify) ends
    the echo once everything it sent has come back; then the connection closes.
    """

    half_close = True

    def handle_stream(self, stream: IOStream, address: Any) -> Awaitable[None]:
        """Echo `stream` until the peer closes it.

        A `Relay` from the stream to itself: the server runs it without a task
        (a subclass may ``await super().handle_stream(...)``; that waits for
        the echo to end).
        """
        if isinstance(stream, SSLIOStream) and log.isEnabledFor(logging.DEBUG):
            identity = stream.peer_identity
            log.debug(
                "%s connected: %s %s, client %s",
                address,
                stream.tls_version,
                stream.cipher[0] if stream.cipher else "?",
                identity.common_name if identity else "anonymous",
            )
        return Relay(stream, stream, close=True)
