"""The server under attack: a securetcp TLS server in its own process.

Run as ``python tests/adversarial/serve.py --cert C --key K [options]``. It
prints one JSON object per line on stdout:

- ``{"event": "ready", "port": P, "pid": PID, "task_id": T}`` once listening
  (one per worker with ``--processes``);
- ``{"event": "stats", "pid": PID, ...ServerStats fields}`` on SIGUSR1, and a
  last one with ``"event": "exit"`` when `run()` returns after SIGTERM.

Its own process, so that the tests can count its descriptors, RSS and CPU
time in /proc, lower its RLIMIT_NOFILE, kill it, or signal it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import resource
import signal
import sys
from typing import Any

from securetcp import TCPServer, TLSConfig, bind_sockets, fork_processes
from securetcp.iostream import IOStream, StreamClosedError
from securetcp.process import task_id
from securetcp.services.echo import EchoServer
from securetcp.services.proxy import TLSProxy

CHUNK = b"x" * 65536


class Announcing(TCPServer):
    """Says "ready" once `run()`'s loop serves, and prints stats on SIGUSR1."""

    port = 0

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: emit("stats", **stats_fields(self)))
        emit("ready", port=self.port, task_id=task_id())
        await super().serve_forever()


class Echo(Announcing, EchoServer):
    """The echo service securetcp ships."""


class Proxy(Announcing, TLSProxy):
    """securetcp's TLS proxy (TLS termination in front of a plain upstream)."""


class FirehoseServer(Announcing):
    """Echoes, except to a client whose first bytes are b"drink": to it, it
    writes as fast as the stream lets it and never reads again.

    With ``await_writes`` it waits for each write (backpressure); without, it
    queues writes and only yields to the loop, as a careless handler would:
    the stream's write limit is then what bounds its memory.
    """

    def __init__(self, *args: Any, await_writes: bool, limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.await_writes = await_writes
        self.limit = limit

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            first = await stream.read_bytes(5)
            if first == b"drink":
                await self.firehose(stream)
            else:
                await stream.write(first)
                while True:
                    await stream.write(await stream.read_bytes(65536, partial=True))
        except StreamClosedError:
            pass
        finally:
            stream.close()

    async def firehose(self, stream: IOStream) -> None:
        written = 0
        future: asyncio.Future[None] | None = None
        while written < self.limit and not stream.closed():
            # A fresh buffer each time, as real data would be.
            future = stream.write(bytearray(CHUNK))
            written += len(CHUNK)
            if self.await_writes:
                await future
            else:
                future.add_done_callback(_ignore)
                await asyncio.sleep(0)
        if future is not None:
            await future


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, in a single write (workers share the file)."""
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    os.write(sys.stdout.fileno(), line.encode())


COUNT_OBJECTS = False  # --count-objects: stats carry the live Python object count


def stats_fields(server: TCPServer) -> dict[str, Any]:
    fields = dataclasses.asdict(server.stats)
    if COUNT_OBJECTS:
        gc.collect()
        fields["python_objects"] = len(gc.get_objects())
    return fields


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", help="ask for client certificates (optional)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--handshake-timeout", type=float, default=2.0)
    parser.add_argument("--idle-timeout", type=float)
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--max-buffer-size", type=int)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--nofile-headroom",
        type=int,
        help="lower RLIMIT_NOFILE to this many descriptors above the highest open one",
    )
    parser.add_argument("--handler", choices=("echo", "firehose", "firehose-noawait"))
    parser.add_argument("--firehose-limit", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--count-objects", action="store_true", help="for scripts/soak")
    parser.add_argument("--upstream", help="HOST:PORT: run securetcp's TLSProxy to it")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    global COUNT_OBJECTS
    COUNT_OBJECTS = args.count_objects

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    tls = TLSConfig(
        args.cert,
        args.key,
        client_auth="optional" if args.client_ca else "none",
        client_ca=args.client_ca,
    )
    keywords: dict[str, Any] = {
        "handshake_timeout": args.handshake_timeout,
        "idle_timeout": args.idle_timeout,
        "max_connections": args.max_connections,
        "max_buffer_size": args.max_buffer_size,
    }
    server: Announcing
    if args.upstream:
        server = Proxy(
            args.upstream, ssl_options=tls, connect_timeout=args.connect_timeout, **keywords
        )
    elif args.handler in ("firehose", "firehose-noawait"):
        server = FirehoseServer(
            tls,
            await_writes=args.handler == "firehose",
            limit=args.firehose_limit,
            **keywords,
        )
    else:
        server = Echo(tls, **keywords)

    sockets = bind_sockets(args.port, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    if args.processes != 1:
        fork_processes(args.processes, max_restarts=10)
    server.add_sockets(sockets)

    if args.nofile_headroom is not None:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + args.nofile_headroom, hard))

    server.port = port
    server.run(loop=args.loop)
    emit("exit", **stats_fields(server))


if __name__ == "__main__":
    main()
