"""Types shared by the workloads."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import ServerProcess


@dataclass(frozen=True)
class Params:
    """Knobs of one benchmark run (see ``run.py`` for the defaults)."""

    duration: float
    warmup: float
    handshake_clients: int
    bulk_connections: int
    small_connections: int
    idle_connections: int
    client_cpus: tuple[int, ...] | None  # None: the load generator is not pinned


@dataclass
class Target:
    """What a workload runs against: a ready server and how to reach it."""

    server: ServerProcess
    port: int
    cafile: Path
    ctx: ssl.SSLContext  # load-generator client context (see certs.load_context)


@dataclass
class Measurement:
    """One measured window.

    ``value`` is the headline figure (unit from the workload); ``per_cpu`` the
    same work divided by server CPU seconds (None when it makes no sense);
    ``server_cpu`` and ``client_cpu`` are the CPU used in the window divided
    by its wall time (1.0 = one core busy).
    """

    value: float
    per_cpu: float | None
    wall: float
    server_cpu: float
    client_cpu: float
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Window:
    """Brackets a measured window: wall time and server CPU time."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.own0 = self.own1 = 0.0

    def start(self) -> None:
        """Mark the start of the window."""
        self.cpu0 = self.server.cpu_seconds()
        self.own0 = time.process_time()
        self.t0 = time.monotonic()

    def stop(self) -> None:
        """Mark the end of the window."""
        self.t1 = time.monotonic()
        self.own1 = time.process_time()
        self.cpu1 = self.server.cpu_seconds()

    @property
    def wall(self) -> float:
        """Seconds between start and stop."""
        return self.t1 - self.t0

    @property
    def server_cpu_seconds(self) -> float:
        """Server CPU seconds used in the window."""
        return self.cpu1 - self.cpu0

    @property
    def own_cpu_seconds(self) -> float:
        """CPU seconds this (load generator) process used in the window."""
        return self.own1 - self.own0

    def measurement(
        self, work: float, *, client_cpu_seconds: float | None = None, errors: int = 0
    ) -> Measurement:
        """A Measurement for ``work`` units done in the window."""
        cpu = self.server_cpu_seconds
        own = self.own_cpu_seconds if client_cpu_seconds is None else client_cpu_seconds
        return Measurement(
            value=work / self.wall,
            per_cpu=work / cpu if cpu > 0 else None,
            wall=self.wall,
            server_cpu=cpu / self.wall,
            client_cpu=own / self.wall,
            errors=errors,
            extra={"work": work, "server_cpu_seconds": cpu},
        )


@dataclass(frozen=True)
class Workload:
    """A named workload: its units and the function that measures one server.

    ``key_type`` names the server certificate the server under test is
    started with (a key of :data:`benchmarks.certs.KEY_TYPES`).
    """

    name: str
    unit: str
    cpu_unit: str | None  # None: no per-CPU figure
    run: Callable[[Target, Params], Measurement]
    lower_is_better: bool = False
    key_type: str = "ecdsa"
