"""The badssl harness seen by real peers: OpenSSL's s_client, GnuTLS's gnutls-cli, curl.

For every scenario each peer must see exactly what the scenario declares for
it (`Scenario.expect_for`). One harness serves the whole run (the plugin's
session-scoped `badssl_server`); each check is one subprocess with a short
timeout, sending an HTTP request and reading the scenario's one-line answer.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

import pytest
from test_badssl import served

from securetcp.services.badssl import SCENARIOS, VERIFY_CODE_OUTCOMES, Scenario
from securetcp.testing import BadSSLTestServer

OPENSSL = shutil.which("openssl")
GNUTLS = shutil.which("gnutls-cli")
CURL = shutil.which("curl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
needs_gnutls = pytest.mark.skipif(GNUTLS is None, reason="gnutls-cli (gnutls-bin) not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")

REQUEST = b"GET / HTTP/1.0\r\nHost: badssl\r\n\r\n"
TIMEOUT = 10


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def run(command: list[str]) -> tuple[int, str]:
    """Run a peer with the HTTP request on stdin; (exit status, stdout + stderr)."""
    done = subprocess.run(command, input=REQUEST, capture_output=True, timeout=TIMEOUT)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def answered(scenario: Scenario, output: str) -> bool:
    return f"badssl {scenario.name}: handshake completed" in output


# -- openssl s_client ---------------------------------------------------------------------

# OpenSSL's words for outcomes that are alerts or handshake errors, not verify codes.
OPENSSL_ERRORS = [
    ("alert certificate required", "client_certificate_required"),
    ("alert protocol version", "protocol_version"),
    ("unsupported protocol", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("legacy sigalg disallowed", "handshake_failure"),
    ("alert handshake failure", "handshake_failure"),
    ("no shared cipher", "handshake_failure"),
]


def openssl_outcome(scenario: Scenario, status: int, output: str) -> str:
    """What `s_client -verify_return_error` saw, from its exit status and output."""
    codes = re.findall(r"Verify return code: (\d+) ", output)
    code = int(codes[-1]) if codes else None
    if code:
        # -verify_return_error: a failed verification must abort the handshake.
        assert status != 0, output
        return VERIFY_CODE_OUTCOMES.get(code, f"verify code {code}")
    for words, outcome in OPENSSL_ERRORS:
        if words in output:
            assert status != 0, output
            return outcome
    if status == 0 and code == 0 and answered(scenario, output):
        return "ok"
    return f"unrecognised (exit {status}): {output[-400:]}"


def s_client(
    badssl: BadSSLTestServer, scenario: Scenario, *extra: str, port: int | None = None
) -> tuple[int, str]:
    assert OPENSSL is not None
    name = scenario.server_name
    check = ["-verify_ip", name] if is_ip(name) else ["-verify_hostname", name, "-servername", name]
    return run(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"{badssl.host}:{badssl.port(scenario.name) if port is None else port}",
            "-CAfile",
            badssl.ca_file,
            "-verify_return_error",
            *check,
            "-ign_eof",  # read the answer to the end (the server closes after it)
            *extra,
        ]
    )


@needs_openssl
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_openssl_s_client(badssl_server: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    served(badssl_server, name)
    status, output = s_client(badssl_server, scenario)
    assert openssl_outcome(scenario, status, output) == scenario.expect_for("openssl")
    if scenario.verify_code is not None and scenario.expect_for("openssl") != "ok":
        assert f"Verify return code: {scenario.verify_code} (" in output


@needs_openssl
def test_openssl_with_the_crl_sees_revoked(badssl_server: BadSSLTestServer) -> None:
    revoked = SCENARIOS["revoked"]
    status, output = s_client(badssl_server, revoked, "-CRL", badssl_server.crl_file, "-crl_check")
    assert openssl_outcome(revoked, status, output) == "revoked"
    assert "Verify return code: 23 (certificate revoked)" in output


@needs_openssl
@pytest.mark.parametrize("name", ["client-cert-required", "client-cert-optional"])
def test_openssl_with_the_client_certificate(badssl_server: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    status, output = s_client(
        badssl_server,
        scenario,
        "-cert",
        badssl_server.client_cert_file,
        "-key",
        badssl_server.client_key_file,
    )
    assert openssl_outcome(scenario, status, output) == "ok"


@needs_openssl
def test_openssl_alpn(badssl_server: BadSSLTestServer) -> None:
    status, output = s_client(badssl_server, SCENARIOS["alpn-h2"], "-alpn", "h2,http/1.1")
    assert status == 0 and "ALPN protocol: h2" in output
    status, output = s_client(badssl_server, SCENARIOS["no-alpn"], "-alpn", "h2,http/1.1")
    assert status == 0 and "No ALPN negotiated" in output


# -- gnutls-cli -----------------------------------------------------------------------------

# gnutls-cli's "- Status:" sentences and alerts, and the outcome each one means.
GNUTLS_WORDS = [
    ("uses expired certificate", "expired"),
    ("uses not yet valid certificate", "not_yet_valid"),
    ("name in the certificate does not match", "hostname_mismatch"),
    ("issuer is unknown", "untrusted"),
    ("violates the signer's constraints", "name_constraints"),
    ("signature in the certificate is invalid", "bad_signature"),
    ("does not match the intended purpose", "wrong_purpose"),
    ("uses insecure algorithm", "weak_signature"),
    ("chain is revoked", "revoked"),
    ("Certificate is required", "client_certificate_required"),
    ("protocol version", "protocol_version"),
    ("Handshake failed", "handshake_failure"),
]


def gnutls_outcome(scenario: Scenario, status: int, output: str) -> str:
    """What gnutls-cli saw, from its exit status, status line and alerts.

    (It leaves when its input ends, often before the server's answer arrives,
    so a completed handshake with a trusted certificate is the "ok".)
    """
    statuses = re.findall(r"- Status: (.*)", output)
    trusted = statuses == ["The certificate is trusted. "]
    if status == 0 and trusted and "- Handshake was completed" in output:
        return "ok"
    for words, outcome in GNUTLS_WORDS:
        if words in output:
            assert status != 0, output
            return outcome
    return f"unrecognised (exit {status}): {output[-400:]}"


def gnutls_cli(
    badssl: BadSSLTestServer, scenario: Scenario, *extra: str, port: int | None = None
) -> tuple[int, str]:
    assert GNUTLS is not None
    name = scenario.server_name
    sni = [] if is_ip(name) else ["--sni-hostname", name]
    return run(
        [
            GNUTLS,
            "--x509cafile",
            badssl.ca_file,
            "--port",
            str(badssl.port(scenario.name) if port is None else port),
            "--verify-hostname",
            name,
            *sni,
            *extra,
            badssl.host,
        ]
    )


@needs_gnutls
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gnutls_cli(badssl_server: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    served(badssl_server, name)
    status, output = gnutls_cli(badssl_server, scenario)
    assert gnutls_outcome(scenario, status, output) == scenario.expect_for("gnutls")


@needs_gnutls
def test_gnutls_with_the_crl_sees_revoked(badssl_server: BadSSLTestServer) -> None:
    revoked = SCENARIOS["revoked"]
    status, output = gnutls_cli(badssl_server, revoked, "--x509crlfile", badssl_server.crl_file)
    assert gnutls_outcome(revoked, status, output) == "revoked"


@needs_gnutls
def test_gnutls_with_the_client_certificate(badssl_server: BadSSLTestServer) -> None:
    scenario = SCENARIOS["client-cert-required"]
    status, output = gnutls_cli(
        badssl_server,
        scenario,
        "--x509certfile",
        badssl_server.client_cert_file,
        "--x509keyfile",
        badssl_server.client_key_file,
    )
    assert gnutls_outcome(scenario, status, output) == "ok"


# -- curl -------------------------------------------------------------------------------------

CURL_SCENARIOS = [
    "good",
    "expired",
    "not-yet-valid",
    "wrong-host",
    "self-signed",
    "untrusted-root",
    "incomplete-chain",
    "name-constraints",
    "bad-signature",
    "wrong-eku",
    "weak-rsa1024",
    "revoked",
    "client-cert-required",
    "tls1.0-only",
    "static-rsa",
    "wildcard",
    "ip-san",
    "idn",
    "alpn-h2",
    "no-alpn",
]
# curl's own words; certificate problems carry OpenSSL's verify message.
CURL_WORDS = [
    ("no alternative certificate subject name matches", "hostname_mismatch"),
    ("alert certificate required", "client_certificate_required"),
    ("legacy sigalg disallowed", "handshake_failure"),
    ("alert handshake failure", "handshake_failure"),
    ("alert protocol version", "protocol_version"),
]
OPENSSL_VERIFY_MESSAGES = {
    "certificate has expired": "expired",
    "certificate is not yet valid": "not_yet_valid",
    "self-signed certificate": "self_signed",
    "self signed certificate": "self_signed",
    "self-signed certificate in certificate chain": "untrusted",
    "self signed certificate in certificate chain": "untrusted",
    "unable to get local issuer certificate": "incomplete_chain",
    "excluded subtree violation": "name_constraints",
    "unsuitable certificate purpose": "wrong_purpose",
    "EE certificate key too weak": "weak_key",
    "CA signature digest algorithm too weak": "weak_signature",
    "certificate revoked": "revoked",
    "certificate signature failure": "bad_signature",
}


def curl_outcome(scenario: Scenario, status: int, output: str) -> str:
    if status == 0 and answered(scenario, output):
        return "ok"
    problem = re.search(r"SSL certificate problem: (.*)", output)
    if problem:
        assert status == 60, output
        return OPENSSL_VERIFY_MESSAGES.get(problem.group(1).strip(), problem.group(1))
    for words, outcome in CURL_WORDS:
        if words in output:
            return outcome
    if status == 55 and "Transport endpoint is not connected" in output:
        # The server closed (and, with curl's request unread, reset) the connection
        # right after the TLS 1.3 handshake, before curl read the alert.
        return "connection_reset"
    if status == 35:  # a TLS error curl does not describe further (e.g. "EVP lib")
        return "handshake_failure"
    return f"unrecognised (exit {status}): {output[-400:]}"


def curl(
    badssl: BadSSLTestServer,
    scenario: Scenario,
    *extra: str,
    port: int | None = None,
    name: str | None = None,
) -> tuple[int, str]:
    assert CURL is not None
    name = name or scenario.server_name
    port = badssl.port(scenario.name) if port is None else port
    resolve = [] if is_ip(name) else ["--resolve", f"{name}:{port}:{badssl.host}"]
    done = subprocess.run(
        [
            CURL,
            "-sS",
            "--max-time",
            str(TIMEOUT - 2),
            "--cacert",
            badssl.ca_file,
            *resolve,
            *extra,
            f"https://{name}:{port}/",
        ],
        capture_output=True,
        timeout=TIMEOUT,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


@needs_curl
@pytest.mark.parametrize("name", CURL_SCENARIOS)
def test_curl(badssl_server: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    served(badssl_server, name)
    status, output = curl(badssl_server, scenario)
    outcome = curl_outcome(scenario, status, output)
    if name == "client-cert-required" and outcome == "connection_reset":
        # curl 7.88 reports the refusal one of two ways, depending on timing:
        # (56) "tlsv13 alert certificate required" or (55) "getpeername() failed".
        return
    assert outcome == scenario.expect_for("curl")


@needs_curl
def test_curl_with_crl_and_client_certificate(badssl_server: BadSSLTestServer) -> None:
    revoked = SCENARIOS["revoked"]
    status, output = curl(badssl_server, revoked, "--crlfile", badssl_server.crl_file)
    assert curl_outcome(revoked, status, output) == "revoked"
    required = SCENARIOS["client-cert-required"]
    status, output = curl(
        badssl_server,
        required,
        "--cert",
        badssl_server.client_cert_file,
        "--key",
        badssl_server.client_key_file,
    )
    assert curl_outcome(required, status, output) == "ok"


# -- the SNI port, with the peers ---------------------------------------------------------------

SNI_PEER_SCENARIOS = ["good", "expired", "wrong-host", "tls1.2-only", "client-cert-required"]


@pytest.fixture(scope="module")
def sni_badssl() -> object:
    with BadSSLTestServer(SNI_PEER_SCENARIOS, sni_port=0) as harness:
        yield harness


@needs_curl
@pytest.mark.parametrize("name", SNI_PEER_SCENARIOS)
def test_curl_through_the_sni_port(sni_badssl: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    status, output = curl(sni_badssl, scenario, port=sni_badssl.sni_port, name=scenario.sni_name())
    expected = scenario.expect_for("curl")
    assert curl_outcome(scenario, status, output) == expected


@needs_gnutls
@pytest.mark.parametrize("name", SNI_PEER_SCENARIOS)
def test_gnutls_through_the_sni_port(sni_badssl: BadSSLTestServer, name: str) -> None:
    scenario = SCENARIOS[name]
    assert GNUTLS is not None
    status, output = run(
        [
            GNUTLS,
            "--x509cafile",
            sni_badssl.ca_file,
            "--port",
            str(sni_badssl.sni_port),
            "--verify-hostname",
            scenario.sni_name(),
            "--sni-hostname",
            scenario.sni_name(),
            sni_badssl.host,
        ]
    )
    assert gnutls_outcome(scenario, status, output) == scenario.expect_for("gnutls")


# -- the observed table, for the README and the issue -----------------------------------------


def observed_table() -> str:
    """Every client's observed outcome on every scenario, as a markdown table.

    A cell in bold differs from what the scenario declares for that client.
    """
    import ssl

    import test_badssl as python_client

    def cell(seen: str, declared: str) -> str:
        return f"`{seen}`" if seen == declared else f"**`{seen}`** (declared `{declared}`)"

    rows = [
        "| scenario | Python `ssl` | `openssl s_client` | `gnutls-cli` | `curl` |",
        "|---|---|---|---|---|",
    ]
    with BadSSLTestServer() as badssl:
        for name, scenario in SCENARIOS.items():
            python = python_client.connect(
                badssl.port(name),
                scenario.server_name,
                python_client.default_context(badssl.ca_file),
            ).outcome
            seen = {
                "python": python,
                "openssl": openssl_outcome(scenario, *s_client(badssl, scenario)),
                "gnutls": gnutls_outcome(scenario, *gnutls_cli(badssl, scenario)),
                "curl": curl_outcome(scenario, *curl(badssl, scenario)),
            }
            cells = [cell(seen[c], scenario.expect_for(c)) for c in seen]
            if name == "revoked":
                context = python_client.default_context(badssl.ca_file)
                context.load_verify_locations(badssl.crl_file)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
                crl = badssl.crl_file
                with_crl = [
                    python_client.connect(badssl.port(name), "localhost", context).outcome,
                    openssl_outcome(
                        scenario, *s_client(badssl, scenario, "-CRL", crl, "-crl_check")
                    ),
                    gnutls_outcome(scenario, *gnutls_cli(badssl, scenario, "--x509crlfile", crl)),
                    curl_outcome(scenario, *curl(badssl, scenario, "--crlfile", crl)),
                ]
                cells = [
                    f"{c}; with the CRL {cell(r, 'revoked')}"
                    for c, r in zip(cells, with_crl, strict=True)
                ]
            rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/test_badssl_peers.py
    print(observed_table())
