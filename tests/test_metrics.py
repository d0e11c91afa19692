"""securetcp.metrics: Prometheus scrapes over HTTP after real traffic, with exact values."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from servers import whole_lines
from test_probe import Echo, ThreadedServer

from securetcp import TLSConfig
from securetcp.certs import load_pem_certificates
from securetcp.metrics import serve_metrics

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def poll(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(0.01)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    files: dict[str, Any] = {"ca": ca, "ca_file": tmp_path / "ca.pem", "dir": tmp_path}
    ca.cert_pem.write_to_path(str(files["ca_file"]))
    server = ca.issue_cert("localhost", "127.0.0.1")
    files["cert"] = tmp_path / "server.pem"
    files["key"] = tmp_path / "server.key"
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client = ca.issue_cert("client.example", common_name="client")
    files["client"] = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    stranger = trustme.CA().issue_cert("stranger.example")
    files["stranger"] = tmp_path / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(files["stranger"]))
    return files


def tls_client(pki: dict[str, Any], cert: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca_file"]))
    if cert is not None:
        context.load_cert_chain(str(cert))
    return context


def echo(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def refused_client_certificate(port: int, context: ssl.SSLContext) -> None:
    """TLS 1.3 tells the client its certificate was refused only when it reads."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        contextlib.suppress(ssl.SSLError, OSError),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.recv(1)


def not_after(path: Path) -> float:
    return load_pem_certificates(path)[0].not_valid_after_utc.timestamp()


@contextlib.contextmanager
def metrics_for(servers: Any, port: int = 0) -> Iterator[int]:
    stop = serve_metrics(servers, port)
    try:
        yield stop.port
    finally:
        stop()


