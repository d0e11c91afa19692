"""securetcp: a TLS-first TCP server toolkit on asyncio.

The public API, re-exported from the modules that define it.
"""

from securetcp.certs import PeerIdentity
from securetcp.client import client_context, connect
from securetcp.iostream import (
    IOStream,
    StreamBufferFullError,
    StreamClosedError,
    UnsatisfiableReadError,
)
from securetcp.netutil import (
    add_accept_handler,
    bind_sockets,
    bind_unix_socket,
    sockets_from_systemd,
)
from securetcp.process import cpu_count, fork_processes, task_id
from securetcp.proxyproto import (
    ProxyHeader,
    ProxyProtocolError,
    encode_proxy_header,
    parse_proxy_header,
)
from securetcp.ssliostream import SSLIOStream
from securetcp.tcpserver import ServerStats, TCPServer
from securetcp.tls import SSLOptionsError, TLSConfig, ssl_options_to_context

__all__ = [
    "IOStream",
    "PeerIdentity",
    "ProxyHeader",
    "ProxyProtocolError",
    "SSLIOStream",
    "SSLOptionsError",
    "ServerStats",
    "StreamBufferFullError",
    "StreamClosedError",
    "TCPServer",
    "TLSConfig",
    "UnsatisfiableReadError",
    "add_accept_handler",
    "bind_sockets",
    "bind_unix_socket",
    "client_context",
    "connect",
    "cpu_count",
    "encode_proxy_header",
    "fork_processes",
    "parse_proxy_header",
    "sockets_from_systemd",
    "ssl_options_to_context",
    "task_id",
]

__version__ = "0.1.0"
