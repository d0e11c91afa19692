"""securetcp's TLSProxy (the service `securetcp proxy` runs), ``--loop uvloop`` too."""

from __future__ import annotations

from _common import prepare_process, server_context
from _proxy_common import UPSTREAM_SERVER_NAME, parse_args, upstream_context

from securetcp.services.proxy import TLSProxy


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "")
    prepare_process()
    proxy = TLSProxy(
        (args.host, args.upstream_port),
        upstream_ssl=upstream_context(args.cafile) if args.upstream_tls else None,
        upstream_server_hostname=UPSTREAM_SERVER_NAME if args.upstream_tls else None,
        ssl_options=server_context(args.certfile, args.keyfile),
    )
    proxy.listen(args.port, args.host)
    proxy.run(loop=args.loop)


if __name__ == "__main__":
    main()
