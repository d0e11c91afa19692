"""HAProxy as the benchmark proxy: ``mode tcp``, TLS with ``ssl crt``, ``nbthread 1``.

Writes the configuration (and the certificate+key PEM HAProxy wants) next to
the certificate, then replaces itself with ``haproxy -db`` (same process: the
harness measures HAProxy's own CPU and memory). TLS 1.3 only, both sides, as
the other proxies; the upstream is verified against ``--cafile`` with SNI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from _common import prepare_process
from _proxy_common import UPSTREAM_SERVER_NAME, parse_args


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "")
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        sys.exit("haproxy is not installed (apt-get install haproxy)")
    directory = Path(args.certfile).parent
    pem = directory / f"haproxy-{args.port}.pem"
    pem.write_bytes(Path(args.certfile).read_bytes() + Path(args.keyfile).read_bytes())
    pem.chmod(0o600)
    upstream = f"{args.host}:{args.upstream_port}"
    if args.upstream_tls:
        upstream += (
            f" ssl verify required ca-file {args.cafile} sni str({UPSTREAM_SERVER_NAME})"
            " ssl-min-ver TLSv1.3"
        )
    config = directory / f"haproxy-{args.port}.cfg"
    config.write_text(
        f"""global
    nbthread 1
    maxconn 8000

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend front
    bind {args.host}:{args.port} ssl crt {pem} ssl-min-ver TLSv1.3
    default_backend back

backend back
    server upstream {upstream}
"""
    )
    prepare_process()  # the parent-death signal survives exec
    os.execv(haproxy, [haproxy, "-db", "-f", str(config)])


if __name__ == "__main__":
    main()