def test_counters_after_real_traffic(pki: dict[str, Any], no_fd_leak: None) -> None:
    tls = TLSConfig(pki["cert"], pki["key"], client_auth="required", client_ca=pki["ca_file"])
    with ThreadedServer(Echo(ssl_options=tls)) as running, metrics_for(running.server) as port:
        empty = scrape(port)
        labels = {"server": "Echo"}
        assert value(empty, "securetcp_connections_accepted_total", **labels) == 0
        assert value(empty, "securetcp_handshakes_total", **labels) == 0

        # One good handshake with 11 bytes each way, one plaintext request,
        # one client certificate from a CA the server does not trust.
        assert echo(running.port, tls_client(pki, pki["client"]), b"hello world") == b"hello world"
        with socket.create_connection((HOST, running.port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(OSError):
                plain.recv(100)
        refused_client_certificate(running.port, tls_client(pki, pki["stranger"]))

        def settled() -> Samples | None:
            samples = scrape(port)
            done = value(samples, "securetcp_connections_active", **labels) == 0
            return samples if done and value(samples, "securetcp_connections_accepted_total",
                                             **labels) == 3 else None  # fmt: skip

        samples = poll(settled)
        assert value(samples, "securetcp_connections_accepted_total", **labels) == 3
        assert value(samples, "securetcp_handshakes_total", **labels) == 1
        failures = {
            dict(key[1])["reason"]: v
            for key, v in samples.items()
            if key[0] == "securetcp_handshake_failures_total"
        }
        assert failures == {"plaintext": 1, "certificate": 1}
        assert value(samples, "securetcp_bytes_received_total", **labels) == 11
        assert value(samples, "securetcp_bytes_sent_total", **labels) == 11
        assert value(samples, "securetcp_connections_rejected_total", **labels) == 0
        assert value(samples, "securetcp_handler_errors_total", **labels) == 0
        # The same numbers as the server's own stats.
        stats = running.call(lambda: running.server.stats)
        assert (stats.accepted, stats.handshakes, stats.failures) == (3, 1, failures)

        expiry = [
            (dict(k[1]), v)
            for k, v in samples.items()
            if k[0] == "securetcp_certificate_not_after_seconds"
        ]
        assert len(expiry) == 1
        assert expiry[0][1] == not_after(pki["cert"])
        assert expiry[0][0]["server"] == "Echo" and expiry[0][0]["certificate"]


def test_certificate_expiry_follows_a_reload(pki: dict[str, Any]) -> None:
    tls = TLSConfig(pki["cert"], pki["key"])
    with ThreadedServer(Echo(ssl_options=tls)) as running, metrics_for(running.server) as port:

        def expiries() -> list[float]:
            return [v for k, v in scrape(port).items() if k[0].endswith("not_after_seconds")]

        before = not_after(pki["cert"])
        assert expiries() == [before]
        renewed = pki["ca"].issue_cert("localhost", "127.0.0.1", not_after=trustme_expiry(days=45))
        renewed.cert_chain_pems[0].write_to_path(str(pki["cert"]))
        renewed.private_key_pem.write_to_path(str(pki["key"]))
        assert running.call(tls.reload) is True
        after = not_after(pki["cert"])
        assert after != before
        assert expiries() == [after]
        # New connections get the new certificate.
        context = tls_client(pki, None)
        with (
            socket.create_connection((HOST, running.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            der = conn.getpeercert(binary_form=True)
        assert der is not None
        served = x509.load_der_x509_certificate(der)
        assert served.not_valid_after_utc.timestamp() == after


def trustme_expiry(days: int) -> Any:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)


def test_several_servers_healthz_and_unknown_paths(pki: dict[str, Any]) -> None:
    first = ThreadedServer(Echo(ssl_options=TLSConfig(pki["cert"], pki["key"])))
    second = ThreadedServer(Echo())
    with first, second, metrics_for({"tls": first.server, "plain": second.server}) as port:
        assert echo_plain(second.port, b"abc") == b"abc"
        samples = poll(
            lambda: (
                (s := scrape(port))
                and value(s, "securetcp_bytes_sent_total", server="plain") == 3
                and s
            )
        )
        assert value(samples, "securetcp_connections_accepted_total", server="plain") == 1
        assert value(samples, "securetcp_connections_accepted_total", server="tls") == 0
        assert not any(dict(k[1]).get("server") == "plain" for k in samples if "not_after" in k[0])
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=10) as response:
            assert response.status == 200 and response.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://{HOST}:{port}/nope", timeout=10)
        assert error.value.code == 404
        error.value.close()


def echo_plain(port: int, payload: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


BLOCK_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None; "


def test_a_clear_error_without_prometheus_client(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = BLOCK_PROMETHEUS + (
        "from securetcp.metrics import serve_metrics, MetricsUnavailable\n"
        "from securetcp import TCPServer\n"
        "try:\n    serve_metrics(TCPServer(), 0)\n"
        "except MetricsUnavailable as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert "pip install 'securetcp[metrics]'" in result.stdout, result.stderr

    assert subprocess.run(
        [sys.executable, "-m", "securetcp", "certs", "init", "--dir", "certs"],
        cwd=tmp_path, env=env, timeout=60, capture_output=True,
    ).returncode == 0  # fmt: skip
    cli = BLOCK_PROMETHEUS + "from securetcp.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", cli, "echo", "--port", "0", "--metrics-port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "securetcp: --metrics-port: metrics need prometheus_client, which is not installed: "
        "pip install 'securetcp[metrics]'"
    )


def two_free_ports() -> int:
    """A port P with P and P + 1 both free (the endpoints of two workers)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((HOST, 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((HOST, port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no two consecutive free ports")


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX system")
def test_forked_workers_each_serve_their_own_numbers(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    init = [sys.executable, "-m", "securetcp", "certs", "init", "--dir", "certs"]
    assert subprocess.run(init, cwd=tmp_path, env=env, timeout=60).returncode == 0
    metrics = two_free_ports()
    command = [sys.executable, "-m", "securetcp", "echo", "--port", "0", "--processes", "2"]
    command += ["--metrics-port", str(metrics), "--client-auth", "none"]
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.PIPE)
    try:
        # Whole lines only: a worker may be writing its line (and its port) still.
        text = poll(
            lambda: (t := whole_lines(out_path.read_text())).count("metrics on") == 2 and t, 20
        )
        port = int(re.search(r"127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        assert f"127.0.0.1:{metrics}/metrics" in text and f"127.0.0.1:{metrics + 1}/" in text
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
        for i in range(6):
            assert echo(port, context, b"x" * (i + 1)) == b"x" * (i + 1)

        def totals() -> dict[str, float] | None:
            per_worker = {}
            for task in (0, 1):
                samples = scrape(metrics + task)
                labels = {"server": "EchoServer", "task_id": str(task)}
                per_worker[task] = (
                    value(samples, "securetcp_connections_accepted_total", **labels),
                    value(samples, "securetcp_connections_active", **labels),
                    value(samples, "securetcp_bytes_received_total", **labels),
                )
            accepted = sum(w[0] or 0 for w in per_worker.values())
            active = sum(w[1] or 0 for w in per_worker.values())
            received = sum(w[2] or 0 for w in per_worker.values())
            if accepted == 6 and active == 0 and received == 21:
                return {"accepted": accepted, "received": received}
            return None

        assert poll(totals) == {"accepted": 6, "received": 21}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert "Traceback" not in stderr


def test_byte_counters_never_go_down() -> None:
    """A snapshot that races a closing connection may miss its bytes for one scrape."""
    from securetcp import TCPServer
    from securetcp.metrics import StatsCollector
    from securetcp.tcpserver import ServerStats

    readings = iter([100, 90, 120])

    class Racing(TCPServer):
        @property
        def stats(self) -> ServerStats:
            n = next(readings)
            return ServerStats(
                accepted=1, active=1, handshakes=1, rejected=0,
                bytes_received=n, bytes_sent=n, failures={},
            )  # fmt: skip

    collector = StatsCollector({"s": Racing()})

    def bytes_in() -> float:
        for family in collector.collect():
            if family.name == "securetcp_bytes_received":
                return float(family.samples[0].value)
        raise AssertionError("no securetcp_bytes_received")

    assert [bytes_in(), bytes_in(), bytes_in()] == [100, 100, 120]
