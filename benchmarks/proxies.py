"""The proxy rows (``scripts/bench --proxy``): TLS proxies in front of an echo.

Each proxy under test gets a fresh process pinned to the server core, as the
echo servers do; behind it runs an upstream echo started once per run and
pinned to the load-generator core: a plain C epoll echo for the terminating
rows (TLS in, plain TCP out), the C epoll + OpenSSL echo for the
re-originating rows (TLS in, TLS out, verified, SNI). The workloads are the
echo benchmark's, unchanged: the proxy passes every byte to the echo and back.
Figures are per second of the *proxy's* CPU time; the upstream's CPU is not
counted (it is the same for every proxy).

Rows (``--servers`` selects by family): HAProxy (``mode tcp``, ``ssl``,
``nbthread 1``; the baseline), stunnel (terminating only), a hand-written
asyncio streams proxy on asyncio and on uvloop, and securetcp's TLSProxy on
asyncio and on uvloop. Re-originating rows are reported as their own
workloads (``handshake tls->tls``...), against HAProxy doing the same.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from benchmarks import cbuild
from benchmarks.certs import HOST, TLSFiles, client_context, echo_once
from benchmarks.procs import ServerProcess
from benchmarks.targets import SERVERS, SERVERS_DIR, ServerSpec, free_port
from benchmarks.workloads.base import Workload

PLAIN_UPSTREAM = SERVERS_DIR / "proxy_upstream_echo.c"
REORIGINATING = " tls->tls"

FAMILIES = ["haproxy", "stunnel", "asyncio", "uvloop", "securetcp", "securetcp-uvloop"]


def specs(
    plain_port: int, tls_port: int, cafile: Path
) -> tuple[list[ServerSpec], list[ServerSpec]]:
    """(terminating, re-originating) proxy rows for upstreams on these ports."""
    plain = ("--upstream-port", str(plain_port))
    tls = ("--upstream-port", str(tls_port), "--upstream-tls", "--cafile", str(cafile))
    uv = ("--loop", "uvloop")
    terminating = [
        ServerSpec("haproxy", "haproxy", "haproxy_proxy.py", plain, baseline=True),
        ServerSpec("stunnel", "stunnel", "stunnel_proxy.py", plain),
        ServerSpec("asyncio", "asyncio", "asyncio_proxy.py", plain),
        ServerSpec("uvloop", "uvloop", "asyncio_proxy.py", (*plain, *uv)),
        ServerSpec("securetcp", "securetcp", "securetcp_proxy.py", plain),
        ServerSpec("securetcp-uvloop", "securetcp-uvloop", "securetcp_proxy.py", (*plain, *uv)),
    ]
    reoriginating = [
        ServerSpec("haproxy", "haproxy", "haproxy_proxy.py", tls, baseline=True),
        ServerSpec("asyncio", "asyncio", "asyncio_proxy.py", tls),
        ServerSpec("securetcp", "securetcp", "securetcp_proxy.py", tls),
        ServerSpec("securetcp-uvloop", "securetcp-uvloop", "securetcp_proxy.py", (*tls, *uv)),
    ]
    return terminating, reoriginating


def plan(
    workloads: list[Workload], families: list[str], plain_port: int, tls_port: int, cafile: Path
) -> list[tuple[Workload, ServerSpec]]:
    """The (workload, proxy) pairs of one round: terminating, then re-originating."""
    terminating, reoriginating = specs(plain_port, tls_port, cafile)
    pairs = [(w, s) for w in workloads for s in terminating if s.family in families]
    for w in workloads:
        renamed = replace(w, name=w.name + REORIGINATING)
        pairs += [(renamed, s) for s in reoriginating if s.family in families]
    return pairs


def _plain_echo_once(port: int, timeout: float = 2.0) -> None:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise ConnectionError("plain upstream echo mismatch")


@contextlib.contextmanager
def upstreams(
    tls: TLSFiles, logs: Path, cpus: set[int] | None, ready_timeout: float
) -> Iterator[tuple[int, int]]:
    """Run the plain and the TLS upstream echo for the whole run: (plain, TLS) ports."""
    plain_port, tls_port = free_port(), free_port()
    c_openssl = next(s for s in SERVERS if s.family == "c-openssl")
    plain_argv = [str(cbuild.binary(PLAIN_UPSTREAM)), "--port", str(plain_port), "--host", HOST]
    with (
        ServerProcess(plain_argv, log_path=logs / "upstream-plain.log", cpus=cpus) as plain,
        ServerProcess(
            c_openssl.argv(tls_port, tls), log_path=logs / "upstream-tls.log", cpus=cpus
        ) as secure,
    ):
        plain.wait_ready(lambda: _plain_echo_once(plain_port), ready_timeout)
        ctx = client_context(tls.cafile)
        secure.wait_ready(lambda: echo_once(ctx, tls_port, timeout=2.0), ready_timeout)
        yield plain_port, tls_port
        plain.check_alive()
        secure.check_alive()
