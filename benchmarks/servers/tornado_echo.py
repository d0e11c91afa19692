"""TLS echo server on tornado's TCPServer (TCP_NODELAY on accepted streams).

``--mode fork --processes N`` uses tornado's own bind_sockets + fork_processes
+ add_sockets, as the multi-process peer of the scaling comparison.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from _common import install_loop, parse_args, prepare_process, server_context, wait_forever
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.process import fork_processes
from tornado.tcpserver import TCPServer


class Echo(TCPServer):
    """Echo every byte back."""

    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        """Echo until the peer closes."""
        stream.set_nodelay(True)
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                await stream.write(data)
        except StreamClosedError:
            pass


async def serve(
    ctx: ssl.SSLContext, host: str, port: int, sockets: list[socket.socket] | None
) -> None:
    """Start accepting (on ``sockets`` if given) and serve until cancelled."""
    server = Echo(ssl_options=ctx)
    if sockets is None:
        server.listen(port, host)
    else:
        server.add_sockets(sockets)
    await wait_forever()


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "", multiprocess=True)
    prepare_process()
    install_loop(args.loop)
    sockets = None
    if args.mode == "fork":
        sockets = bind_sockets(args.port, args.host)
        fork_processes(args.processes)
        prepare_process()
    elif args.mode == "reuseport":
        raise SystemExit("tornado_echo.py: --mode reuseport is not implemented")
    ctx = server_context(args.certfile, args.keyfile)
    asyncio.run(serve(ctx, args.host, args.port, sockets))


if __name__ == "__main__":
    main()
