"""Prometheus exposition of server stats (the ``securetcp[metrics]`` extra).

:func:`serve_metrics` starts an HTTP endpoint in a background thread:
``/metrics`` in Prometheus' text format and ``/healthz`` (``ok``). Values are
read from each server's :attr:`~securetcp.TCPServer.stats` when Prometheus
scrapes, by a custom collector, so they are exactly the server's own
counters and nothing is counted twice.

Metric names (each with a ``server`` label, and ``task_id`` in a forked
worker; see below)::

    securetcp_connections_accepted_total        counter
    securetcp_connections_active                gauge
    securetcp_handshakes_total                  counter
    securetcp_handshake_failures_total{reason}  counter
    securetcp_connections_rejected_total        counter
    securetcp_handler_errors_total              counter
    securetcp_bytes_received_total              counter
    securetcp_bytes_sent_total                  counter
    securetcp_certificate_not_after_seconds{certificate}  gauge (Unix time)

With ``fork_processes`` every worker has its own counters, so every worker
serves its own endpoint, on ``port + task_id``, and labels its series with
``task_id``: each number is one process's, and ``sum without (task_id)``
gives the service's totals. (A parent that summed its children would need
shared memory, and would lose a crashed child's counts anyway.)
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from securetcp.process import task_id
from securetcp.tcpserver import ServerStats, TCPServer

__all__ = [
    "MetricsEndpoint",
    "MetricsUnavailable",
    "StatsCollector",
    "metrics_port",
    "require_prometheus_client",
    "serve_metrics",
]

_HEALTHZ = b"ok\n"


class MetricsUnavailable(RuntimeError):
    """prometheus_client is not installed (``pip install 'securetcp[metrics]'``)."""


def require_prometheus_client() -> Any:
    """The prometheus_client module; MetricsUnavailable (saying what to install) without it."""
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "metrics need prometheus_client, which is not installed: "
            "pip install 'securetcp[metrics]'"
        ) from None
    return prometheus_client


def _named(
    servers: TCPServer | Iterable[TCPServer] | Mapping[str, TCPServer],
) -> dict[str, TCPServer]:
    if isinstance(servers, TCPServer):
        return {type(servers).__name__: servers}
    if isinstance(servers, Mapping):
        return dict(servers)
    named: dict[str, TCPServer] = {}
    for server in servers:
        name = base = type(server).__name__
        count = 1
        while name in named:
            count += 1
            name = f"{base}-{count}"
        named[name] = server
    return named


def _snapshot(server: TCPServer) -> ServerStats:
    """``server.stats``, read from this (non-loop) thread.

    The snapshot iterates the server's open connections; if the loop thread
    changes that set meanwhile, CPython raises RuntimeError, and reading
    again gives a consistent snapshot.
    """
    for _ in range(100):
        try:
            return server.stats
        except RuntimeError:
            continue
    return server.stats


def _not_after(server: TCPServer) -> dict[str, float]:
    """Certificate label -> notAfter (Unix time) of what ``server`` serves."""
    method = getattr(server, "certificate_not_after", None)
    if callable(method):
        result: dict[str, float] = method()
        return result
    # Older engine: read the configured file (what a reload would load).
    options = getattr(server, "ssl_options", None)
    certfile = getattr(options, "certfile", None)
    if certfile is None and isinstance(options, Mapping):
        certfile = options.get("certfile")
    if certfile is None:
        return {}
    from securetcp.certs import CertificateFileError, load_pem_certificates

    try:
        leaf = load_pem_certificates(certfile)[0]
    except CertificateFileError:
        return {}
    return {str(certfile): leaf.not_valid_after_utc.timestamp()}


class StatsCollector:
    """A prometheus_client collector reading ``stats`` of named servers at scrape time.

    Scrapes run in the endpoint's thread, not the server's loop. The byte
    counters are sums over open and closed connections, and a snapshot taken
    while a connection closes can miss its bytes for that one scrape; a
    counter must never go down (Prometheus would see a reset), so each byte
    counter is reported as at least what the previous scrape reported.
    """

    def __init__(self, servers: Mapping[str, TCPServer], task: int | None = None) -> None:
        self.servers = dict(servers)
        self.task = task
        self._lock = threading.Lock()  # scrapes may run concurrently
        self._floors: dict[tuple[str, str], int] = {}

    def _monotonic(self, server: str, name: str, value: int) -> int:
        key = (server, name)
        value = max(value, self._floors.get(key, 0))
        self._floors[key] = value
        return value

    def describe(self) -> list[Any]:
        """Nothing up front: the series are only known at scrape time."""
        return []

    def collect(self) -> Iterator[Any]:
        """One metric family per statistic, one sample per server."""
        with self._lock:
            families = self._collect()
        yield from families

    def _collect(self) -> list[Any]:
        require_prometheus_client()
        from prometheus_client import core

        extra = [] if self.task is None else ["task_id"]
        extra_values = [] if self.task is None else [str(self.task)]
        labels = ["server", *extra]

        def family(kind: Any, name: str, doc: str, more: tuple[str, ...] = ()) -> Any:
            return kind(name, doc, labels=[*labels, *more])

        counter, gauge = core.CounterMetricFamily, core.GaugeMetricFamily
        accepted = family(counter, "securetcp_connections_accepted", "Connections accepted.")
        active = family(gauge, "securetcp_connections_active", "Connections open now.")
        handshakes = family(counter, "securetcp_handshakes", "TLS handshakes completed.")
        failures = family(
            counter,
            "securetcp_handshake_failures",
            "TLS handshakes that failed, by reason.",
            ("reason",),
        )
        rejected = family(
            counter,
            "securetcp_connections_rejected",
            "Connections refused after accepting (not authorized, over a limit).",
        )
        errors = family(counter, "securetcp_handler_errors", "Exceptions in handle_stream.")
        received = family(
            counter, "securetcp_bytes_received", "Application bytes read from clients."
        )
        sent = family(counter, "securetcp_bytes_sent", "Application bytes written to clients.")
        not_after = family(
            gauge,
            "securetcp_certificate_not_after_seconds",
            "When each served certificate expires (Unix time).",
            ("certificate",),
        )
        for name, server in self.servers.items():
            values = [name, *extra_values]
            stats = _snapshot(server)
            accepted.add_metric(values, stats.accepted)
            active.add_metric(values, stats.active)
            handshakes.add_metric(values, stats.handshakes)
            for reason, count in sorted(stats.failures.items()):
                failures.add_metric([*values, reason], count)
            rejected.add_metric(values, stats.rejected)
            errors.add_metric(values, stats.handler_errors)
            received.add_metric(values, self._monotonic(name, "in", stats.bytes_received))
            sent.add_metric(values, self._monotonic(name, "out", stats.bytes_sent))
            for label, when in sorted(_not_after(server).items()):
                not_after.add_metric([*values, label], when)
        return [accepted, active, handshakes, failures, rejected, errors, received, sent, not_after]


def metrics_port(port: int) -> int:
    """The port this process serves metrics on: ``port + task_id`` in a forked worker."""
    task = task_id()
    return port if task is None or port == 0 else port + task


def serve_metrics(
    servers: TCPServer | Iterable[TCPServer] | Mapping[str, TCPServer],
    port: int,
    address: str = "127.0.0.1",
) -> MetricsEndpoint:
    """Serve ``/metrics`` and ``/healthz`` over HTTP on ``address:port``; returns ``stop``.

    ``servers`` is one server, several (labelled by class name, numbered when
    repeated) or a mapping from the ``server`` label to the server. In a
    worker of ``fork_processes`` the endpoint is on ``port + task_id`` and
    every series has a ``task_id`` label (module docstring). ``port`` 0
    picks a free port; the bound port is ``stop.port``. Raises
    MetricsUnavailable without prometheus_client and OSError if the port
    cannot be bound. ``stop()`` closes the endpoint and its thread.
    """
    prometheus_client = require_prometheus_client()
    from prometheus_client.exposition import choose_encoder

    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(_named(servers), task_id()))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                # The format the scraper asks for (Accept): Prometheus text or OpenMetrics.
                encoder, kind = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(registry)
            elif path == "/healthz":
                body, kind = _HEALTHZ, "text/plain; charset=utf-8"
            else:
                self.send_error(404, "try /metrics or /healthz")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the server's own log

    kind = _HTTPServer6 if ":" in address else http.server.ThreadingHTTPServer
    httpd = kind((address, metrics_port(port)), Handler)
    httpd.daemon_threads = True
    return MetricsEndpoint(httpd)


class _HTTPServer6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    """The running endpoint :func:`serve_metrics` returns; call it to stop it."""

    def __init__(self, httpd: http.server.ThreadingHTTPServer) -> None:
        self._httpd = httpd
        self.port: int = httpd.server_address[1]
        """The port it listens on."""
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="securetcp-metrics", kwargs={"poll_interval": 0.2}
        )
        self._thread.daemon = True
        self._thread.start()

    def __call__(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
