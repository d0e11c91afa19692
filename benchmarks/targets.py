"""The servers under test and how to start them."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cbuild
from benchmarks.certs import HOST, TLSFiles

SERVERS_DIR = Path(__file__).resolve().parent / "servers"
BASELINE = "tornado"


@dataclass(frozen=True)
class ServerSpec:
    """One row of the report: a server script and its arguments.

    ``family`` is the name ``--servers`` selects it by; ``pinned`` servers run
    on one server core, the others (the scaling rows) on the whole server CPU
    set, or wherever the kernel puts them (see :mod:`benchmarks.cpus`). A
    ``compiled`` server's script is C source, built on first use by
    :mod:`benchmarks.cbuild` and run directly instead of under Python.
    """

    name: str
    family: str
    script: str
    args: tuple[str, ...] = ()
    pinned: bool = True
    baseline: bool = False
    compiled: bool = False

    def argv(self, port: int, tls: TLSFiles) -> list[str]:
        """The command line that starts this server on ``port``.

        Raises :class:`benchmarks.cbuild.BuildError` (a ``ServerFailed``, so
        the row reports it) if a compiled server cannot be built.
        """
        source = SERVERS_DIR / self.script
        program = [str(cbuild.binary(source))] if self.compiled else [sys.executable, str(source)]
        return [
            *program,
            "--port",
            str(port),
            "--host",
            HOST,
            "--certfile",
            str(tls.certfile),
            "--keyfile",
            str(tls.keyfile),
            *self.args,
        ]


SERVERS = [
    ServerSpec("tornado", "tornado", "tornado_echo.py", baseline=True),
    ServerSpec("asyncio", "asyncio", "asyncio_echo.py"),
    ServerSpec("uvloop", "uvloop", "asyncio_echo.py", ("--loop", "uvloop")),
    ServerSpec("securetcp", "securetcp", "securetcp_echo.py"),
    ServerSpec("securetcp-uvloop", "securetcp-uvloop", "securetcp_echo.py", ("--loop", "uvloop")),
    # The floor: single-threaded C epoll + the same OpenSSL, same TLS settings.
    ServerSpec("c-openssl", "c-openssl", "c_echo.c", compiled=True),
]


def scaling_specs(processes: int) -> list[ServerSpec]:
    """The multi-process handshake rows (``--scaling``): x1 against ``processes`` processes.

    ``fork`` shares one listening socket, hence one kernel accept queue,
    between forked processes; ``reuseport`` gives each process its own
    ``SO_REUSEPORT`` listener (the kernel spreads new connections across them).
    """
    n = str(processes)
    fork = ("--mode", "fork", "--processes", n)
    reuseport = ("--mode", "reuseport", "--processes", n)
    return [
        ServerSpec("tornado x1", "tornado", "tornado_echo.py", pinned=False, baseline=True),
        ServerSpec(f"tornado fork x{n}", "tornado", "tornado_echo.py", fork, pinned=False),
        ServerSpec("securetcp x1", "securetcp", "securetcp_echo.py", pinned=False),
        ServerSpec(f"securetcp fork x{n}", "securetcp", "securetcp_echo.py", fork, pinned=False),
        ServerSpec(
            f"securetcp reuseport x{n}", "securetcp", "securetcp_echo.py", reuseport, pinned=False
        ),
    ]


FAMILIES = [spec.family for spec in SERVERS]


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
