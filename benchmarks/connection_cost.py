"""What one connection costs an echo server: CPU, split into user and system
time, and (with ``--callgrind``) instructions, per connection.

A connection is what the handshake workload does: TLS 1.3 handshake, one
byte echoed, close. The bench's per-CPU-second figures say which server is
ahead; this says where a change moved the cost, for an A/B of one change
(run each side on the same code path with ``PYTHONPATH`` pointing at the
checkout under test)::

    .venv-bench/bin/python -m benchmarks.connection_cost --servers securetcp,uvloop,c-openssl
    .venv-bench/bin/python -m benchmarks.connection_cost --servers securetcp --callgrind
    .venv-bench/bin/python -m benchmarks.connection_cost --proxy --servers securetcp --callgrind

CPU mode: rounds of ``--seconds`` with every server in turn (interleaved, so a
slow phase of this shared machine hits all of them), the server pinned to
``--server-cpu`` and ``--clients`` blocking client processes to
``--client-cpu``; medians are printed. Timings swing by several percent
between rounds: trust differences larger than the printed spread only.
Callgrind mode (valgrind installed): ``--connections`` sequential
connections after a warm-up, instrumentation on only for them; counts are
exact and repeatable, the tool for changes of a few percent.
``--proxy``: the same for the terminating TLS proxies of ``scripts/bench
--proxy`` (``--servers securetcp,stunnel,...``), in front of the bench's
plain C echo (pinned to ``--client-cpu``; its cost is not counted).
``--python-objects``: securetcp's echo service in this process (``--loop``
asyncio or uvloop) and ``--connections`` idle TLS connections from a child
process; prints the bytes of Python objects each holds (tracemalloc), by line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

from benchmarks import proxies
from benchmarks.certs import client_context, connect_tls, echo_once, make_tls_files
from benchmarks.procs import CLK_TCK, ServerProcess, descendants
from benchmarks.targets import SERVERS, ServerSpec, free_port

READY_TIMEOUT = 120.0  # under valgrind a Python server starts slowly
WARMUP_CONNECTIONS = 30


def user_and_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of `pid`'s whole process tree, in seconds."""
    user = system = 0
    for member in descendants(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def _client(port: int, cafile: str, cpu: int, deadline: float, out: Connection) -> None:
    os.sched_setaffinity(0, {cpu})
    ctx = client_context(cafile)
    done = 0
    while time.time() < deadline:
        echo_once(ctx, port)
        done += 1
    out.send(done)


def measure_cpu(
    spec: ServerSpec, tls_dir: Path, key: str, args: argparse.Namespace
) -> tuple[int, float, float]:
    """(connections, user s, system s) of one server over one round."""
    tls = make_tls_files(tls_dir)[key]
    port = free_port()
    ctx = client_context(tls.cafile)
    log = tls_dir / f"{spec.name}.log"
    with ServerProcess(spec.argv(port, tls), log_path=log, cpus={args.server_cpu}) as server:
        server.wait_ready(lambda: echo_once(ctx, port), READY_TIMEOUT)
        for _ in range(WARMUP_CONNECTIONS):
            echo_once(ctx, port)
        mpc = mp.get_context("fork")
        deadline = time.time() + 0.3 + args.seconds
        pipes, procs = [], []
        user0, system0 = user_and_system_seconds(server.pid)
        for _ in range(args.clients):
            reader, writer = mpc.Pipe(duplex=False)
            proc = mpc.Process(
                target=_client, args=(port, str(tls.cafile), args.client_cpu, deadline, writer)
            )
            proc.start()
            writer.close()
            pipes.append(reader)
            procs.append(proc)
        done = sum(reader.recv() for reader in pipes)
        for proc in procs:
            proc.join()
        user1, system1 = user_and_system_seconds(server.pid)
    return done, user1 - user0, system1 - system0


def measure_instructions(spec: ServerSpec, tls_dir: Path, key: str, connections: int) -> float:
    """Instructions the server executes per connection, counted by callgrind."""
    tls = make_tls_files(tls_dir)[key]
    port = free_port()
    ctx = client_context(tls.cafile)
    out = tls_dir / f"callgrind-{spec.name}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *spec.argv(port, tls),
    ]
    with ServerProcess(argv, log_path=tls_dir / f"{spec.name}.log", cpus=None) as server:
        server.wait_ready(lambda: echo_once(ctx, port, timeout=30), READY_TIMEOUT)
        for _ in range(WARMUP_CONNECTIONS):
            echo_once(ctx, port, timeout=30)
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(server.pid)], check=True, capture_output=True)
        for _ in range(connections):
            echo_once(ctx, port, timeout=30)
        subprocess.run([*control, "off", str(server.pid)], check=True, capture_output=True)
        server.stop(timeout=60)  # callgrind writes its counts as the server exits
    totals = [
        int(line.split()[1])
        for dump in tls_dir.glob(f"{out.name}*")
        for line in dump.read_text().splitlines()
        if line.startswith(("totals:", "summary:"))
    ]
    if not totals:
        raise RuntimeError(f"no totals in {out}")
    return max(totals) / connections


