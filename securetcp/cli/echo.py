"""`securetcp echo`: a TLS echo server (the README's main job)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from securetcp.cli._common import CommandError
from securetcp.cli._serve import (
    add_server_options,
    add_tls_options,
    server_keywords_from_args,
    tls_config_from_args,
)

__all__ = ["register"]

EXAMPLES = """\
examples:
  securetcp certs init && securetcp echo        # on certs/ from `certs init`, port 8443
  securetcp echo --port 9443 --client-auth required
  openssl s_client -connect 127.0.0.1:8443 -CAfile certs/ca.pem -quiet
"""


def _run(args: argparse.Namespace) -> int:
    from securetcp.services.echo import EchoServer

    server = EchoServer(ssl_options=tls_config_from_args(args), **server_keywords_from_args(args))
    try:
        server.listen(args.port, args.address)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.address}:{args.port}: {e.strerror or e}") from e
    port = server.sockets[0].getsockname()[1]
    host = args.address or "127.0.0.1"
    certs = Path(args.certs)
    ca = certs / "ca.pem"
    print(f"TLS echo server on {host}:{port} (Ctrl-C to stop). Try:")
    print(f"  openssl s_client -connect {host}:{port} -CAfile {ca} -quiet")
    print(
        '  python3 -c "import socket, ssl; '
        f"c = ssl.create_default_context(cafile='{ca}'); "
        f"s = c.wrap_socket(socket.create_connection(('{host}', {port})), "
        "server_hostname='localhost'); "
        "s.sendall(b'hello\\n'); print(s.recv(100))\""
    )
    if args.client_auth != "none":
        print(
            f"  openssl s_client -connect {host}:{port} -CAfile {ca} "
            f"-cert {certs / 'client.pem'} -key {certs / 'client.key'} -quiet"
        )
    sys.stdout.flush()
    if args.loop == "uvloop":
        import importlib.util

        if importlib.util.find_spec("uvloop") is None:
            raise CommandError("--loop uvloop needs uvloop: pip install 'securetcp[uvloop]'")
    server.run(loop=args.loop)
    return 0


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
