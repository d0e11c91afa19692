"""A hand-written TLS proxy on asyncio streams (``--loop uvloop`` for uvloop).

What one would write without a library: ``start_server`` with TLS, one
``open_connection`` to the upstream per client, and two pump tasks doing
``read(65536)`` + ``write`` + ``drain`` (backpressure through drain).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ssl

from _common import install_loop, prepare_process, server_context, wait_forever
from _proxy_common import UPSTREAM_SERVER_NAME, parse_args, upstream_context


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then close the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def handle(
    host: str,
    port: int,
    ctx: ssl.SSLContext | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Connect to the upstream and pump both ways."""
    try:
        up_reader, up_writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=UPSTREAM_SERVER_NAME if ctx else None
        )
    except (OSError, ssl.SSLError):
        writer.close()
        return
    with contextlib.suppress(Exception):
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def serve(args: argparse.Namespace) -> None:
    """Listen and serve until cancelled."""
    ctx = upstream_context(args.cafile) if args.upstream_tls else None
    handler = functools.partial(handle, args.host, args.upstream_port, ctx)
    server = await asyncio.start_server(
        handler, args.host, args.port, ssl=server_context(args.certfile, args.keyfile), limit=65536
    )
    async with server:
        await wait_forever()


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "")
    prepare_process()
    install_loop(args.loop)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
