"""Workload 1: new TLS connections per second (``handshake``, ``handshake-rsa``).

Each connection: connect, full TLS 1.3 handshake (no resumption), send one
byte, read its echo, close. The load generator is ``clients/handshake_gnutls.c``,
one process per load-generator core with the ``--handshake-clients``
connections in flight spread over them. A client handshake costs GnuTLS
about what it costs the C server and less than it costs any Python server,
so those are the bound (OpenSSL 3.0's client costs more than its server:
Python or C clients on OpenSSL left every server partly idle). Where it
cannot be built (no compiler or GnuTLS headers), forked Python clients with
blocking sockets stand in, with a warning; the ``gen CPU`` column then shows
the generator at its limit.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import select
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from benchmarks import cbuild
from benchmarks.certs import HOST, SERVER_NAME, echo_once, load_context
from benchmarks.workloads.base import Measurement, Params, Target, Window, Workload

WARMUP_CONNECTIONS = 20
STARTUP_TIMEOUT = 30.0
GENERATOR_SOURCE = Path(__file__).resolve().parent.parent / "clients" / "handshake_gnutls.c"


def run(target: Target, params: Params) -> Measurement:
    """Measure handshakes/s with ``params.handshake_clients`` connections in flight."""
    generator = _generator()
    if generator is None:
        measured = _run_python_clients(target, params)
    else:
        measured = _run_c_generator(generator, target, params)
    measured.extra["gnutls_generator"] = float(generator is not None)  # which one ran
    return measured


@functools.cache
def _generator() -> Path | None:
    """The built load generator; None, said once per run, where it cannot be built."""
    try:
        return cbuild.binary(GENERATOR_SOURCE)
    except cbuild.BuildError as e:
        print(f"bench: warning: {e}; handshakes driven by Python clients instead", file=sys.stderr)
        return None


# ------------------------------------------------------------- C generator


def _generator_cpus(params: Params) -> list[set[int] | None]:
    """One entry per generator process: the core it is pinned to, or None."""
    if params.client_cpus is None:
        return [None]
    cpus = sorted(params.client_cpus)[: max(1, params.handshake_clients)]
    return [{cpu} for cpu in cpus]


def _run_c_generator(generator: Path, target: Target, params: Params) -> Measurement:
    placement = _generator_cpus(params)
    shares = [params.handshake_clients // len(placement)] * len(placement)
    for i in range(params.handshake_clients % len(placement)):
        shares[i] += 1
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cpus, share in zip(placement, shares, strict=True):
            argv = [str(generator), "--host", HOST, "--port", str(target.port)]
            argv += ["--connections", str(max(1, share)), "--sni", SERVER_NAME]
            argv += ["--warmup", str(WARMUP_CONNECTIONS)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(proc)
            if cpus is not None:
                os.sched_setaffinity(proc.pid, cpus)
        for proc in procs:
            if _read_line(proc, "start") != "ready":
                raise RuntimeError("handshake generator did not start")
        window = Window(target.server)
        window.start()
        go = f"go {window.t0 + params.duration!r}\n".encode()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(go)
            proc.stdin.flush()
        time.sleep(params.duration)  # the measured window itself
        window.stop()
        done = errors = 0
        client_cpu = 0.0
        for proc in procs:
            n, e, cpu = _read_line(proc, "finish").split()
            done, errors, client_cpu = done + int(n), errors + int(e), client_cpu + float(cpu)
        target.server.check_alive()
        return window.measurement(done, client_cpu_seconds=client_cpu, errors=errors)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5.0)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def _read_line(proc: subprocess.Popen[bytes], what: str) -> str:
    """The generator's next output line, within STARTUP_TIMEOUT."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        chunk = os.read(fd, 256) if ready else b""
        if not chunk:
            status = proc.poll()
            why = "timed out" if status is None else f"exited with status {status}"
            raise RuntimeError(f"handshake generator did not {what} ({why})")
        line += chunk
    return line.decode().strip()


# --------------------------------------------------- Python clients (fallback)


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


def _run_python_clients(target: Target, params: Params) -> Measurement:
    """One forked blocking client process per connection in flight."""
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
# several times an ECDSA P-256 one while the client's check stays cheap.
HANDSHAKE_RSA = Workload("handshake-rsa", "conn/s", "conn/CPU-s", run, key_type="rsa")
