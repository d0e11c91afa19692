"""Options and start-up shared by the serving commands (`echo`, `proxy`).

`add_tls_options` and `add_server_options` put the same flags on every
serving command; `tls_config_from_args` and `server_keywords_from_args` turn
them into a `TLSConfig` and `TCPServer` keywords; `serve` listens as the
options say and runs the server until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from securetcp.cli._common import CommandError
from securetcp.tcpserver import TCPServer
from securetcp.tls import TLSConfig

__all__ = [
    "add_server_options",
    "add_tls_options",
    "serve",
    "server_keywords_from_args",
    "tls_config_from_args",
]


def add_tls_options(parser: argparse.ArgumentParser, *, client_auth_default: str = "none") -> None:
    """The server-side TLS flags: certificate, key, client certificates, profile."""
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--certs", default="certs", help="directory from `certs init` (default: certs)"
    )
    group.add_argument(
        "--cert",
        "--certfile",
        dest="cert",
        help="server certificate chain (default: CERTS/server.pem)",
    )
    group.add_argument(
        "--key", "--keyfile", dest="key", help="server key (default: CERTS/server.key)"
    )
    group.add_argument(
        "--client-auth",
        choices=("none", "optional", "required"),
        default=client_auth_default,
        help=f"ask clients for a certificate (default: {client_auth_default})",
    )
    group.add_argument(
        "--client-ca", help="CA file or directory for client certificates (default: CERTS/ca.pem)"
    )
    group.add_argument("--profile", choices=("intermediate", "modern"), default="intermediate")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Where to listen and the server's limits."""
    group = parser.add_argument_group("server")
    group.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    group.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default: asyncio; uvloop needs securetcp[uvloop])",
    )


def tls_config_from_args(args: argparse.Namespace) -> TLSConfig:
    """The `TLSConfig` the TLS options describe (SSLOptionsError when they are wrong)."""
    certs = Path(args.certs)
    certfile = args.cert or str(certs / "server.pem")
    keyfile = args.key or str(certs / "server.key")
    client_ca = args.client_ca or (str(certs / "ca.pem") if args.client_auth != "none" else None)
    return TLSConfig(
        certfile,
        keyfile,
        client_auth=args.client_auth,
        client_ca=client_ca,
        profile=args.profile,
    )


def server_keywords_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`TCPServer` keywords from the server options."""
    return {"handshake_timeout": args.handshake_timeout}


def serve(server: TCPServer, args: argparse.Namespace, port: int, address: str | None) -> int:
    """Listen on `address:port` and run `server` until SIGINT/SIGTERM; exit status 0."""
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise CommandError("--loop uvloop needs uvloop: pip install 'securetcp[uvloop]'")
    try:
        server.listen(port, address)
    except OSError as e:
        raise CommandError(f"cannot listen on {address or '*'}:{port}: {e.strerror or e}") from e
    sys.stdout.flush()
    server.run(loop=args.loop)
    return 0
