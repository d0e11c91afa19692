"""A plain TCP upstream for the proxy cases, misbehaving on request.

``python tests/adversarial/upstream.py`` prints ``{"event": "ready", "port": P,
"pid": PID}`` and serves on 127.0.0.1. What a connection gets depends on its
first five bytes (which the client sends through the proxy):

- ``stall``: never reads or writes again (the connection just sits there);
- ``reset``: closes with a TCP reset (SO_LINGER 0) at once;
- ``flood``: writes 64 KiB chunks as fast as the proxy takes them, never reads;
- anything else: echoed back, with everything after it, until the peer closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys

# Bounded, so that nothing runs forever.
FLOOD_LIMIT = 1024 * 2**20
STALL = 120.0


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.readexactly(5)
        if first == b"stall":
            await asyncio.sleep(STALL)  # neither read nor write: the proxy's writes back up
        elif first == b"reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif first == b"flood":
            chunk = b"f" * 65536
            for _ in range(FLOOD_LIMIT // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        else:
            writer.write(first)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "ready", "port": port, "pid": os.getpid()}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    sys.exit(0)
