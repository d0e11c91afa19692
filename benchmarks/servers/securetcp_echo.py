"""TLS echo server on securetcp's TCPServer (``--loop uvloop`` for uvloop).

Modes (see DESIGN.md, tcpserver and process):
- single: ``listen(port, host)`` + ``run()``;
- fork: ``bind_sockets`` + ``fork_processes(n)`` + ``add_sockets`` + ``run()``;
- reuseport: ``fork_processes(n)``, then each process ``listen(..., reuse_port=True)``.
"""

from __future__ import annotations

from _common import parse_args, prepare_process, server_context

from securetcp import bind_sockets, fork_processes
from securetcp.services.echo import EchoServer as Echo  # the echo service securetcp ships


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "", multiprocess=True)
    prepare_process()
    ctx = server_context(args.certfile, args.keyfile)
    if args.mode == "fork":
        sockets = bind_sockets(args.port, args.host)
        fork_processes(args.processes)
        prepare_process()
        server = Echo(ssl_options=ctx)
        server.add_sockets(sockets)
    elif args.mode == "reuseport":
        fork_processes(args.processes)
        prepare_process()
        server = Echo(ssl_options=ctx)
        server.listen(args.port, args.host, reuse_port=True)
    else:
        server = Echo(ssl_options=ctx)
        server.listen(args.port, args.host)
    server.run(loop=args.loop)


if __name__ == "__main__":
    main()
