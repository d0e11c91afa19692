"""The badssl harness seen by Python's ssl module: every scenario, exactly its outcome.

One harness (the plugin's session-scoped `badssl_server`) serves the whole
module; each test is one short blocking client connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from securetcp.services.badssl import (
    EXPECT_VALUES,
    SCENARIOS,
    VERIFY_CODE_OUTCOMES,
    BadSSLServer,
    classify_error,
    parse_client_hello_sni,
)
from securetcp.testing import BadSSLTestServer

REQUIRED = [
    *("good", "expired", "not-yet-valid", "wrong-host", "self-signed", "untrusted-root"),
    *("incomplete-chain", "reversed-chain", "expired-intermediate", "long-chain", "no-san"),
    *("wildcard", "name-constraints", "bad-signature", "wrong-eku", "client-cert-required"),
    *("client-cert-optional", "tls1.2-only", "tls1.3-only", "rsa2048", "rsa4096"),
    *("ecdsa-p256", "ecdsa-p384", "ed25519", "sha384", "many-sans", "idn", "revoked"),
    *("alpn-h2", "no-alpn", "weak-rsa1024", "tls1.0-only", "tls1.1-only"),
]

# What OpenSSL says for each verify code (1.1.1 wrote "self signed", 3.x "self-signed").
VERIFY_MESSAGES = {
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self.signed certificate",
    19: "self.signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    23: "certificate revoked",
    26: "unsuitable certificate purpose|unsupported certificate purpose",
    48: "excluded subtree violation",
    62: "Hostname mismatch",
    66: "EE certificate key too weak",
    68: "CA signature digest algorithm too weak",
}
# The OpenSSL reason of the SSLError for outcomes that are TLS alerts, not verify codes.
ALERT_REASONS = {
    "client_certificate_required": "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "protocol_version": "TLSV1_ALERT_PROTOCOL_VERSION",
    "handshake_failure": "SSLV3_ALERT_HANDSHAKE_FAILURE",
}


@dataclasses.dataclass
class Seen:
    """What one Python client connection saw."""

    error: BaseException | None = None
    version: str | None = None
    alpn: str | None = None
    cert: x509.Certificate | None = None
    body: bytes = b""

    @property
    def outcome(self) -> str:
        return classify_error(self.error)


def connect(
    port: int,
    server_name: str,
    context: ssl.SSLContext,
    host: str = "127.0.0.1",
) -> Seen:
    """Handshake, send an HTTP request, read the answer; record what happened."""
    seen = Seen()
    try:
        with (
            socket.create_connection((host, port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            seen.version, seen.alpn = tls.version(), tls.selected_alpn_protocol()
            der = tls.getpeercert(binary_form=True)
            seen.cert = x509.load_der_x509_certificate(der) if der else None
            try:
                tls.sendall(b"GET / HTTP/1.0\r\nHost: badssl\r\n\r\n")
            except (ssl.SSLError, OSError) as e:
                # TLS 1.3 client auth: the server may have refused us already; its
                # alert still waits to be read.
                write_error: BaseException | None = e
            else:
                write_error = None
            while chunk := tls.recv(65536):  # the TLS 1.3 client-auth alert comes here
                seen.body += chunk
            if write_error is not None:
                raise write_error
    except (ssl.SSLError, OSError) as e:
        seen.error = e
    return seen


def default_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def assert_outcome(seen: Seen, name: str, expected: str) -> None:
    """`seen` is exactly `expected`: the error class and verify code or alert, or a reply."""
    scenario = SCENARIOS[name]
    assert seen.outcome == expected, f"{name}: {seen.error!r}"
    if expected == "ok":
        assert seen.error is None
        assert seen.body.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"badssl {name}: handshake completed".encode() in seen.body
    elif expected in ALERT_REASONS:
        assert type(seen.error) is ssl.SSLError
        assert seen.error.reason == ALERT_REASONS[expected]
    else:
        assert isinstance(seen.error, ssl.SSLCertVerificationError)
        code = 23 if expected == "revoked" else scenario.verify_code
        assert seen.error.verify_code == code
        assert re.search(VERIFY_MESSAGES[code], seen.error.verify_message)


# -- the catalogue ----------------------------------------------------------------------------


def test_catalogue_has_every_required_scenario_with_known_outcomes() -> None:
    assert set(REQUIRED) <= set(SCENARIOS)
    assert len(SCENARIOS) >= 37
    for scenario in SCENARIOS.values():
        assert scenario.expect in EXPECT_VALUES, scenario.name
        assert scenario.description
        for client in ("python", "openssl", "gnutls", "curl"):
            assert scenario.expect_for(client) in EXPECT_VALUES
        if scenario.verify_code is not None:
            assert VERIFY_CODE_OUTCOMES[scenario.verify_code] == scenario.expect
    assert SCENARIOS["revoked"].expect_with_crl == "revoked"
    with pytest.raises(ValueError, match="unknown client"):
        SCENARIOS["good"].expect_for("wget")


# What an OpenSSL build or system policy may refuse to serve even at security level 0.
LEGACY = {"tls1.0-only", "tls1.1-only", "weak-rsa1024", "sha1-leaf"}


def served(badssl: BadSSLTestServer, name: str) -> int:
    """The scenario's port, or skip the test when this machine cannot serve it."""
    reason = badssl.badssl.unavailable.get(name)
    if reason is not None:
        pytest.skip(f"{name} unavailable here: {reason}")
    return badssl.port(name)


def test_every_scenario_is_served_or_says_why_not(badssl_server: BadSSLTestServer) -> None:
    unavailable = badssl_server.badssl.unavailable
    assert set(unavailable) <= LEGACY
    assert all("OpenSSL" in reason for reason in unavailable.values())
    served_names = [s.name for s in badssl_server.badssl.scenarios]
    assert served_names == [n for n in SCENARIOS if n not in unavailable]
    listed = {e["name"] for e in badssl_server.badssl.describe()["unavailable"]}
    assert listed == set(unavailable)
    ports = {badssl_server.port(name) for name in served_names}
    assert len(ports) == len(served_names)


# -- Python's ssl, scenario by scenario -------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_python_client_sees_the_declared_outcome(
    badssl_server: BadSSLTestServer, name: str
) -> None:
    scenario = SCENARIOS[name]
    port = served(badssl_server, name)
    seen = connect(port, scenario.server_name, default_context(badssl_server.ca_file))
    assert badssl_server.expect(name) == scenario.expect
    assert_outcome(seen, name, scenario.expect)


def test_revoked_is_revoked_for_a_client_that_loads_the_crl(
    badssl_server: BadSSLTestServer,
) -> None:
    context = default_context(badssl_server.ca_file)
    context.load_verify_locations(badssl_server.crl_file)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    seen = connect(badssl_server.port("revoked"), "localhost", context)
    assert_outcome(seen, "revoked", "revoked")
    # The CRL lists exactly that certificate, and is signed by the CA clients trust.
    served = _served(badssl_server, "revoked").cert
    assert served is not None
    crl = x509.load_pem_x509_crl(Path(badssl_server.crl_file).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(badssl_server.ca_file).read_bytes())
    assert [r.serial_number for r in crl] == [served.serial_number]
    assert crl.issuer == ca.subject == served.issuer
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["client-cert-required", "client-cert-optional"])
def test_client_certificate_from_the_harness_is_accepted(
    badssl_server: BadSSLTestServer, name: str
) -> None:
    context = default_context(badssl_server.ca_file)
    context.load_cert_chain(badssl_server.client_cert_file, badssl_server.client_key_file)
    assert_outcome(connect(badssl_server.port(name), "localhost", context), name, "ok")


def test_a_client_refusing_tls13_fails_on_the_tls13_only_scenario(
    badssl_server: BadSSLTestServer,
) -> None:
    context = default_context(badssl_server.ca_file)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    seen = connect(badssl_server.port("tls1.3-only"), "localhost", context)
    assert seen.outcome == "protocol_version"


def _served(badssl_server: BadSSLTestServer, name: str, **context_options: object) -> Seen:
    seen = connect(
        badssl_server.port(name),
        SCENARIOS[name].server_name,
        default_context(badssl_server.ca_file),
    )
    assert seen.error is None, repr(seen.error)
    assert seen.cert is not None
    return seen


@pytest.mark.parametrize(
    ("name", "key_type", "size"),
    [
        ("rsa2048", rsa.RSAPublicKey, 2048),
        ("rsa4096", rsa.RSAPublicKey, 4096),
        ("ecdsa-p256", ec.EllipticCurvePublicKey, 256),
        ("ecdsa-p384", ec.EllipticCurvePublicKey, 384),
        ("ed25519", ed25519.Ed25519PublicKey, None),
    ],
)
def test_key_scenarios_serve_that_key(
    badssl_server: BadSSLTestServer, name: str, key_type: type, size: int | None
) -> None:
    key = _served(badssl_server, name).cert.public_key()  # type: ignore[union-attr]
    assert isinstance(key, key_type)
    if size is not None:
        assert key.key_size == size  # type: ignore[attr-defined]


def test_certificate_details(badssl_server: BadSSLTestServer) -> None:
    sha384 = _served(badssl_server, "sha384").cert
    assert isinstance(sha384.signature_hash_algorithm, hashes.SHA384)  # type: ignore[union-attr]
    many = _served(badssl_server, "many-sans").cert
    sans = many.extensions.get_extension_for_class(x509.SubjectAlternativeName).value  # type: ignore[union-attr]
    assert len(sans) == 1000
    idn = _served(badssl_server, "idn").cert
    names = idn.extensions.get_extension_for_class(x509.SubjectAlternativeName).value  # type: ignore[union-attr]
    assert names.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.idn.badssl.test"]
    assert "bücher".encode("idna") == b"xn--bcher-kva"
    no_san = _served(badssl_server, "no-san").cert
    with pytest.raises(x509.ExtensionNotFound):
        no_san.extensions.get_extension_for_class(x509.SubjectAlternativeName)  # type: ignore[union-attr]


def test_protocol_and_alpn_scenarios(badssl_server: BadSSLTestServer) -> None:
    assert _served(badssl_server, "tls1.2-only").version == "TLSv1.2"
    assert _served(badssl_server, "tls1.3-only").version == "TLSv1.3"
    assert _served(badssl_server, "alpn-h2").alpn == "h2"
    assert _served(badssl_server, "no-alpn").alpn is None
    assert _served(badssl_server, "good").version == "TLSv1.3"


def test_the_wildcard_covers_one_label_only(badssl_server: BadSSLTestServer) -> None:
    context = default_context(badssl_server.ca_file)
    port = badssl_server.port("wildcard")
    assert connect(port, "other.badssl.test", context).outcome == "ok"
    assert connect(port, "a.b.badssl.test", context).outcome == "hostname_mismatch"
    assert connect(port, "badssl.test", context).outcome == "hostname_mismatch"


