"""`securetcp probe` against real servers, one for each way a TLS endpoint can be broken.

The servers are securetcp TCPServers (or, for certificates TLSConfig
refuses to serve, a server on a plain `ssl.SSLContext`) on their own event
loop in a background thread; `securetcp probe --json` runs as a real process
against them and its JSON is checked field by field.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from securetcp import TCPServer, TLSConfig
from securetcp.iostream import IOStream, StreamClosedError
from securetcp.probe import FAILURE_KINDS, parse_target, probe

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
NOW = datetime.datetime.now(datetime.timezone.utc)


class Echo(TCPServer):
    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            while True:
                await stream.write(await stream.read_bytes(65536, partial=True))
        except StreamClosedError:
            pass


class NotTLS(TCPServer):
    """A plain-text server that answers anything with an HTTP error."""

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            await stream.read_bytes(1, partial=True)
            await stream.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        except StreamClosedError:
            pass
        stream.close()


class Hangup(TCPServer):
    """Closes every connection at once, before any byte."""

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        stream.close()


class ThreadedServer:
    """Run a TCPServer on its own loop in a thread; `port` once started."""

    def __init__(self, server: TCPServer, host: str = HOST) -> None:
        self.server = server
        self.host = host
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server.listen(0, self.host)
            self.port = self.server.sockets[0].getsockname()[1]
        finally:
            self._ready.set()
        await self._stop.wait()
        await self.server.close(timeout=5)

    def call(self, function: Any) -> Any:
        """Run `function()` on the server's loop and return its result."""
        assert self._loop is not None
        done: Any = asyncio.run_coroutine_threadsafe(_call(function), self._loop)
        return done.result(10)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(10) and self.port, "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def _call(function: Any) -> Any:
    return function()


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port whose connections complete in the kernel but are never answered."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, held meanwhile
    (a port released after binding may be taken by someone who listens)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe")
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    other = trustme.CA()
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other_ca"]))

    def write(name: str, leaf: trustme.LeafCert) -> None:
        files[name] = d / f"{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(files[name]))

    write("server", intermediate.issue_cert("localhost", "127.0.0.1"))
    write("expired", ca.issue_cert("localhost", not_after=NOW - datetime.timedelta(days=3)))
    future = NOW + datetime.timedelta(days=3)
    write("future", ca.issue_cert("localhost", not_before=future))
    write("client", ca.issue_cert("client.example", common_name="client"))
    write("stranger", other.issue_cert("stranger.example", common_name="stranger"))
    files["weak"] = d / "weak.pem"
    files["weak"].write_bytes(weak_leaf(ca))
    self_signed = trustme.CA()  # a CA certificate used as the leaf: self-signed
    files["self_signed"] = d / "self-signed.pem"
    files["self_signed"].write_bytes(
        self_signed.private_key_pem.bytes() + self_signed.cert_pem.bytes()
    )
    return files


def weak_leaf(ca: trustme.CA) -> bytes:
    """Key and certificate for localhost with a 1024-bit RSA key, which clients refuse."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = rsa.generate_private_key(65537, 1024)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def context_server(certfile: Path) -> Echo:
    """A server on a plain SSLContext: TLSConfig refuses to serve broken certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets it load even a 1024-bit key
    context.load_cert_chain(str(certfile))
    return Echo(ssl_options=context)


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "securetcp", "probe", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result, json.loads(result.stdout)


