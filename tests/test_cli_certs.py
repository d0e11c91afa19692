"""`securetcp certs show|check`, run as real processes on certificates built to be broken.

Every certificate here is made at run time with cryptography: a root, an
intermediate and leaves that are each wrong in one way (expired, SHA-1,
a 1024-bit key, the wrong EKU, a chain out of order or with a gap...).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securetcp.certs import hostname_matches

ROOT = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


def securetcp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "securetcp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@dataclass
class Made:
    cert: x509.Certificate
    key: Any


def make(
    cn: str,
    issuer: Made | None = None,
    *,
    ca: bool = False,
    path_length: int | None = None,
    key: Any = None,
    digest: Any = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    names: Sequence[str] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> Made:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 90 * DAY)
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    signer = issuer.key if issuer else key
    return Made(builder.sign(signer, digest or hashes.SHA256()), key)


def pem(*made: Made) -> bytes:
    return b"".join(m.cert.public_bytes(serialization.Encoding.PEM) for m in made)


def key_pem(made: Made) -> bytes:
    return made.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def sha1_signed(directory: Path, issuer: Made) -> bytes:
    """A leaf signed with SHA-1: cryptography will not sign that, the openssl command will."""
    if OPENSSL is None:
        pytest.skip("openssl command not installed")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sha1")]))
        .sign(key, hashes.SHA256())
    )
    (directory / "sha1.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    (directory / "issuer.pem").write_bytes(pem(issuer))
    (directory / "issuer.key").write_bytes(key_pem(issuer))
    (directory / "sha1.ext").write_text("subjectAltName=DNS:localhost\n")
    command = [OPENSSL, "x509", "-req", "-in", "sha1.csr", "-sha1", "-days", "30"]
    command += ["-CA", "issuer.pem", "-CAkey", "issuer.key", "-set_serial", "1234"]
    command += ["-extfile", "sha1.ext", "-out", "sha1-leaf.pem"]
    subprocess.run(command, cwd=directory, check=True, capture_output=True, timeout=30)
    return (directory / "sha1-leaf.pem").read_bytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("broken")
    root = make("Test Root", ca=True)
    inter = make("Test Intermediate", root, ca=True, path_length=0)
    names = ("localhost", "127.0.0.1", "*.example.org")
    leaf = make("leaf", inter, names=names, key=rsa.generate_private_key(65537, 2048))
    other_root = make("Other Root", ca=True)
    (d / "ca.pem").write_bytes(pem(root))
    (d / "other-ca.pem").write_bytes(pem(other_root))
    (d / "good.pem").write_bytes(pem(leaf, inter))
    (d / "good.key").write_bytes(key_pem(leaf))
    (d / "other.key").write_bytes(key_pem(inter))
    (d / "reversed.pem").write_bytes(pem(inter, leaf))
    (d / "leaf-only.pem").write_bytes(pem(leaf))
    (d / "extra.pem").write_bytes(pem(leaf, inter, other_root))
    expired = make("expired", inter, names=["localhost"], not_before=NOW - 100 * DAY,
                   not_after=NOW - 10 * DAY)  # fmt: skip
    (d / "expired.pem").write_bytes(pem(expired, inter))
    soon = make("soon", inter, names=["localhost"], not_after=NOW + 10 * DAY + 3600 * 1e-5 * DAY)
    (d / "soon.pem").write_bytes(pem(soon, inter))
    (d / "sha1.pem").write_bytes(sha1_signed(d, inter) + pem(inter))
    weak = make("weak", inter, names=["localhost"], key=rsa.generate_private_key(65537, 1024))
    (d / "weak.pem").write_bytes(pem(weak, inter))
    client_only = make("client", inter, names=["localhost"], eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    (d / "client-only.pem").write_bytes(pem(client_only, inter))
    not_ca = make("Not A CA", root, eku=None)
    under_not_ca = make("under", not_ca, names=["localhost"])
    (d / "not-ca.pem").write_bytes(pem(under_not_ca, not_ca))
    (d / "key-only.pem").write_bytes(key_pem(leaf))
    return d


def check(files: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = securetcp("certs", "check", "--json", *args, cwd=files)
    return result, json.loads(result.stdout)


def statuses(report: dict[str, Any], name: str) -> list[str]:
    return [c["status"] for c in report["checks"] if c["check"] == name]


def messages(report: dict[str, Any], status: str = "failed") -> str:
    return "\n".join(c["message"] for c in report["checks"] if c["status"] == status)


def test_a_good_chain_passes_every_check(files: Path) -> None:
    args = ("--cert", "good.pem", "--key", "good.key", "--ca", "ca.pem", "--hostname", "localhost")
    result, report = check(files, *args)
    assert result.returncode == 0, result.stderr
    assert report["ok"] is True
    assert report["cert"] == "good.pem" and report["key"] == "good.key"
    assert report["ca"] == "ca.pem" and report["hostname"] == "localhost"
    assert [c["common_name"] for c in report["chain"]] == ["leaf", "Test Intermediate"]
    assert report["anchor"]["common_name"] == "Test Root"
    assert {c["status"] for c in report["checks"]} == {"ok"}
    assert {c["check"] for c in report["checks"]} == {
        "key", "chain", "trust", "validity", "hostname", "key_strength", "signature", "purpose",
    }  # fmt: skip
    assert statuses(report, "validity") == ["ok", "ok", "ok"]  # leaf, intermediate, root
    assert report["chain"][0]["key"] == {"type": "RSA", "bits": 2048, "curve": None}
    assert report["chain"][0]["days_left"] in (89, 90)

    text = securetcp("certs", "check", *args, cwd=files)
    assert text.returncode == 0 and "result: ok" in text.stdout
    assert text.stderr == ""


@pytest.mark.parametrize(
    ("args", "check_name", "phrase"),
    [
        (("--cert", "good.pem", "--key", "other.key"), "key", "does not match certificate 1"),
        (("--cert", "reversed.pem"), "chain", "out of order"),
        (("--cert", "leaf-only.pem"), "trust", "an intermediate certificate is missing"),
        (("--cert", "extra.pem"), "chain", "certificate 3 (CN=Other Root) is not part"),
        (("--cert", "expired.pem"), "validity", "expired on"),
        (("--cert", "sha1.pem"), "signature", "signed with SHA1"),
        (("--cert", "weak.pem"), "key_strength", "weak 1024-bit RSA key"),
        (("--cert", "client-only.pem"), "purpose", "lacks serverAuth"),
        (("--cert", "not-ca.pem"), "chain", "is not a CA"),
        (("--cert", "good.pem", "--hostname", "example.org"), "hostname", "not covered"),
    ],
)
def test_each_broken_certificate_fails_with_its_reason(
    files: Path, args: tuple[str, ...], check_name: str, phrase: str
) -> None:
    result, report = check(files, *args, "--ca", "ca.pem")
    assert result.returncode == 1
    assert report["ok"] is False
    assert "failed" in statuses(report, check_name)
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    assert any(phrase in c["message"] for c in failed if c["check"] == check_name), failed
    assert phrase in one_line(result.stderr) or "more)" in result.stderr


def test_another_ca_does_not_trust_the_chain(files: Path) -> None:
    result, report = check(files, "--cert", "good.pem", "--ca", "other-ca.pem")
    assert result.returncode == 1
    assert statuses(report, "trust") == ["failed"]
    assert "CN=Test Root" in messages(report) and "other-ca.pem" in messages(report)


def test_certifi_is_the_default_trust(files: Path) -> None:
    result, report = check(files, "--cert", "good.pem")
    assert result.returncode == 1
    assert report["ca"] == "certifi"
    assert "nor in certifi" in messages(report)
    assert "Warning" not in result.stderr  # certifi's odd roots load quietly


def test_expiry_within_30_days_warns_but_passes(files: Path) -> None:
    result, report = check(files, "--cert", "soon.pem", "--ca", "ca.pem")
    assert result.returncode == 0, result.stderr
    assert statuses(report, "validity")[0] == "warning"
    assert "expires in 10 days" in messages(report, "warning")


def test_hostnames_and_wildcards(files: Path) -> None:
    for name, ok in [
        ("a.example.org", True),
        ("A.Example.Org.", True),
        ("127.0.0.1", True),
        ("a.b.example.org", False),  # a wildcard stands for one label only
        ("example.org", False),
        ("::1", False),
        ("leaf", False),  # the CN is not a name
    ]:
        result, report = check(files, "--cert", "good.pem", "--ca", "ca.pem", "--hostname", name)
        assert statuses(report, "hostname") == ["ok" if ok else "failed"], name
        assert result.returncode == (0 if ok else 1), name


def test_wildcard_rules_of_rfc_6125() -> None:
    def cert(*names: str) -> x509.Certificate:
        return make("x", names=names).cert

    assert hostname_matches(cert("*.example.org"), "www.example.org")
    assert not hostname_matches(cert("*.org"), "example.org")  # no wildcard over a public suffix
    assert not hostname_matches(cert("w*.example.org"), "www.example.org")  # no partial wildcard
    assert not hostname_matches(cert("*.example.org"), "xn--bcher-kva.example.org")
    assert hostname_matches(cert("xn--bcher-kva.example.org"), "bücher.example.org")
    assert hostname_matches(cert("::1"), "[::1]")
    assert not hostname_matches(cert("127.0.0.1"), "127.0.0.2")


def test_usage_errors_exit_2_naming_the_file(files: Path) -> None:
    missing = securetcp("certs", "check", "--cert", "nope.pem", cwd=files)
    assert missing.returncode == 2
    assert "nope.pem" in one_line(missing.stderr) and "does not exist" in missing.stderr

    no_cert = securetcp("certs", "check", "--cert", "key-only.pem", cwd=files)
    assert no_cert.returncode == 2
    assert "key-only.pem" in one_line(no_cert.stderr) and "private key only" in no_cert.stderr

    no_key = securetcp("certs", "check", "--cert", "good.pem", "--key", "ca.pem", cwd=files)
    assert no_key.returncode == 2 and "ca.pem" in one_line(no_key.stderr)

    bad_ca = securetcp("certs", "check", "--cert", "good.pem", "--ca", "nope-ca.pem", cwd=files)
    assert bad_ca.returncode == 2 and "nope-ca.pem" in one_line(bad_ca.stderr)

    usage = securetcp("certs", "check", cwd=files)
    assert usage.returncode == 2 and "--cert" in one_line(usage.stderr)


def test_show_json_has_keys_extensions_and_chain_order(files: Path) -> None:
    result = securetcp("certs", "show", "--json", "good.pem", cwd=files)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["file"] == "good.pem"
    assert shown["chain"] == {"in_order": True, "problems": []}
    leaf, inter = shown["certificates"]
    assert leaf["subject"] == "CN=leaf" and leaf["issuer"] == "CN=Test Intermediate"
    assert leaf["key"] == {"type": "RSA", "bits": 2048, "curve": None}
    assert leaf["signature_algorithm"] == "ecdsa-with-SHA256"
    assert leaf["subject_alt_names"] == {
        "dns": ["localhost", "*.example.org"], "ip": ["127.0.0.1"], "uri": [], "email": [],
    }  # fmt: skip
    assert leaf["extended_key_usage"] == ["serverAuth"]
    assert leaf["basic_constraints"] == {"ca": False, "path_length": None}
    assert leaf["key_usage"] is None and leaf["name_constraints"] is None
    assert leaf["self_signed"] is False and len(leaf["sha256"]) == 64
    assert inter["basic_constraints"] == {"ca": True, "path_length": 0}
    assert inter["key"] == {"type": "EC", "bits": 256, "curve": "secp256r1"}
    datetime.datetime.fromisoformat(leaf["not_after"].replace("Z", "+00:00"))

    backwards = json.loads(securetcp("certs", "show", "--json", "reversed.pem", cwd=files).stdout)
    assert backwards["chain"]["in_order"] is False
    assert "out of order" in backwards["chain"]["problems"][0]

    text = securetcp("certs", "show", "--cert", "reversed.pem", cwd=files)
    assert text.returncode == 0
    assert "key:                EC secp256r1 (256 bits)" in text.stdout
    assert "basic constraints:  CA:TRUE, pathlen:0" in text.stdout
    assert "chain: certificate 1 (CN=Test Intermediate)" in text.stdout


def test_a_dev_client_certificate_checks_as_a_client(tmp_path: Path) -> None:
    assert securetcp("certs", "init", "--dir", "certs", cwd=tmp_path).returncode == 0
    base = ("--cert", "certs/client.pem", "--key", "certs/client.key", "--ca", "certs/ca.pem")
    as_client = securetcp("certs", "check", *base, "--purpose", "client", cwd=tmp_path)
    assert as_client.returncode == 0, as_client.stdout + as_client.stderr
    server = securetcp(
        "certs", "check", "--cert", "certs/server.pem", "--key", "certs/server.key",
        "--ca", "certs/ca.pem", "--hostname", "::1", cwd=tmp_path,
    )  # fmt: skip
    assert server.returncode == 0, server.stdout


def test_a_ca_directory_and_verbose_tracebacks(files: Path, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    cas.mkdir()
    (cas / "root.pem").write_bytes((files / "ca.pem").read_bytes())
    (cas / "other.pem").write_bytes((files / "other-ca.pem").read_bytes())
    result, report = check(files, "--cert", "good.pem", "--ca", str(cas))
    assert result.returncode == 0, report
    assert report["ca"] == str(cas)

    empty = tmp_path / "empty"
    empty.mkdir()
    none = securetcp("certs", "check", "--cert", "good.pem", "--ca", str(empty), cwd=files)
    assert none.returncode == 2 and "no PEM certificate files" in one_line(none.stderr)

    verbose = securetcp("certs", "check", "--cert", "nope.pem", "--verbose", cwd=files)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == (
        "securetcp: certificate file nope.pem: file does not exist"
    )
