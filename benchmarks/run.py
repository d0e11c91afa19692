"""Benchmark harness: TLS echo servers under four workloads, peers side by side.

Every measurement gets a fresh server process on the server core (core 0
unless ``--server-cpus``) while the load generator runs on core 1 (unless
``--client-cpus``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks import proxies, report, sysinfo
from benchmarks.certs import TLSFiles, client_context, echo_once, load_context, make_tls_files
from benchmarks.cpus import Placement, placement
from benchmarks.procs import ServerFailed, ServerProcess, log_tail, raise_nofile_limit, stop_all
from benchmarks.targets import FAMILIES, SERVERS, ServerSpec, free_port, scaling_specs
from benchmarks.workloads.base import Measurement, Params, Target, Workload
from benchmarks.workloads.handshake import HANDSHAKE, HANDSHAKE_RSA
from benchmarks.workloads.memory import MEMORY
from benchmarks.workloads.streaming import BULK, SMALL

WORKLOADS = {w.name: w for w in (HANDSHAKE, HANDSHAKE_RSA, BULK, SMALL, MEMORY)}
# The proxy targets (issue 13) are ECDSA; handshake-rsa runs there on request.
PROXY_DEFAULT_WORKLOADS = [HANDSHAKE.name, BULK.name, SMALL.name, MEMORY.name]
SCALING_WORKLOAD = replace(HANDSHAKE, name="scaling")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
READY_TIMEOUT = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument(
        "--servers",
        help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        help=f"comma-separated subset of {','.join([*WORKLOADS, 'scaling'])} "
        f"(default: all but scaling; with --proxy: {','.join(PROXY_DEFAULT_WORKLOADS)})",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also run the multi-process handshake comparison (unpinned)",
    )
    p.add_argument(
        "--quick", action="store_true", help="1 round, short windows (about 2 minutes in all)"
    )
    p.add_argument(
        "--proxy",
        action="store_true",
        help="benchmark TLS proxies (HAProxy, stunnel, asyncio, securetcp) in front of an echo "
        f"instead of echo servers; --servers then selects among {','.join(proxies.FAMILIES)}",
    )
    p.add_argument("--rounds", type=int, help="rounds per measurement (default 3)")
    p.add_argument("--duration", type=float, help="seconds per measured window (default 10)")
    p.add_argument("--warmup", type=float, help="seconds of traffic before each window")
    p.add_argument(
        "--server-cpus",
        metavar="LIST",
        help="CPUs for the servers, e.g. 0-7 or 0,2,4 (default: the first CPU); one-process "
        "rows use the first, --scaling rows all of them",
    )
    p.add_argument(
        "--client-cpus",
        metavar="LIST",
        help="CPUs for the load generator (default: the second CPU, or with --server-cpus "
        "every CPU not in it)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help="processes of the --scaling rows (default: the number of --server-cpus if more "
        "than one, else 2)",
    )
    p.add_argument(
        "--handshake-clients",
        type=int,
        default=4,
        help="handshake connections in flight, spread over the load-generator CPUs (default 4)",
    )
    p.add_argument("--bulk-connections", type=int, default=4)
    p.add_argument("--small-connections", type=int, default=64)
    p.add_argument("--idle-connections", type=int, default=1000)
    p.add_argument("--json", type=Path, help="results file (default benchmarks/results/<ts>.json)")
    p.add_argument("--keep-logs", action="store_true", help="print where server logs are kept")
    args = p.parse_args(argv)
    if args.servers is None:
        args.servers = ",".join(proxies.FAMILIES if args.proxy else FAMILIES)
    if args.workloads is None:
        args.workloads = ",".join(PROXY_DEFAULT_WORKLOADS if args.proxy else WORKLOADS)
    try:
        args.placement = placement(args.server_cpus, args.client_cpus)
    except ValueError as e:
        p.error(str(e))
    if args.processes is None:
        srv = args.placement.scaling
        args.processes = len(srv) if srv and len(srv) > 1 else 2
    if args.processes < 1:
        p.error("--processes must be at least 1")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    return args


def _split(value: str, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def plan(args: argparse.Namespace) -> list[tuple[Workload, ServerSpec]]:
    """The (workload, server) pairs of one round, in order (echo servers)."""
    families = _split(args.servers, FAMILIES, "servers")
    names = _split(args.workloads, [*WORKLOADS, "scaling"], "workloads")
    pairs = [
        (WORKLOADS[w], s) for w in names if w != "scaling" for s in SERVERS if s.family in families
    ]
    if args.scaling or "scaling" in names:
        specs = scaling_specs(args.processes)
        pairs += [(SCALING_WORKLOAD, s) for s in specs if s.family in families]
    return pairs


def measure(
    workload: Workload,
    spec: ServerSpec,
    pki: dict[str, TLSFiles],
    params: Params,
    where: Placement,
    logs: Path,
) -> Measurement | str:
    """One measurement on a fresh server; a failure comes back as its reason.

    The server gets the certificate of ``workload.key_type`` from ``pki``.
    """
    tls = pki[workload.key_type]
    port = free_port()
    ctx = client_context(tls.cafile)
    log = logs / f"{workload.name}-{spec.name.replace(' ', '_')}-{port}.log"
    if spec.pinned:
        server_cpus = where.server_core
        client_cpus = where.client
    else:  # the scaling rows: the whole server set, or anywhere
        server_cpus = set(where.scaling) if where.scaling else None
        client_cpus = where.client if where.scaling else None
    os.sched_setaffinity(0, client_cpus or _all_cpus())
    params = replace(params, client_cpus=client_cpus)
    try:
        with ServerProcess(spec.argv(port, tls), log_path=log, cpus=server_cpus) as server:
            server.wait_ready(lambda: echo_once(ctx, port, timeout=2.0), READY_TIMEOUT)
            return workload.run(Target(server, port, tls.cafile, load_context()), params)
    except ServerFailed as e:
        return str(e)
    except Exception as e:  # a crashed server shows up as many kinds of errors
        tail = log_tail(log)
        detail = f"{type(e).__name__}: {e}" + (f" | server: {tail}" if tail else "")
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        return detail


_ALLOWED_CPUS = os.sched_getaffinity(0)  # before the harness pins itself


def _all_cpus() -> set[int]:
    return set(_ALLOWED_CPUS)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print the table; write the JSON file."""
    args = parse_args(argv)
    if args.proxy:
        families = _split(args.servers, proxies.FAMILIES, "proxies")
        names = _split(args.workloads, list(WORKLOADS), "workloads")
        workloads = [WORKLOADS[n] for n in names]
        if not families or not workloads:
            raise SystemExit("nothing to run")
    else:
        pairs = plan(args)
        if not pairs:
            raise SystemExit("nothing to run")
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile_limit()
    where: Placement = args.placement
    params = Params(
        duration=args.duration,
        warmup=args.warmup,
        handshake_clients=args.handshake_clients,
        bulk_connections=args.bulk_connections,
        small_connections=args.small_connections,
        idle_connections=args.idle_connections,
        client_cpus=where.client,
    )
    settings = {
        "rounds": args.rounds,
        **{k: v for k, v in asdict(params).items() if k != "client_cpus"},
        **where.describe(),
    }
    if args.scaling or "scaling" in args.workloads.split(","):
        settings["scaling_processes"] = args.processes
    if args.proxy:
        settings["mode"] = "proxy"
    meta = sysinfo.collect()
    print(report.header(meta, settings), flush=True)
    rows: dict[tuple[str, str], report.Row] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="securetcp-bench-") as tmp, ExitStack() as stack:
        pki = make_tls_files(Path(tmp))
        logs = (
            Path(tempfile.mkdtemp(prefix="securetcp-bench-logs-")) if args.keep_logs else Path(tmp)
        )
        if args.proxy:
            # The upstream echoes share the load generator's core.
            upstream_cpus = set(where.client) if where.client else None
            ecdsa = pki["ecdsa"]
            plain_port, tls_port = stack.enter_context(
                proxies.upstreams(ecdsa, logs, upstream_cpus, READY_TIMEOUT)
            )
            pairs = proxies.plan(workloads, families, plain_port, tls_port, ecdsa.cafile)
        for workload, spec in pairs:
            rows[workload.name, spec.name] = report.Row(workload, spec.name, spec.baseline)
        for r in range(args.rounds):
            for workload, spec in pairs:
                result = measure(workload, spec, pki, params, where, logs)
                rows[workload.name, spec.name].rounds.append(result)
                print(
                    f"  round {r + 1}/{args.rounds} {workload.name:<13} {spec.name:<22} "
                    f"{_summary(result, workload)}",
                    flush=True,
                )
    elapsed = time.monotonic() - started
    print()
    print(report.table(list(rows.values())))
    print(report.PROXY_NOTES if args.proxy else report.NOTES)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or RESULTS_DIR / f"{stamp}.json"
    load_end = sysinfo.load_average()
    meta = {**meta, "elapsed_seconds": round(elapsed, 1), "loadavg_end": load_end}
    report.to_json(path, meta, settings, list(rows.values()))
    print(
        f"took {elapsed:.0f}s; load average at end {load_end}; results in {path}"
        + (f"; logs in {logs}" if args.keep_logs else "")
    )
    return 0


def _summary(result: Measurement | str, workload: Workload) -> str:
    if isinstance(result, str):
        return f"FAILED: {result[:200]}"
    per_cpu = f", {result.per_cpu:,.1f} {workload.cpu_unit}" if result.per_cpu else ""
    return (
        f"{result.value:,.1f} {workload.unit}{per_cpu} "
        f"(srv CPU {100 * result.server_cpu:.0f}%, gen {100 * result.client_cpu:.0f}%)"
    )
