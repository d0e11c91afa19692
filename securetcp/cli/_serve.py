"""Options and start-up shared by the serving commands (`echo`, `proxy`).

`add_tls_options` and `add_server_options` put the same flags on every
serving command; `tls_config_from_args` and `server_keywords_from_args` turn
them into a `TLSConfig` and `TCPServer` keywords; `serve` binds as the
options say (TCP, a unix socket or systemd's sockets), forks if asked,
starts the metrics endpoint and runs the server until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import ipaddress
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from securetcp.certs import PeerIdentity
from securetcp.cli._common import CommandError
from securetcp.netutil import bind_sockets, bind_unix_socket
from securetcp.process import fork_processes
from securetcp.tcpserver import TCPServer
from securetcp.tls import TLSConfig

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "add_server_options",
    "add_tls_options",
    "allow_list_authorizer",
    "serve",
    "server_keywords_from_args",
    "tls_config_from_args",
]

#: Seconds a connection may stay silent before it is closed: long enough for
#: interactive use, short enough that idle clients cannot hold every slot.
DEFAULT_IDLE_TIMEOUT = 300.0


def add_tls_options(parser: argparse.ArgumentParser, *, client_auth_default: str = "none") -> None:
    """The server-side TLS flags: certificate, key, client certificates, profile, SNI."""
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--certs", default="certs", help="directory from `certs init` (default: certs)"
    )
    group.add_argument(
        "--cert",
        "--certfile",
        dest="cert",
        metavar="FILE",
        help="server certificate chain (default: CERTS/server.pem)",
    )
    group.add_argument(
        "--key",
        "--keyfile",
        dest="key",
        metavar="FILE",
        help="server key (default: CERTS/server.key)",
    )
    group.add_argument(
        "--client-auth",
        choices=("none", "optional", "required"),
        default=client_auth_default,
        help=f"ask clients for a certificate (default: {client_auth_default})",
    )
    group.add_argument(
        "--client-ca",
        metavar="FILE",
        help="CA file or directory for client certificates (default: CERTS/ca.pem)",
    )
    group.add_argument(
        "--profile",
        choices=("intermediate", "modern"),
        default="intermediate",
        help="Mozilla profile: intermediate (TLS 1.2+) or modern (TLS 1.3 only)",
    )
    group.add_argument("--alpn", metavar="P,...", help="ALPN protocols to accept, e.g. h2,http/1.1")
    group.add_argument(
        "--sni",
        action="append",
        default=[],
        metavar="NAME=CERT[,KEY]",
        help="another certificate for clients asking for NAME (or *.domain); repeatable",
    )
    group.add_argument(
        "--reload-interval",
        type=float,
        metavar="SECONDS",
        help="reload certificates when their files change, checked this often (SIGHUP reloads too)",
    )
    for kind, what in (("cn", "common name"), ("uri", "URI SAN (SPIFFE ID)"), ("dns", "DNS SAN")):
        group.add_argument(
            f"--allow-{kind}",
            action="append",
            default=[],
            metavar="VALUE",
            help=f"only accept clients whose certificate has this {what}; repeatable "
            "(needs --client-auth required or optional)",
        )


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Where to listen and the server's limits, processes and metrics."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop clients that have not completed the TLS handshake by then (default: 10)",
    )
    group.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"close connections silent this long (default: {DEFAULT_IDLE_TIMEOUT:g}; 0: never)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="at most N connections at once; more wait in the backlog (default: no limit)",
    )
    group.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection starts with a PROXY protocol v1/v2 header (HAProxy, ELB)",
    )
    group.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="NET",
        help="network the PROXY headers may come from (default: loopback); repeatable",
    )
    group.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="fork N worker processes sharing the sockets (0: one per CPU; default: 1)",
    )
    group.add_argument(
        "--reuse-port", action="store_true", help="set SO_REUSEPORT on the listening sockets"
    )
    group.add_argument(
        "--unix", metavar="PATH", help="listen on a unix socket instead of TCP (mode 0600)"
    )
    group.add_argument(
        "--systemd",
        action="store_true",
        help="serve the sockets systemd passes (socket activation) instead of binding",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this port (+ task id per worker); "
        "needs securetcp[metrics]",
    )
    group.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address of the metrics endpoint (default: 127.0.0.1)",
    )
    group.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default: asyncio; uvloop needs securetcp[uvloop])",
    )


def _parse_sni(entries: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for entry in entries:
        name, sep, files = entry.partition("=")
        cert, _, key = files.partition(",")
        if not sep or not name or not cert:
            raise CommandError(f"--sni {entry!r}: expected NAME=CERT[,KEY]")
        table[name] = (cert, key or None)
    return table


def allow_list_authorizer(
    cns: Sequence[str], uris: Sequence[str], dns_names: Sequence[str]
) -> Callable[[PeerIdentity], bool]:
    """``authorize(identity)``: True if any allow list names the peer.

    Common names and URIs compare exactly; DNS names without regard to case.
    """
    allowed_cn, allowed_uri = frozenset(cns), frozenset(uris)
    allowed_dns = frozenset(name.lower().rstrip(".") for name in dns_names)

    def authorize(identity: PeerIdentity) -> bool:
        return (
            identity.common_name in allowed_cn
            or any(uri in allowed_uri for uri in identity.uris)
            or any(name.lower().rstrip(".") in allowed_dns for name in identity.dns_names)
        )

    return authorize


def _positive(value: float | None, option: str) -> None:
    if value is not None and value <= 0:
        raise CommandError(f"{option}: expected a positive number, got {value:g}")


def tls_config_from_args(args: argparse.Namespace) -> TLSConfig:
    """The `TLSConfig` the TLS options describe (SSLOptionsError when they are wrong)."""
    certs = Path(args.certs)
    certfile = args.cert or str(certs / "server.pem")
    keyfile = args.key or str(certs / "server.key")
    client_ca = args.client_ca or (str(certs / "ca.pem") if args.client_auth != "none" else None)
    allow_cn = getattr(args, "allow_cn", [])
    allow_uri = getattr(args, "allow_uri", [])
    allow_dns = getattr(args, "allow_dns", [])
    authorize = None
    if allow_cn or allow_uri or allow_dns:
        if args.client_auth == "none":
            raise CommandError(
                "--allow-cn/--allow-uri/--allow-dns vet client certificates: "
                "add --client-auth required"
            )
        authorize = allow_list_authorizer(allow_cn, allow_uri, allow_dns)
    reload_interval = getattr(args, "reload_interval", None)
    _positive(reload_interval, "--reload-interval")
    alpn = getattr(args, "alpn", None)
    return TLSConfig(
        certfile,
        keyfile,
        client_auth=args.client_auth,
        client_ca=client_ca,
        profile=args.profile,
        alpn_protocols=[p.strip() for p in (alpn or "").split(",") if p.strip()],
        sni=_parse_sni(getattr(args, "sni", [])) or None,
        authorize=authorize,
        reload_interval=reload_interval,
    )


def _supports(keyword: str) -> bool:
    return keyword in inspect.signature(TCPServer.__init__).parameters


def server_keywords_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`TCPServer` keywords from the server options."""
    _positive(args.handshake_timeout, "--handshake-timeout")
    idle = getattr(args, "idle_timeout", None)
    if idle is not None and idle < 0:
        raise CommandError(f"--idle-timeout: expected seconds (0: never), got {idle:g}")
    keywords: dict[str, Any] = {
        "handshake_timeout": args.handshake_timeout,
        "idle_timeout": idle or None,
    }
    max_connections = getattr(args, "max_connections", None)
    if max_connections is not None:
        if max_connections < 1:
            raise CommandError(f"--max-connections: expected at least 1, got {max_connections}")
        keywords["max_connections"] = max_connections
    trusted = getattr(args, "trusted_proxy", [])
    if getattr(args, "proxy_protocol", False) or trusted:
        if not getattr(args, "proxy_protocol", False):
            raise CommandError("--trusted-proxy only applies with --proxy-protocol")
        if not _supports("proxy_protocol"):
            raise CommandError("--proxy-protocol: this securetcp's TCPServer does not support it")
        networks = []
        for net in trusted:
            try:
                networks.append(ipaddress.ip_network(net, strict=False))
            except ValueError:
                raise CommandError(f"--trusted-proxy {net!r}: not an IP network") from None
        keywords["proxy_protocol"] = True
        if networks:
            keywords["trusted_proxies"] = networks
    return keywords


