"""TLS echo server on asyncio streams (``--loop uvloop`` for the uvloop peer)."""

from __future__ import annotations

import asyncio
import ssl

from _common import install_loop, parse_args, prepare_process, server_context, wait_forever


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until the peer closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, ctx: ssl.SSLContext) -> None:
    """Listen and serve until cancelled."""
    server = await asyncio.start_server(handle, host, port, ssl=ctx, limit=65536)
    async with server:
        await wait_forever()


def main() -> None:
    """Entry point."""
    args = parse_args(__doc__ or "")
    prepare_process()
    install_loop(args.loop)
    asyncio.run(serve(args.host, args.port, server_context(args.certfile, args.keyfile)))


if __name__ == "__main__":
    main()
