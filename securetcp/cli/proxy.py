"""`securetcp proxy`: a TLS proxy in front of (or behind) another service."""

from __future__ import annotations

import argparse
import socket
import ssl
from typing import Any

from securetcp.cli._common import CommandError
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
  # TLS in front of a plain service on 127.0.0.1:8080 (certificates from `certs init`):
  securetcp certs init
  securetcp proxy --listen 8443 --upstream 127.0.0.1:8080
  openssl s_client -connect 127.0.0.1:8443 -CAfile certs/ca.pem -quiet

  # Plain clients in, TLS out (re-origination), verified against certifi's CAs:
  securetcp proxy --plain --listen 8080 --upstream example.org:443 --upstream-tls

  # TLS in, TLS out to an internal service with mutual TLS, clients allowed by SPIFFE ID:
  securetcp proxy --listen 9443 --client-auth required --client-ca certs/ca.pem \\
      --allow-uri spiffe://example.org/billing \\
      --upstream 10.0.0.5:9443 --upstream-ca certs/ca.pem \\
      --upstream-cert certs/client.pem --upstream-key certs/client.key

  # Tell the upstream the client's address with a PROXY protocol v2 header:
  securetcp proxy --listen 8443 --upstream 127.0.0.1:8080 --send-proxy v2

  # Behind HAProxy (send-proxy-v2): read the client's address from its PROXY header:
  securetcp proxy --listen 8443 --upstream 127.0.0.1:8080 \\
      --proxy-protocol --trusted-proxy 10.0.0.0/8

  # A unix socket upstream; one worker process per CPU:
  securetcp proxy --listen 8443 --upstream /run/app.sock --processes 0
"""


def parse_listen(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` as (host, port); the host defaults to 127.0.0.1 ("" for all)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "*":
        host = ""
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected [HOST:]PORT with a port in 0..65535 (e.g. 8443 or 0.0.0.0:8443), "
            f"got {value!r}"
        )
    return host, int(port_text)


def _send_proxy(value: str) -> int:
    versions = {"v1": 1, "1": 1, "v2": 2, "2": 2}
    if value not in versions:
        raise argparse.ArgumentTypeError(f"expected v1 or v2, got {value!r}")
    return versions[value]


def _upstream_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client-side TLS context for the upstream, or None for plain TCP."""
    tls = args.upstream_tls or any(
        (args.upstream_ca, args.upstream_cert, args.upstream_key, args.upstream_server_name)
    )
    if not tls:
        return None
    if args.upstream_key and not args.upstream_cert:
        raise CommandError("--upstream-key needs --upstream-cert")
    from securetcp.client import client_context

    return client_context(args.upstream_ca, certfile=args.upstream_cert, keyfile=args.upstream_key)


def _announcer(args: argparse.Namespace, server: Any) -> Any:
    def announce(sockets: list[socket.socket]) -> None:
        kind = "plain TCP" if args.plain else "TLS"
        upstream_kind = "TLS" if server.upstream_ssl is not None else "plain TCP"
        print(
            f"proxy: {kind} on {', '.join(describe_sockets(sockets))} -> {upstream_kind} "
            f"to {args.upstream} (Ctrl-C to stop)"
        )
        tcp = [s for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
        # (Not behind a PROXY protocol peer, nor on certificates from elsewhere.)
        if tcp and not (args.plain or args.proxy_protocol or args.cert):
            host, port = tcp[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(
                f"  try: openssl s_client -connect {host}:{port} -CAfile {args.certs}/ca.pem -quiet"
            )

    return announce


def _run(args: argparse.Namespace) -> int:
    from securetcp.services.proxy import TLSProxy

    if args.listen is None and not (args.unix or args.systemd):
        raise CommandError(
            "say where to accept clients: --listen [HOST:]PORT (or --unix, --systemd)"
        )
    host, port = args.listen or ("127.0.0.1", 0)
    if args.plain:
        if args.client_auth != "none":
            raise CommandError("--client-auth needs TLS from clients; drop --plain")
        ssl_options = None
    else:
        ssl_options = tls_config_from_args(args)
    try:
        server = TLSProxy(
            args.upstream,
            upstream_ssl=_upstream_context(args),
            upstream_server_hostname=args.upstream_server_name,
            connect_timeout=args.connect_timeout,
            send_proxy=args.send_proxy,
            ssl_options=ssl_options,
            **server_keywords_from_args(args),
        )
    except ValueError as e:  # SSLOptionsError is one too
        raise CommandError(str(e)) from e
    return serve(server, args, port, host, _announcer(args, server))


def register(commands: Any) -> None:
    """Add `proxy` to the command line."""
    parser = commands.add_parser(
        "proxy",
        help="run a TLS proxy (terminate, re-originate, or both)",
        description=(
            "Accept TLS (or, with --plain, plain TCP) clients and pipe each connection\n"
            "to the upstream, over plain TCP or, with --upstream-tls, over verified TLS.\n"
            "An upstream that refuses, times out or fails its TLS handshake closes the\n"
            "client at once (logged, and counted as an 'upstream' failure)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("proxy")
    group.add_argument(
        "--listen",
        type=parse_listen,
        metavar="[HOST:]PORT",
        help="where to accept clients (host default 127.0.0.1; '*' or '' for all; port 0: any)",
    )
    group.add_argument(
        "--upstream",
        required=True,
        metavar="HOST:PORT|PATH",
        help="where to send the bytes: HOST:PORT, [IPv6]:PORT, or a unix socket path",
    )
    group.add_argument(
        "--plain", action="store_true", help="accept plain TCP clients (no TLS on the front)"
    )
    group.add_argument(
        "--send-proxy",
        type=_send_proxy,
        metavar="v1|v2",
        help="start each upstream connection with a PROXY protocol header (the client's address)",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="bound on connecting to the upstream, TLS handshake included (default: 10)",
    )
    upstream = parser.add_argument_group("upstream TLS")
    upstream.add_argument(
        "--upstream-tls",
        action="store_true",
        help="TLS to the upstream, verified (certifi's CAs unless --upstream-ca)",
    )
    upstream.add_argument(
        "--upstream-ca", metavar="FILE", help="CA file or directory for the upstream (implies TLS)"
    )
    upstream.add_argument(
        "--upstream-cert",
        metavar="FILE",
        help="client certificate for upstream mutual TLS (implies TLS)",
    )
    upstream.add_argument(
        "--upstream-key", metavar="FILE", help="its key (default: in --upstream-cert)"
    )
    upstream.add_argument(
        "--upstream-server-name",
        metavar="NAME",
        help="SNI and certificate name of the upstream (default: its host; implies TLS)",
    )
    add_tls_options(parser, client_auth_default="none")
    add_server_options(parser)
    parser.set_defaults(func=_run)
