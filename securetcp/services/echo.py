"""A TLS echo service: every byte a client sends comes back to it."""

from __future__ import annotations

import logging
from typing import Any

from securetcp.iostream import IOStream, StreamClosedError
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

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        """Echo `stream` until the peer closes it."""
        if isinstance(stream, SSLIOStream) and log.isEnabledFor(logging.DEBUG):
            identity = stream.peer_identity
            log.debug(
                "%s connected: %s %s, client %s",
                address,
                stream.tls_version,
                stream.cipher[0] if stream.cipher else "?",
                identity.common_name if identity else "anonymous",
            )
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                await stream.write(data)
        except StreamClosedError:
            pass
        finally:
            stream.close()
