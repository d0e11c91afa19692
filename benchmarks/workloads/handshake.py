"""Workload 1: new TLS connections per second (``handshake``, ``handshake-rsa``).

Each connection: connect, full TLS 1.3 handshake (no resumption), send one
byte, read its echo, close. Several client processes (forked, pinned to the
load-generator cores) run blocking sockets, since the client's handshake
costs about as much CPU as the server's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from benchmarks.certs import echo_once, load_context
from benchmarks.workloads.base import Measurement, Params, Target, Window, Workload

WARMUP_CONNECTIONS = 20
STARTUP_TIMEOUT = 30.0


def _client(
    port: int, cpus: tuple[int, ...] | None, go: Event, deadline: Any, out: Connection
) -> None:
    """One client process: warm up, report ready, loop until the deadline."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    ctx = load_context()
    for _ in range(WARMUP_CONNECTIONS):
        echo_once(ctx, port)
    out.send("ready")
    if not go.wait(STARTUP_TIMEOUT):
        return
    end = deadline.value
    done = errors = 0
    cpu0 = time.process_time()
    while time.monotonic() < end:
        try:
            echo_once(ctx, port)
            done += 1
        except OSError:
            errors += 1
    out.send((done, errors, time.process_time() - cpu0))


def _receive(reader: Connection, what: str) -> Any:
    """The next message from a client process, within STARTUP_TIMEOUT."""
    try:
        if reader.poll(STARTUP_TIMEOUT):
            return reader.recv()
    except EOFError:
        pass
    raise RuntimeError(f"handshake client did not {what} (server refused or died?)")


def run(target: Target, params: Params) -> Measurement:
    """Measure handshakes/s with ``params.handshake_clients`` client processes."""
    mpc = mp.get_context("fork")
    go = mpc.Event()
    deadline = mpc.Value("d", 0.0)
    pipes, procs = [], []
    try:
        for _ in range(params.handshake_clients):
            reader, writer = mpc.Pipe(duplex=False)
            proc = mpc.Process(
                target=_client,
                args=(target.port, params.client_cpus, go, deadline, writer),
                daemon=True,
            )
            proc.start()
            writer.close()
            pipes.append(reader)
            procs.append(proc)
        for reader in pipes:
            if _receive(reader, "start") != "ready":
                raise RuntimeError("handshake client did not start")
        window = Window(target.server)
        window.start()
        deadline.value = window.t0 + params.duration
        go.set()
        time.sleep(params.duration)
        window.stop()
        done = errors = 0
        client_cpu = 0.0
        for reader in pipes:
            n, e, cpu = _receive(reader, "finish")
            done, errors, client_cpu = done + n, errors + e, client_cpu + cpu
        target.server.check_alive()
        return window.measurement(done, client_cpu_seconds=client_cpu, errors=errors)
    finally:
        for proc in procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)


HANDSHAKE = Workload("handshake", "conn/s", "conn/CPU-s", run)
# The same with an RSA-2048 server certificate: the server's signature costs
# several times an ECDSA P-256 one while the client's check stays cheap, so
# the server, not the load generator, is the bound.
HANDSHAKE_RSA = Workload("handshake-rsa", "conn/s", "conn/CPU-s", run, key_type="rsa")
