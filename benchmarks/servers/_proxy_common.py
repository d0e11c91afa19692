"""Command line shared by the benchmark proxies (not a benchmark itself).

Every proxy is started as ``python benchmarks/servers/<name>.py --port P
--host H --certfile C --keyfile K --upstream-port U [--upstream-tls --cafile
CA] [--loop uvloop]``: it accepts TLS 1.3 clients with the settings of
:func:`_common.server_context` and pipes each connection to the upstream echo
on ``H:U``, over plain TCP or (``--upstream-tls``) over TLS 1.3 verified
against ``CA`` with SNI ``localhost``.
"""

from __future__ import annotations

import argparse
import ssl

UPSTREAM_SERVER_NAME = "localhost"


def parse_args(description: str) -> argparse.Namespace:
    """Parse the command line common to all benchmark proxies."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-tls", action="store_true")
    parser.add_argument("--cafile", help="CA of the upstream's certificate (with --upstream-tls)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.upstream_tls and not args.cafile:
        parser.error("--upstream-tls needs --cafile")
    return args


def upstream_context(cafile: str) -> ssl.SSLContext:
    """Client context to the upstream: TLS 1.3 only, verifying it against ``cafile``."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx
