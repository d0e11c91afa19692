"""Tests for securetcp.certs: loading, checking, PeerIdentity, dev PKI."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from certbuilder import PKI, encrypt_key, self_signed, utcnow
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from servers import OPENSSL, TIMEOUT, EchoServer, ServerThread, tls_connect

from securetcp import certs
from securetcp.certs import CertificateFileError


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


# -- load_pem_certificates ---------------------------------------------------


def test_load_certificates_reads_the_whole_chain(tmp_path: Path) -> None:
    root = PKI(tmp_path)
    intermediate = root.ca.create_child_ca()
    leaf = intermediate.issue_cert("example.org")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    loaded = certs.load_pem_certificates(chain)
    assert len(loaded) == 2
    assert loaded[0].subject != loaded[1].subject


def test_load_certificates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(CertificateFileError, match="does not exist") as info:
        certs.load_pem_certificates(path)
    assert str(path) in str(info.value)


def test_load_certificates_directory(tmp_path: Path) -> None:
    with pytest.raises(CertificateFileError, match="is a directory") as info:
        certs.load_pem_certificates(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_certificates_unreadable(pki: PKI) -> None:
    cert, _ = pki.pair("server")
    cert.chmod(0)
    with pytest.raises(CertificateFileError, match="permission denied"):
        certs.load_pem_certificates(cert)


@pytest.mark.parametrize(
    ("content", "hint"),
    [(b"", "no PEM certificate"), (b"\x30\x82\x01\x00junk", "DER"), (b"hello\n", "no PEM")],
)
def test_load_certificates_no_pem(tmp_path: Path, content: bytes, hint: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(CertificateFileError, match=hint):
        certs.load_pem_certificates(path)


def test_load_certificates_key_only_file_says_so(pki: PKI) -> None:
    _, key = pki.pair("server")
    with pytest.raises(CertificateFileError, match="private key only"):
        certs.load_pem_certificates(key)


def test_load_certificates_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateFileError, match="malformed"):
        certs.load_pem_certificates(path)


# -- load_pem_private_key ----------------------------------------------------


def test_load_key_plain_and_combined(pki: PKI, tmp_path: Path) -> None:
    cert, key = pki.pair("server")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    loaded = certs.load_pem_private_key(combined)
    assert certs.key_matches_certificate(loaded, certs.load_pem_certificates(cert)[0])
    # A password for an unencrypted key is ignored, as ssl does.
    assert certs.load_pem_private_key(key, password="unused") is not None


def test_load_key_missing_and_no_key(pki: PKI, tmp_path: Path) -> None:
    cert, _ = pki.pair("server")
    with pytest.raises(CertificateFileError, match="does not exist"):
        certs.load_pem_private_key(tmp_path / "missing.key")
    with pytest.raises(CertificateFileError, match="no PEM private key") as info:
        certs.load_pem_private_key(cert)
    assert str(cert) in str(info.value)


def test_load_key_encrypted(pki: PKI) -> None:
    _, key = pki.pair("server")
    encrypted = encrypt_key(key, b"s3cret")
    with pytest.raises(CertificateFileError, match="encrypted and needs a password"):
        certs.load_pem_private_key(encrypted)
    with pytest.raises(CertificateFileError, match="wrong password"):
        certs.load_pem_private_key(encrypted, password="nope")
    assert certs.load_pem_private_key(encrypted, password="s3cret") is not None
    assert certs.load_pem_private_key(encrypted, password=b"s3cret") is not None


def test_load_key_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    # A PEM frame around garbage, spelled in pieces so no scanner takes it for a key.
    label = "PRIVATE" + " KEY"
    path.write_text(f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n")
    with pytest.raises(CertificateFileError, match="malformed private key"):
        certs.load_pem_private_key(path)


def test_key_matches_certificate(pki: PKI) -> None:
    cert_a, key_a = pki.pair("a")
    _, key_b = pki.pair("b")
    leaf = certs.load_pem_certificates(cert_a)[0]
    assert certs.key_matches_certificate(certs.load_pem_private_key(key_a), leaf)
    assert not certs.key_matches_certificate(certs.load_pem_private_key(key_b), leaf)


# -- validity and warnings -----------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_validity_problem(ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = utcnow()
    day = datetime.timedelta(days=1)
    expired = self_signed(ec_key, not_before=now - 10 * day, not_after=now - day)
    future = self_signed(ec_key, not_before=now + day, not_after=now + 10 * day)
    good = self_signed(ec_key, not_before=now - day, not_after=now + 100 * day)
    assert (certs.validity_problem(expired) or "").startswith("expired on ")
    assert (certs.validity_problem(future) or "").startswith("not valid until ")
    assert certs.validity_problem(good) is None
    # A naive "now" is taken as UTC.
    naive_past = (now - 5 * day).replace(tzinfo=None)
    assert certs.validity_problem(expired, now=naive_past) is None


def test_certificate_warnings(ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = utcnow()
    day = datetime.timedelta(days=1)
    soon = self_signed(ec_key, not_before=now - day, not_after=now + 3 * day)
    (warning,) = certs.certificate_warnings(soon)
    assert "expires in 2 day(s)" in warning or "expires in 3 day(s)" in warning
    assert "CN=peer" in warning
    fine = self_signed(ec_key, not_before=now - day, not_after=now + 30 * day)
    assert certs.certificate_warnings(fine) == []
    assert certs.certificate_warnings(fine, expiry_warning_days=60) != []

    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = self_signed(weak_key, not_before=now - day, not_after=now + 30 * day)
    (warning,) = certs.certificate_warnings(weak)
    assert "weak 1024-bit RSA key" in warning


# -- PeerIdentity -------------------------------------------------------------


def test_peer_identity_from_der(ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = utcnow().replace(microsecond=0)
    cert = self_signed(
        ec_key,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=2),
        common_name="svc.example.org",
        serial=0xC0FFEE,
        san=[
            x509.DNSName("svc.example.org"),
            x509.DNSName("*.svc.example.org"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
            x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/svc"),
            x509.RFC822Name("ops@example.org"),
        ],
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    identity = certs.peer_identity_from_der(der)
    assert identity.common_name == "svc.example.org"
    assert identity.dns_names == ("svc.example.org", "*.svc.example.org")
    assert identity.ip_addresses == (
        ipaddress.IPv4Address("10.0.0.7"),
        ipaddress.IPv6Address("2001:db8::7"),
    )
    assert identity.uris == ("spiffe://example.org/ns/prod/sa/svc",)
    assert identity.emails == ("ops@example.org",)
    assert identity.serial == 0xC0FFEE
    assert identity.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert identity.fingerprint_sha256 == identity.fingerprint_sha256.lower()
    assert len(identity.fingerprint_sha256) == 64
    assert identity.not_before == now - datetime.timedelta(hours=1)
    assert identity.not_after.tzinfo is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.serial = 1  # type: ignore[misc]
    assert not hasattr(identity, "__dict__")


def test_peer_identity_without_san_or_cn(ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = utcnow()
    cert = self_signed(
        ec_key, not_before=now, not_after=now + datetime.timedelta(days=1), common_name=None
    )
    identity = certs.peer_identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert identity.common_name is None
    assert identity.dns_names == identity.uris == identity.emails == ()
    assert identity.ip_addresses == ()


# -- write_dev_certs -----------------------------------------------------------


def openssl_verify(ca: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), *extra, str(cert)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_write_dev_certs_verify_with_openssl(tmp_path: Path) -> None:
    paths = certs.write_dev_certs(tmp_path / "certs")
    for path in paths.all():
        assert path.is_file()
    for key in (paths.server_key, paths.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(paths.ca.parent.glob(".*.tmp"))

    server = openssl_verify(paths.ca, paths.server_cert, "-purpose", "sslserver")
    assert server.returncode == 0, server.stderr
    for host in ("localhost", "127.0.0.1", "::1"):
        flag = "-verify_hostname" if host == "localhost" else "-verify_ip"
        check = openssl_verify(paths.ca, paths.server_cert, flag, host)
        assert check.returncode == 0, (host, check.stdout, check.stderr)
    client = openssl_verify(paths.ca, paths.client_cert, "-purpose", "sslclient")
    assert client.returncode == 0, client.stderr
    identity = certs.peer_identity_from_der(
        certs.load_pem_certificates(paths.client_cert)[0].public_bytes(serialization.Encoding.DER)
    )
    assert identity.common_name == "securetcp-dev-client"


def test_write_dev_certs_mutual_tls_handshake(tmp_path: Path) -> None:
    paths = certs.write_dev_certs(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    server_ctx.load_verify_locations(paths.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(paths.ca))
    client_ctx.load_cert_chain(paths.client_cert, paths.client_key)

    with ServerThread(EchoServer(server_ctx)) as server:
        assert tls_connect(server.port, client_ctx).data == b"hello"
        identity = server.handled().identity
    assert identity is not None and identity.common_name == "securetcp-dev-client"


def test_write_dev_certs_skips_then_overwrites(tmp_path: Path) -> None:
    paths = certs.write_dev_certs(tmp_path, hostnames=("dev.test",), client_name="me")
    before = paths.ca.read_bytes()
    assert certs.write_dev_certs(tmp_path) == paths
    assert paths.ca.read_bytes() == before
    certs.write_dev_certs(tmp_path, overwrite=True)
    assert paths.ca.read_bytes() != before


def test_write_dev_certs_refuses_partial_set(tmp_path: Path) -> None:
    paths = certs.write_dev_certs(tmp_path)
    paths.server_key.unlink()
    with pytest.raises(FileExistsError, match=r"server\.key"):
        certs.write_dev_certs(tmp_path)
    certs.write_dev_certs(tmp_path, overwrite=True)
    assert paths.server_key.is_file()
