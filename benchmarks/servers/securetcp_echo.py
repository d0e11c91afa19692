"""TLS echo server on securetcp's TCPServer (``--loop uvloop`` for uvloop).

Modes (see DESIGN.md, tcpserver and process):
- single: ``listen(port, host)`` + ``run()``;
- fork: ``bind_sockets`` + ``fork_processes(n)`` + ``add_sockets`` + ``run()``;
- reuseport: ``fork_processes(n)``, then each process ``listen(..., reuse_port=True)``.
"""

from __future__ import annotations

from typing import Any

from _common import parse_args, prepare_process, server_context

try:
    from securetcp import StreamClosedError, TCPServer, bind_sockets, fork_processes
except ImportError:  # the package may not re-export everything yet
    from securetcp.iostream import StreamClosedError
    from securetcp.netutil import bind_sockets
    from securetcp.process import fork_processes
    from securetcp.tcpserver import TCPServer


class Echo(TCPServer):
    """Echo every byte back."""

    async def handle_stream(self, stream: Any, address: Any) -> None:
        """Echo until the peer closes."""
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                await stream.write(data)
        except StreamClosedError:
            pass


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
