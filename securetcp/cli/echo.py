"""`securetcp echo`: a TLS echo server (the README's main job)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from securetcp.cli._serve import (
    add_server_options,
    add_tls_options,
    describe_sockets,
    serve,
    server_keywords_from_args,
    tls_config_from_args,
)

__all__ = ["register"]

EXAMPLES = """\
examples:
  securetcp certs init && securetcp echo        # on certs/ from `certs init`, port 8443
  securetcp echo --port 9443 --client-auth required --allow-cn securetcp-dev-client
  securetcp echo --processes 0 --reuse-port --metrics-port 9100
  securetcp echo --unix /tmp/echo.sock --idle-timeout 60
  openssl s_client -connect 127.0.0.1:8443 -CAfile certs/ca.pem -quiet
  securetcp probe 127.0.0.1:8443 --servername localhost --ca certs/ca.pem
"""


def _announcer(args: argparse.Namespace) -> Any:
    certs = Path(args.certs)
    ca = certs / "ca.pem"

    def announce(sockets: list[socket.socket]) -> None:
        where = describe_sockets(sockets)
        print(f"TLS echo server on {', '.join(where)} (Ctrl-C to stop). Try:")
        tcp = [s for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
        if not tcp:
            return
        host, port = tcp[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"  openssl s_client -connect {host}:{port} -CAfile {ca} -quiet")
        print(
            '  python3 -c "import socket, ssl; '
            f"c = ssl.create_default_context(cafile='{ca}'); "
            f"s = c.wrap_socket(socket.create_connection(('{host.strip('[]')}', {port})), "
            "server_hostname='localhost'); "
            "s.sendall(b'hello\\n'); print(s.recv(100))\""
        )
        if args.client_auth != "none":
            print(
                f"  openssl s_client -connect {host}:{port} -CAfile {ca} "
                f"-cert {certs / 'client.pem'} -key {certs / 'client.key'} -quiet"
            )

    return announce


def _run(args: argparse.Namespace) -> int:
    from securetcp.services.echo import EchoServer

    server = EchoServer(ssl_options=tls_config_from_args(args), **server_keywords_from_args(args))
    return serve(server, args, args.port, args.address, _announcer(args))


def register(commands: Any) -> None:
    """Add `echo` to the command line."""
    parser = commands.add_parser(
        "echo",
        help="run a TLS echo server",
        description="Echo every byte back over TLS until the client closes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8443, help="port (default 8443; 0: any)")
    parser.add_argument("--address", default="127.0.0.1", help="address (default 127.0.0.1)")
    add_tls_options(parser, client_auth_default="optional")
    add_server_options(parser)
    parser.set_defaults(func=_run)
