"""The `securetcp` command.

securetcp certs init [--dir certs] [--force]
securetcp certs show FILE
securetcp echo [--port 8443] [--address 127.0.0.1] [--certs certs] [--loop uvloop] ...
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from securetcp.certs import (
    CertificateFileError,
    load_pem_certificates,
    peer_identity_from_certificate,
    write_dev_certs,
)
from securetcp.tls import SSLOptionsError

__all__ = ["main"]


def _certs_init(args: argparse.Namespace) -> int:
    paths = write_dev_certs(args.dir, overwrite=args.force)
    print(f"development certificates in {paths.ca.parent}/ (CA: {paths.ca})")
    return 0


def _certs_show(args: argparse.Namespace) -> int:
    for cert in load_pem_certificates(args.file):
        identity = peer_identity_from_certificate(cert)
        print(f"subject:     {cert.subject.rfc4514_string()}")
        print(f"issuer:      {cert.issuer.rfc4514_string()}")
        valid = f"{identity.not_before:%Y-%m-%d %H:%M} .. {identity.not_after:%Y-%m-%d %H:%M}"
        print(f"valid:       {valid} UTC")
        names = [
            *identity.dns_names,
            *map(str, identity.ip_addresses),
            *identity.uris,
            *identity.emails,
        ]
        print(f"names:       {', '.join(names) or '-'}")
        print(f"serial:      {identity.serial:x}")
        print(f"sha256:      {identity.fingerprint_sha256}")
        print()
    return 0


def _echo(args: argparse.Namespace) -> int:
    from securetcp.services.echo import EchoServer
    from securetcp.tls import TLSConfig

    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print(
            "securetcp: --loop uvloop needs uvloop: pip install 'securetcp[uvloop]'",
            file=sys.stderr,
        )
        return 2
    certs = Path(args.certs)
    certfile = args.certfile or str(certs / "server.pem")
    keyfile = args.keyfile or str(certs / "server.key")
    client_ca = args.client_ca or (str(certs / "ca.pem") if args.client_auth != "none" else None)
    config = TLSConfig(
        certfile,
        keyfile,
        client_auth=args.client_auth,
        client_ca=client_ca,
        profile=args.profile,
    )
    server = EchoServer(ssl_options=config, handshake_timeout=args.handshake_timeout)
    server.listen(args.port, args.address)
    port = server.sockets[0].getsockname()[1]
    host = args.address or "127.0.0.1"
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
    server.run(loop=args.loop)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="securetcp", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    certs = commands.add_parser("certs", help="development certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_commands.add_parser("init", help="write a dev CA, server and client certificate")
    init.add_argument("--dir", default="certs", help="directory to write to (default: certs)")
    init.add_argument("--force", action="store_true", help="replace existing certificates")
    init.set_defaults(func=_certs_init)
    show = certs_commands.add_parser("show", help="print what a PEM certificate file holds")
    show.add_argument("file")
    show.set_defaults(func=_certs_show)

    echo = commands.add_parser("echo", help="run a TLS echo server")
    echo.add_argument("--port", type=int, default=8443, help="port (default 8443; 0: any)")
    echo.add_argument("--address", default="127.0.0.1", help="address (default 127.0.0.1)")
    echo.add_argument("--certs", default="certs", help="directory from `certs init`")
    echo.add_argument("--certfile", help="server certificate (default: CERTS/server.pem)")
    echo.add_argument("--keyfile", help="server key (default: CERTS/server.key)")
    echo.add_argument(
        "--client-auth",
        choices=("none", "optional", "required"),
        default="optional",
        help="ask clients for a certificate (default: optional)",
    )
    echo.add_argument("--client-ca", help="CA for client certificates (default: CERTS/ca.pem)")
    echo.add_argument("--profile", choices=("intermediate", "modern"), default="intermediate")
    echo.add_argument("--handshake-timeout", type=float, default=10.0)
    echo.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default: asyncio; uvloop needs securetcp[uvloop])",
    )
    echo.set_defaults(func=_echo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `securetcp` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except (SSLOptionsError, CertificateFileError, FileExistsError) as e:
        print(f"securetcp: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
