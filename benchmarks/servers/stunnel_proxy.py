"""stunnel as the benchmark proxy (TLS in, plain TCP out; its default thread model).

Writes the configuration next to the certificate, then replaces itself with
stunnel in the foreground (same process, as the harness measures it). TLS 1.3
only, TCP_NODELAY on both sides. TLS to the upstream needs a second stunnel
service, so only the terminating row exists.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from _common import prepare_process
from _proxy_common import parse_args


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "")
    if args.upstream_tls:
        sys.exit("stunnel_proxy: TLS to the upstream is not benchmarked")
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None:
        sys.exit("stunnel is not installed (apt-get install stunnel4)")
    config = Path(args.certfile).parent / f"stunnel-{args.port}.conf"
    config.write_text(
        f"""foreground = yes
pid =
debug = err
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[proxy]
accept = {args.host}:{args.port}
connect = {args.host}:{args.upstream_port}
cert = {args.certfile}
key = {args.keyfile}
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
"""
    )
    prepare_process()
    os.execv(stunnel, [stunnel, str(config)])


if __name__ == "__main__":
    main()
