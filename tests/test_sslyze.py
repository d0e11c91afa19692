"""The external judge: sslyze checks a running EchoServer against Mozilla's guidelines.

sslyze scans a real securetcp EchoServer (TLSConfig profile "modern" or
"intermediate", its own event loop in a thread) on 127.0.0.1 with SNI
"localhost", and its Mozilla TLS configuration checker (guidelines v5.7)
must find nothing but what `ALLOWED_FINDINGS` names. A control scan of a
stock Python server context shows that the checker does bite.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

import pytest

pytest.importorskip("sslyze", reason="sslyze is not installed (pip install -e '.[test]')")

from certbuilder import CertBuilder, Issued, KeyType
from servers import EchoServer, ServerThread
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument
from sslyze.scanner.models import (
    ScanCommandsExtraArguments,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import ServerNetworkConfiguration, ServerNetworkLocation

from securetcp.tls import TLSConfig

pytestmark = [
    pytest.mark.timeout(120),
    # sslyze's bundled trust stores hold a root with a negative serial number.
    pytest.mark.filterwarnings("ignore:Parsed a serial number:UserWarning"),
]

#: Checker findings about the test certificate itself, not the TLS set-up,
#: that are tolerated. Empty on purpose: the leaf from certbuilder is what
#: Mozilla asks for (ECDSA P-256 or RSA 2048, SHA-256 signature, 90 days, so
#: "maximum_certificate_lifespan", "certificate_types", "certificate_curves",
#: "certificate_signatures" and "rsa_key_size" cannot fire), and the test CA
#: is handed to sslyze as a custom trust store, so "certificate_path_validation"
#: passes too (it would fire against sslyze's public trust stores alone, and
#: for trustme leaves, whose extensions cryptography's verifier rejects).
ALLOWED_FINDINGS: frozenset[str] = frozenset()

#: The key-exchange groups Mozilla allows, as sslyze names them.
MOZILLA_CURVES = {"X25519", "secp256r1", "secp384r1"}

Profile = Literal["modern", "intermediate"]


def echo(ssl_options: Any) -> EchoServer:
    return EchoServer(ssl_options, handshake_timeout=5.0)


def scan(port: int, ca_file: Path) -> ServerScanResult:
    """Run the scan commands Mozilla's checker needs against localhost:port."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="localhost", network_timeout=5, network_max_retries=1
        ),
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    scanner = Scanner(per_server_concurrent_connections_limit=5)
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def mozilla_findings(result: ServerScanResult, profile: Profile) -> dict[str, str]:
    """The checker's findings (key -> message); {} when compliant."""
    config = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, config)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return dict(exc.issues)
    return {}


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertBuilder:
    return CertBuilder(tmp_path_factory.mktemp("sslyze-pki"))


def localhost_cert(ca: CertBuilder, key_type: KeyType) -> Issued:
    return ca.issue(
        f"localhost-{key_type}", common_name="localhost", dns_names=["localhost"], key_type=key_type
    )


@pytest.mark.parametrize(
    ("profile", "key_type"),
    [("modern", "ec"), ("intermediate", "ec"), ("intermediate", "rsa")],
)
def test_profile_passes_mozilla_check(
    test_ca: CertBuilder, profile: Profile, key_type: KeyType
) -> None:
    leaf = localhost_cert(test_ca, key_type)
    with ServerThread(echo(TLSConfig(*leaf.pair, profile=profile))) as target:
        result = scan(target.port, test_ca.ca_file)
        stats = target.server.stats
    findings = mozilla_findings(result, profile)
    assert set(findings) <= ALLOWED_FINDINGS, findings

    # The scan really reached the server and saw what the profile promises.
    assert stats.handshakes > 0
    scans = result.scan_result
    assert scans is not None
    tls13 = scans.tls_1_3_cipher_suites.result
    tls12 = scans.tls_1_2_cipher_suites.result
    curves = scans.elliptic_curves.result
    certificate_info = scans.certificate_info.result
    assert tls13 is not None and tls12 is not None and curves is not None
    assert certificate_info is not None
    assert {s.cipher_suite.name for s in tls13.accepted_cipher_suites} == {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }
    accepted12 = {s.cipher_suite.name for s in tls12.accepted_cipher_suites}
    if profile == "modern":
        assert not tls12.is_tls_version_supported
    else:
        assert accepted12 and all("_GCM_" in s or "CHACHA20" in s for s in accepted12)
        assert all(s.startswith("TLS_ECDHE_") for s in accepted12)
    assert {curve.name for curve in curves.supported_curves or []} == MOZILLA_CURVES
    (deployment,) = certificate_info.certificate_deployments
    assert deployment.verified_certificate_chain is not None
    assert deployment.received_certificate_chain[0].serial_number == leaf.serial


def test_stock_python_context_fails_mozilla_check(test_ca: CertBuilder) -> None:
    """Control: the checker flags what a default server context offers."""
    leaf = localhost_cert(test_ca, "ec")
    stock = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stock.load_cert_chain(*leaf.pair)
    with ServerThread(echo(stock)) as target:
        result = scan(target.port, test_ca.ca_file)
    findings = mozilla_findings(result, "intermediate")
    # CBC-SHA2 suites (e.g. ECDHE-ECDSA-AES128-SHA256), and X448/secp521r1.
    assert {"ciphers", "tls_curves"} <= set(findings), findings
    assert "CBC" in findings["ciphers"]
    assert "X448" in findings["tls_curves"] and "secp521r1" in findings["tls_curves"]