def _hold_connections(port: int, cafile: str, count: int, out: Connection) -> None:
    ctx = client_context(cafile)
    held = []
    for _ in range(count):
        tls = connect_tls(ctx, port)
        tls.sendall(b"x")
        tls.recv(1)
        held.append(tls)
    out.send("held")
    out.recv()  # until told to let go


def _context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def python_objects(tls_dir: Path, key: str, connections: int, loop: str) -> None:
    """Print the Python objects an idle TLS connection holds in securetcp's echo."""
    from securetcp.services.echo import EchoServer

    tls = make_tls_files(tls_dir)[key]
    ready = threading.Event()
    ports: list[int] = []
    servers: list[EchoServer] = []

    def serve() -> None:
        server = EchoServer(ssl_options=_context(tls.certfile, tls.keyfile))
        servers.append(server)
        server.listen(0, "127.0.0.1")
        ports.append(server.sockets[0].getsockname()[1])
        ready.set()
        server.run(loop=loop)

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(30)
    mpc = mp.get_context("spawn")  # no copy of this process's threads

    def hold(count: int) -> tuple[Connection, mp.process.BaseProcess]:
        here, there = mpc.Pipe()
        proc = mpc.Process(target=_hold_connections, args=(ports[0], str(tls.cafile), count, there))
        proc.start()
        if not here.poll(120) or here.recv() != "held":
            raise RuntimeError("the client process did not connect")
        return here, proc

    pipe, proc = hold(WARMUP_CONNECTIONS)  # one-time set-up is not counted
    pipe.send("go")
    proc.join()
    deadline = time.monotonic() + 30
    while servers[0].stats.active and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has seen those closes
    gc.collect()
    tracemalloc.start(4)
    before = tracemalloc.take_snapshot()
    pipe, proc = hold(connections)
    gc.collect()
    after = tracemalloc.take_snapshot()
    pipe.send("go")
    proc.join()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    total = sum(stat.size_diff for stat in stats)
    print(f"{total / connections:.0f} bytes of Python objects per idle TLS connection ({loop})")
    for stat in stats[:15]:
        if stat.size_diff / connections >= 8:
            print(f"{stat.size_diff / connections:6.0f} B  {stat.traceback}")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--servers", default="securetcp,securetcp-uvloop,uvloop,c-openssl")
    parser.add_argument("--key", choices=("ecdsa", "rsa"), default="ecdsa")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--python-objects", action="store_true", help="tracemalloc, in process")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--proxy", action="store_true", help="terminating TLS proxies instead")
    args = parser.parse_args()
    if args.python_objects:
        with tempfile.TemporaryDirectory(prefix="securetcp-cost-") as tmp:
            python_objects(Path(tmp), args.key, args.connections, args.loop)
        return
    with contextlib.ExitStack() as stack:
        tls_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="securetcp-cost-")))
        servers = SERVERS
        if args.proxy:
            # Only the plain upstream is used: each measurement makes its own
            # certificates, which a re-originating proxy's CA would not match.
            upstream_dir = tls_dir / "upstream"
            upstream_dir.mkdir()
            upstream_tls = make_tls_files(upstream_dir)["ecdsa"]
            plain_port, tls_port = stack.enter_context(
                proxies.upstreams(upstream_tls, tls_dir, {args.client_cpu}, READY_TIMEOUT)
            )
            servers = proxies.specs(plain_port, tls_port, upstream_tls.cafile)[0]
        by_family = {spec.family: spec for spec in servers}
        wanted = [by_family[name.strip()] for name in args.servers.split(",") if name.strip()]
        if args.callgrind:
            for spec in wanted:
                per = measure_instructions(spec, tls_dir, args.key, args.connections)
                print(f"{spec.name:<18} {per / 1e6:6.3f} M instructions per connection")
            return
        samples: dict[str, list[tuple[float, float]]] = {spec.name: [] for spec in wanted}
        for _ in range(args.rounds):
            for spec in wanted:
                done, user, system = measure_cpu(spec, tls_dir, args.key, args)
                samples[spec.name].append((user / done * 1e6, system / done * 1e6))
        print(f"{'server':<18} {'user us':>8} {'sys us':>7} {'total us':>9}  per round (total)")
        for name, rows in samples.items():
            totals = [u + s for u, s in rows]
            user = statistics.median(u for u, _ in rows)
            system = statistics.median(s for _, s in rows)
            total = statistics.median(totals)
            spread = "/".join(f"{t:.0f}" for t in totals)
            print(f"{name:<18} {user:8.0f} {system:7.0f} {total:9.0f}  {spread}")


if __name__ == "__main__":
    main()
