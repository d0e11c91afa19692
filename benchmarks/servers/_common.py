"""Helpers shared by the benchmark echo servers (not a benchmark itself).

Every server script is started by the harness as
``python benchmarks/servers/<name>.py --port P --certfile C --keyfile K [...]``
and must use exactly the TLS settings of :func:`server_context`, so that the
servers differ only in their I/O machinery.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import resource
import signal
import ssl
import sys

_PR_SET_PDEATHSIG = 1


def parse_args(description: str, *, multiprocess: bool = False) -> argparse.Namespace:
    """Parse the command line common to all echo servers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    if multiprocess:
        parser.add_argument("--processes", type=int, default=1)
        parser.add_argument(
            "--mode",
            choices=("single", "fork", "reuseport"),
            default="single",
            help="fork: bind_sockets + fork_processes + add_sockets; "
            "reuseport: fork_processes, then one SO_REUSEPORT listener per process",
        )
    return parser.parse_args()


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server SSLContext used by every server: TLS 1.3 only, one certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def prepare_process() -> None:
    """Raise the descriptor limit and make this process die with its parent.

    Called at start-up and again in each forked child, so that no server
    process outlives the harness even if the harness is killed with SIGKILL.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def install_loop(loop: str) -> None:
    """Make ``asyncio.run`` (and anything built on it) use the chosen loop."""
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def wait_forever() -> None:
    """Block until cancelled (the harness ends servers with SIGTERM)."""
    await asyncio.Event().wait()