def _listening_sockets(
    args: argparse.Namespace, port: int, address: str | None
) -> list[socket.socket]:
    if getattr(args, "systemd", False):
        from securetcp import netutil

        from_systemd = getattr(netutil, "sockets_from_systemd", None)
        if from_systemd is None:
            raise CommandError("--systemd: this securetcp has no sockets_from_systemd()")
        sockets: list[socket.socket] = from_systemd()
        if not sockets:
            raise CommandError(
                "--systemd: no sockets from systemd (LISTEN_FDS/LISTEN_PID not set for "
                "this process; start it from a .socket unit)"
            )
        return sockets
    unix = getattr(args, "unix", None)
    if unix is not None:
        try:
            return [bind_unix_socket(unix)]
        except (OSError, ValueError) as e:
            raise CommandError(f"--unix {unix}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return bind_sockets(port, address, reuse_port=getattr(args, "reuse_port", False))
    except ValueError as e:
        raise CommandError(f"--reuse-port: {e}") from None
    except OSError as e:
        raise CommandError(f"cannot listen on {address or '*'}:{port}: {e.strerror or e}") from e


def describe_sockets(sockets: Sequence[socket.socket]) -> list[str]:
    """``host:port`` (or the unix path) of each listening socket."""
    names = []
    for sock in sockets:
        name = sock.getsockname()
        if isinstance(name, tuple):
            host = name[0]
            names.append(f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}")
        else:
            names.append(f"unix:{name}")
    return names


def serve(
    server: TCPServer,
    args: argparse.Namespace,
    port: int,
    address: str | None,
    announce: Callable[[list[socket.socket]], None] | None = None,
) -> int:
    """Listen as the options say and run `server` until SIGINT/SIGTERM; exit status 0.

    `announce(sockets)` (say, printing how to connect) runs once, after
    binding and before forking. With ``--processes`` every worker runs the
    server (and its own metrics endpoint, on ``--metrics-port`` + task id).
    """
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise CommandError("--loop uvloop needs uvloop: pip install 'securetcp[uvloop]'")
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None:
        from securetcp.metrics import MetricsUnavailable, require_prometheus_client

        try:
            require_prometheus_client()
        except MetricsUnavailable as e:
            raise CommandError(f"--metrics-port: {e}") from None
    processes = getattr(args, "processes", 1)
    if processes < 0:
        raise CommandError(f"--processes: expected 0 (one per CPU) or more, got {processes}")
    sockets = _listening_sockets(args, port, address)
    if announce is not None:
        announce(sockets)
    sys.stdout.flush()
    if processes != 1:
        fork_processes(processes)
    stop_metrics = None
    if metrics_port is not None:
        from securetcp.metrics import serve_metrics

        try:
            stop_metrics = serve_metrics(server, metrics_port, args.metrics_address)
        except OSError as e:
            raise CommandError(
                f"--metrics-port {metrics_port}: cannot listen: {e.strerror or e}"
            ) from None
        host = args.metrics_address
        host = f"[{host}]" if ":" in host else host
        print(f"metrics on http://{host}:{stop_metrics.port}/metrics", flush=True)
    server.add_sockets(sockets)
    try:
        server.run(loop=args.loop)
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return 0