def test_a_request_typed_without_crlf_is_answered(badssl_server: BadSSLTestServer) -> None:
    context = badssl_server.client_context()
    with (
        socket.create_connection((badssl_server.host, badssl_server.port("good")), 10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.0\n\n")  # what s_client sends without -crlf
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"expects ok\n")


async def test_asyncio_clients_see_the_same(badssl_server: BadSSLTestServer) -> None:
    context = badssl_server.client_context()
    reader, writer = await asyncio.open_connection(
        badssl_server.host, badssl_server.port("good"), ssl=context, server_hostname="localhost"
    )
    writer.write(b"ping\n")
    assert await reader.readexactly(5) == b"ping\n"  # not HTTP: echoed
    writer.close()
    await writer.wait_closed()
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        await asyncio.open_connection(
            badssl_server.host,
            badssl_server.port("expired"),
            ssl=context,
            server_hostname="localhost",
        )
    assert caught.value.verify_code == 10


# -- the SNI port -----------------------------------------------------------------------------

SNI_CHECKED = [
    "good",
    "expired",
    "wrong-host",
    "self-signed",
    "incomplete-chain",
    "no-san",
    "wildcard",
    "wildcard-not-covered",
    "idn",
    "client-cert-required",
    "tls1.0-only",
    "tls1.3-only",
    "static-rsa",
    "alpn-h2",
]


@pytest.fixture(scope="module")
def sni_harness() -> object:
    with BadSSLTestServer([*SNI_CHECKED, "ip-san"], sni_port=0) as harness:
        yield harness


@pytest.mark.parametrize("name", SNI_CHECKED)
def test_sni_port_serves_each_scenario_by_name(sni_harness: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    assert sni_harness.sni_port is not None
    seen = connect(sni_harness.sni_port, scenario.sni_name(), default_context(sni_harness.ca_file))
    assert_outcome(seen, name, scenario.expect)


def test_sni_port_names_and_refusals(sni_harness: BadSSLTestServer) -> None:
    description = sni_harness.badssl.describe()
    assert description["sni_port"] == sni_harness.sni_port
    by_name = {e["name"]: e for e in description["scenarios"]}
    assert by_name["good"]["sni_name"] == "good.badssl.test"
    assert by_name["idn"]["sni_name"] == "xn--bcher-kva.idn.badssl.test"
    assert "sni_name" not in by_name["ip-san"]  # an IP address cannot be an SNI name
    context = default_context(sni_harness.ca_file)
    assert sni_harness.sni_port is not None
    for unknown in ("nothing.badssl.test", "example.org", "ip-san.badssl.test"):
        seen = connect(sni_harness.sni_port, unknown, context)
        assert isinstance(seen.error, (ssl.SSLEOFError, ConnectionResetError)), unknown
    with socket.create_connection(("127.0.0.1", sni_harness.sni_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: good.badssl.test\r\n\r\n")  # not TLS
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with our request unread
    refusals = sni_harness.badssl.sni_refusals
    assert refusals.get("no_scenario") == 3 and refusals.get("not_tls") == 1
    context.check_hostname = False  # a client that sends no SNI at all
    with (
        socket.create_connection(("127.0.0.1", sni_harness.sni_port), timeout=10) as sock,
        pytest.raises((ssl.SSLEOFError, ConnectionResetError)),
    ):
        context.wrap_socket(sock)


# -- parse_client_hello_sni -------------------------------------------------------------------


@functools.cache
def client_hello(server_name: str | None) -> bytes:
    """The first TLS record a Python client sends to `server_name`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_parse_client_hello_sni() -> None:
    assert parse_client_hello_sni(client_hello("Expired.BadSSL.test")) == "expired.badssl.test"
    assert parse_client_hello_sni(client_hello(None)) is None
    hello = client_hello("good.badssl.test")
    for broken in (b"", b"GET / HTTP/1.1\r\n\r\n", hello[:60], hello[:5] + b"\x02" + hello[6:]):
        with pytest.raises(ValueError):
            parse_client_hello_sni(broken)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=700), st.binary(min_size=1, max_size=8))
def test_parse_client_hello_sni_on_damaged_hellos_only_raises_value_error(
    at: int, garbage: bytes
) -> None:
    hello = client_hello("x.badssl.test")
    for damaged in (hello[:at], hello[:at] + garbage + hello[at + len(garbage) :]):
        try:
            name = parse_client_hello_sni(damaged)
        except ValueError:
            continue
        assert name is None or isinstance(name, str)


# -- lifecycle --------------------------------------------------------------------------------


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown scenario.*nope"):
        BadSSLServer(["good", "nope"])


async def test_base_port_and_close_leave_nothing_behind(no_fd_leak: None) -> None:
    names = list(SCENARIOS)
    server = BadSSLServer(["expired", "good"])
    # "good" is scenario 0 of the catalogue and "expired" 1: two consecutive free
    # ports are needed, and the machine's other clients may take one meanwhile.
    for _ in range(10):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            server.base_port = probe.getsockname()[1]
        try:
            await server.start()
            break
        except OSError as e:
            error = e
    else:
        await server.close()
        pytest.skip(f"no two consecutive free ports found: {error}")
    base = server.base_port
    directory = server.directory
    assert server.port("good") == base + names.index("good")
    assert server.port("expired") == base + names.index("expired")
    assert {p.name for p in directory.iterdir()} >= {"ca.pem", "crl.pem", "client.pem"}
    assert oct(os.stat(directory / "good.key").st_mode & 0o777) == "0o600"
    loop = asyncio.get_running_loop()
    seen = await loop.run_in_executor(
        None, connect, server.port("good"), "localhost", default_context(str(server.ca_file))
    )
    assert seen.outcome == "ok"
    await server.close()
    assert not directory.exists()
    with pytest.raises(KeyError, match="not served"):
        server.port("good")


# -- the command ------------------------------------------------------------------------------


def badssl_command(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "securetcp", "badssl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_json_serves_what_it_prints_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca_out = tmp_path / "badssl-ca.pem"
    proc = badssl_command(
        "--only", "good,expired,wrong-host", "--json", "--ca-out", str(ca_out), "--sni-port", "0"
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        description = json.loads(line)
        assert description["ca"] == str(ca_out) and ca_out.is_file()
        assert description["host"] == "127.0.0.1"
        assert isinstance(description["sni_port"], int)
        entries = description["scenarios"]
        assert [e["name"] for e in entries] == ["good", "expired", "wrong-host"]
        for entry in entries:
            assert {"name", "port", "server_name", "expect", "description", "clients"} <= set(entry)
            context = default_context(str(ca_out))
            seen = connect(entry["port"], entry["server_name"], context)
            assert_outcome(seen, entry["name"], entry["expect"])
            seen = connect(description["sni_port"], entry["sni_name"], context)
            assert_outcome(seen, entry["name"], entry["expect"])
        temporary = Path(description["crl"]).parent
        assert temporary.is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not temporary.exists()  # the generated keys are gone with the server


def test_cli_table_and_sigint() -> None:
    proc = badssl_command("--only", "good,tls1.0-only")
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(7)]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    text = "".join(lines)
    assert "SCENARIO" in text and "PYTHON" in text and "GNUTLS" in text
    assert re.search(r"^good\s+\d+\s+localhost\s+ok\s+ok\s+ok\s", text, re.M)
    assert re.search(r"^tls1\.0-only\s+\d+\s+localhost\s+protocol_version\s", text, re.M)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "good,nope"], "unknown scenario nope"),
        (["--base-port", "70000"], "--base-port must be a port number"),
    ],
)
def test_cli_usage_errors_are_one_line(args: list[str], message: str) -> None:
    proc = badssl_command(*args)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and message in err
    assert out == ""