def test_a_good_server(certs: dict[str, Path]) -> None:
    tls = TLSConfig(certs["server"], alpn_protocols=["h2", "http/1.1"])
    with ThreadedServer(Echo(ssl_options=tls)) as running:
        target = f"{HOST}:{running.port}"
        result, out = run_probe(target, "--servername", "localhost", "--ca", str(certs["ca"]),
                                "--alpn", "h2,http/1.1")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert out["host"] == HOST and out["port"] == running.port
        assert out["server_name"] == "localhost" and out["address"] == target
        assert out["ok"] is True and out["verified"] is True and out["failure"] is None
        assert out["tls"] == {
            "protocol": "TLSv1.3",
            "cipher": out["tls"]["cipher"],
            "cipher_bits": out["tls"]["cipher_bits"],
            "group": "X25519",
            "alpn": "h2",
            "session_ticket": True,
            "client_certificate_requested": None,  # not visible in TLS 1.3
        }
        assert out["tls"]["cipher"].startswith("TLS_") and out["tls"]["cipher_bits"] >= 128
        assert out["chain_complete"] is True
        assert len(out["chain"]) == 2
        assert out["chain"][0]["subject_alt_names"]["dns"] == ["localhost"]
        assert out["chain"][1]["basic_constraints"]["ca"] is True
        assert out["chain"][0]["issuer"] == out["chain"][1]["subject"]  # leaf, then intermediate
        assert out["chain"][0]["days_left"] > 300

        tls12, out12 = run_probe(target, "--servername", "localhost", "--ca", str(certs["ca"]),
                                 "--tls1.2")  # fmt: skip
        assert tls12.returncode == 0
        assert out12["tls"]["protocol"] == "TLSv1.2" and out12["tls"]["group"] == "X25519"
        assert out12["tls"]["client_certificate_requested"] is False
        assert out12["tls"]["alpn"] is None

        text = subprocess.run(
            [sys.executable, "-m", "securetcp", "probe", target, "--servername", "localhost",
             "--ca", str(certs["ca"])],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert text.returncode == 0
        assert "protocol:   TLSv1.3" in text.stdout and "verify:     OK" in text.stdout
        assert "chain as sent:\n    1. " in text.stdout


def expect_failure(args: list[str], kind: str, phrase: str, *, status: int = 1) -> dict[str, Any]:
    result, out = run_probe(*args)
    assert result.returncode == status, result.stderr
    assert out["ok"] is False
    assert out["failure"]["kind"] == kind, out["failure"]
    assert phrase in out["failure"]["message"], out["failure"]
    line = result.stderr.strip()
    assert "\n" not in line and line == f"securetcp: {out['failure']['message']}"
    return out


def test_refused_and_timeout() -> None:
    with refusing_port() as port:
        out = expect_failure([f"{HOST}:{port}"], "refused", "refused the connection")
    assert out["tls"] is None and out["chain"] == []
    with silent_listener() as port:
        expect_failure([f"{HOST}:{port}", "--timeout", "0.5"], "timeout", "sent no TLS reply")


def test_a_server_that_does_not_speak_tls() -> None:
    with ThreadedServer(NotTLS()) as running:
        expect_failure([f"{HOST}:{running.port}"], "not_tls", "HTTP/1.1 400 Bad Request")
    with ThreadedServer(Hangup()) as running:
        expect_failure([f"{HOST}:{running.port}"], "closed", "without replying")


@pytest.mark.parametrize(
    ("name", "extra", "kind", "phrase"),
    [
        ("server", ["--servername", "example.org"], "hostname_mismatch", "'example.org'"),
        ("expired", ["--servername", "localhost"], "expired", "certificate has expired"),
        ("future", ["--servername", "localhost"], "not_yet_valid", "not yet valid"),
        ("self_signed", [], "self_signed", "self-signed certificate"),
        ("weak", ["--servername", "localhost"], "weak_key", "key too weak"),
    ],
)
def test_certificates_that_do_not_verify(
    certs: dict[str, Path], name: str, extra: list[str], kind: str, phrase: str
) -> None:
    server = context_server(certs[name])
    with ThreadedServer(server) as running:
        args = [f"{HOST}:{running.port}", "--ca", str(certs["ca"]), *extra]
        out = expect_failure(args, kind, phrase)
        assert out["verified"] is False
        # Looked at again without verifying: what the server offers anyway.
        assert out["tls"]["protocol"] == "TLSv1.3" and len(out["chain"]) >= 1


def test_a_ca_we_do_not_trust(certs: dict[str, Path]) -> None:
    with ThreadedServer(Echo(ssl_options=TLSConfig(certs["server"]))) as running:
        target = f"{HOST}:{running.port}"
        out = expect_failure([target, "--servername", "localhost"], "untrusted", "local issuer")
        assert len(out["chain"]) == 2
        expect_failure(
            [target, "--servername", "localhost", "--ca", str(certs["other_ca"])],
            "untrusted",
            "intermediate",
        )


def test_protocol_version_and_handshake_failure(certs: dict[str, Path]) -> None:
    modern = TLSConfig(certs["server"], profile="modern")
    with ThreadedServer(Echo(ssl_options=modern)) as running:
        args = [f"{HOST}:{running.port}", "--ca", str(certs["ca"]), "--servername", "localhost"]
        expect_failure([*args, "--tls1.2"], "protocol_version", "no common protocol version")
        assert running.call(lambda: running.server.stats.failures) == {"protocol": 1}
    strict = TLSConfig(
        certs["server"], sni={"other.example": str(certs["client"])}, sni_strict=True
    )
    with ThreadedServer(Echo(ssl_options=strict)) as running:
        args = [f"{HOST}:{running.port}", "--ca", str(certs["ca"]), "--servername", "nope.example"]
        expect_failure(args, "handshake_failure", "does not serve the name 'nope.example'")


@pytest.mark.parametrize("version", ["--tls1.3", "--tls1.2"])
def test_client_certificates(certs: dict[str, Path], version: str) -> None:
    tls = TLSConfig(certs["server"], client_auth="required", client_ca=certs["ca"])
    with ThreadedServer(Echo(ssl_options=tls)) as running:
        args = [f"{HOST}:{running.port}", "--ca", str(certs["ca"]), version]
        # TLS 1.3 says so only after the handshake, when the client reads.
        expect_failure(args, "client_certificate_required", "requires a client certificate")
        expect_failure(
            [*args, "--cert", str(certs["stranger"])],
            "client_certificate_rejected",
            "rejected our client certificate",
        )
        result, out = run_probe(*args, "--cert", str(certs["client"]))
        assert result.returncode == 0, out
        if version == "--tls1.2":
            assert out["tls"]["client_certificate_requested"] is True
        failures = running.call(lambda: running.server.stats.failures)
        assert failures == {"certificate": 2}


def test_usage_errors_exit_2(certs: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client, stranger = str(certs["client"]), str(certs["stranger"])
    for args, phrase in [
        (["127.0.0.1:1", "--cert", client, "--key", stranger], "does not match the certificate"),
        (["127.0.0.1:http"], "port 'http' is not a number"),
        (["127.0.0.1:70000"], "out of range"),
        (["127.0.0.1:1", "--ca", "/nonexistent/ca.pem"], "--ca: certificate file /nonexistent"),
        (["127.0.0.1:1", "--cert", "/nonexistent/c.pem"], "/nonexistent/c.pem"),
        (["127.0.0.1:1", "--tls1.2", "--tls1.3"], "not allowed with argument"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "securetcp", "probe", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert phrase in result.stderr and "Traceback" not in result.stderr


def test_parse_target() -> None:
    assert parse_target("example.org") == ("example.org", 443)
    assert parse_target("example.org:8443") == ("example.org", 8443)
    assert parse_target("[::1]:8443") == ("::1", 8443)
    assert parse_target("::1") == ("::1", 443)
    for bad in ("", ":80", "[::1", "host:0"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_every_failure_kind_is_documented() -> None:
    from securetcp.cli.probe import EXAMPLES

    for kind in FAILURE_KINDS:
        assert kind in EXAMPLES


def test_probe_over_ipv6(certs: dict[str, Path]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        running = ThreadedServer(Echo(ssl_options=TLSConfig(certs["server"])), host="::1")
        running.__enter__()
    except (OSError, AssertionError):
        pytest.skip("no ::1")
    try:
        result = probe("::1", running.port, server_name="localhost", ca=certs["ca"], timeout=5)
        assert result.ok and result.address == f"[::1]:{running.port}"
    finally:
        running.__exit__()
