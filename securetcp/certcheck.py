"""The checks behind ``securetcp certs check``: is this certificate file fit to serve?

:func:`check_certificate` reads a certificate chain (and optionally its key
and a CA) and reports, each with a plain reason: the key matches; the chain
is in order and leads to a trusted CA without gaps; every certificate is in
its validity period (warning under 30 days); the hostname is covered; keys
and signatures are strong enough; the leaf may be used as a server (or
client) certificate.

The chain is walked by hand (names, signatures, basic constraints, path
length) rather than with ``cryptography.x509.verification``: that verifier
applies the CA/Browser Forum profile strictly and rejects certificates that
every TLS client accepts (trustme's leaves mark a subjectAltName critical,
for example), and its errors name one problem where an operator wants all.
Name constraints are shown by ``certs show`` but not enforced here.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from securetcp.certs import (
    CertificateFileError,
    certificate_label,
    chain_order_problems,
    days_left,
    describe_certificate,
    hostname_matches,
    is_issued_by,
    key_matches_certificate,
    load_pem_certificates,
    load_pem_private_key,
    peer_identity_from_certificate,
    public_key_info,
)

__all__ = ["CheckReport", "Finding", "check_certificate", "load_trust_store"]

StrPath: TypeAlias = "str | os.PathLike[str]"
Status: TypeAlias = Literal["ok", "warning", "failed", "skipped"]
Purpose: TypeAlias = Literal["server", "client"]

#: Days before expiry from which a certificate gets a warning.
EXPIRY_WARNING_DAYS = 30
#: EC curves TLS clients accept for certificates (P-256 and stronger).
ACCEPTED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MIN_RSA_BITS = 2048
#: The checks, in the order reports list them.
CHECKS = ("key", "chain", "trust", "validity", "hostname", "key_strength", "signature", "purpose")
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)
_EKU = {
    "server": x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
    "client": x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
}


@dataclass(frozen=True)
class Finding:
    """One check's outcome.

    ``check`` is one of ``"key"``, ``"chain"``, ``"trust"``, ``"validity"``,
    ``"hostname"``, ``"key_strength"``, ``"signature"``, ``"purpose"``;
    ``certificate`` is the 1-based position in the file (0: the CA's
    certificate that anchors the chain), None when the finding is about the
    whole file.
    """

    check: str
    status: Status
    message: str
    certificate: int | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"check", "status", "message", "certificate"}``."""
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "certificate": self.certificate,
        }


@dataclass
class CheckReport:
    """Everything :func:`check_certificate` found; ``ok`` unless a check failed."""

    cert_file: str
    key_file: str | None
    ca: str
    hostname: str | None
    chain: list[x509.Certificate]
    anchor: x509.Certificate | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        """The findings whose status is ``"failed"``."""
        return [f for f in self.findings if f.status == "failed"]

    def add(self, check: str, status: Status, message: str, cert: int | None = None) -> None:
        self.findings.append(Finding(check, status, message, cert))

    def to_json(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        """The ``certs check --json`` shape (see the README)."""
        return {
            "ok": self.ok,
            "cert": self.cert_file,
            "key": self.key_file,
            "ca": self.ca,
            "hostname": self.hostname,
            "chain": [describe_certificate(c, now) for c in self.chain],
            "anchor": None if self.anchor is None else describe_certificate(self.anchor, now),
            "checks": [f.to_json() for f in self.findings],
        }


def load_trust_store(ca: StrPath | None) -> tuple[list[x509.Certificate], str]:
    """The trusted certificates: a PEM file, a directory of them, or certifi's bundle.

    Returns them with the name to show for them. Raises CertificateFileError.
    """
    if ca is None:
        import certifi

        with warnings.catch_warnings():
            # certifi's bundle holds a root or two that cryptography frowns upon.
            warnings.simplefilter("ignore")
            return load_pem_certificates(certifi.where()), "certifi"
    path = Path(ca)
    if path.is_dir():
        found: list[x509.Certificate] = []
        for entry in sorted(path.iterdir()):
            if entry.is_file() and entry.suffix in (".pem", ".crt", ".0", ".1"):
                found += load_pem_certificates(entry)
        if not found:
            raise CertificateFileError(f"CA directory {path}: no PEM certificate files in it")
        return found, str(path)
    return load_pem_certificates(path), str(path)


def _name(index: int, cert: x509.Certificate) -> str:
    if index == 0:
        return f"the CA certificate ({certificate_label(cert)})"
    return f"certificate {index} ({certificate_label(cert)})"


def _fmt(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _check_key(report: CheckReport, key_file: StrPath | None, password: str | None) -> None:
    source = key_file if key_file is not None else report.cert_file
    if key_file is None and b"PRIVATE KEY-----" not in Path(report.cert_file).read_bytes():
        report.add("key", "skipped", "no --key given")
        return
    key = load_pem_private_key(source, password)
    report.key_file = os.fspath(source)
    leaf = report.chain[0]
    if key_matches_certificate(key, leaf):
        report.add("key", "ok", f"the key in {os.fspath(source)} matches certificate 1", 1)
    else:
        report.add(
            "key",
            "failed",
            f"the key in {os.fspath(source)} does not match certificate 1 "
            f"({certificate_label(leaf)}): it belongs to another certificate",
            1,
        )


def _find(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if is_issued_by(cert, candidate):
            return candidate
    return None


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    """The same CA: one name and one key (a re-issued root counts as the same)."""
    return a.subject == b.subject and a.public_key() == b.public_key()


def _walk(report: CheckReport, store: list[x509.Certificate]) -> list[tuple[int, x509.Certificate]]:
    """The path from the leaf to a trust anchor; records chain and trust findings.

    Returns (position, certificate) pairs: positions in the file, 0 for the anchor.
    """
    chain = report.chain
    problems = chain_order_problems(chain)
    path: list[tuple[int, x509.Certificate]] = [(1, chain[0])]
    used = {0}
    while True:
        position, last = path[-1]
        if is_issued_by(last, last):
            if any(_same(last, trusted) for trusted in store):
                report.anchor = last
                report.add("trust", "ok", f"{_name(position, last)} is trusted by {report.ca}")
            else:
                kind = "self-signed certificate" if position == 1 else "root"
                report.add(
                    "trust",
                    "failed",
                    f"the chain ends at the {kind} {certificate_label(last)}, "
                    f"which is not in {report.ca}",
                    position,
                )
            break
        anchor = _find(last, store)
        if anchor is not None:
            report.anchor = anchor
            path.append((0, anchor))
            report.add(
                "trust",
                "ok",
                f"issued by {certificate_label(anchor)}, trusted by {report.ca}",
            )
            break
        following = next(
            (i for i, c in enumerate(chain) if i not in used and is_issued_by(last, c)), None
        )
        if following is None:
            report.add(
                "trust",
                "failed",
                f"the chain ends at {_name(position, last)}, issued by "
                f"{last.issuer.rfc4514_string()}, which is neither in {report.cert_file} "
                f"nor in {report.ca}: an intermediate certificate is missing, "
                "or the CA is not the one that issued it",
                position,
            )
            break
        used.add(following)
        path.append((following + 1, chain[following]))
    extra = [
        i for i in range(len(chain)) if i not in used and not _is_anchor_copy(chain[i], report)
    ]
    for i in extra:
        problems.append(
            f"certificate {i + 1} ({certificate_label(chain[i])}) is not part of the "
            "leaf's chain; remove it"
        )
    if problems:
        for problem in problems:
            report.add("chain", "failed", problem)
    else:
        report.add(
            "chain", "ok", f"{len(chain)} certificate(s), leaf first, each issued by the next"
        )
    return path


def _is_anchor_copy(cert: x509.Certificate, report: CheckReport) -> bool:
    """A served copy of the root that anchors the path (allowed, though unneeded)."""
    return report.anchor is not None and _same(cert, report.anchor)


def _check_ca_constraints(report: CheckReport, path: list[tuple[int, x509.Certificate]]) -> None:
    for depth, (position, cert) in enumerate(path[1:], start=1):
        subject = _name(position, cert)
        basic = _extension(cert, x509.BasicConstraints)
        if basic is None or not basic.ca:
            report.add(
                "chain",
                "failed",
                f"{subject} issued another certificate but is not a CA "
                "(basicConstraints CA:TRUE missing)",
                position,
            )
            continue
        # Intermediates between this CA and the leaf.
        below = depth - 1
        if basic.path_length is not None and below > basic.path_length:
            report.add(
                "chain",
                "failed",
                f"{subject} allows {basic.path_length} intermediate(s) below it "
                f"(pathlen), the chain has {below}",
                position,
            )
        usage = _extension(cert, x509.KeyUsage)
        if usage is not None and not usage.key_cert_sign:
            report.add(
                "chain",
                "failed",
                f"{subject} may not sign certificates (keyUsage lacks keyCertSign)",
                position,
            )


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_validity(
    report: CheckReport,
    path: list[tuple[int, x509.Certificate]],
    now: datetime.datetime,
    warning_days: int,
) -> None:
    for position, cert in path:
        subject = _name(position, cert)
        left = days_left(cert, now)
        if now > cert.not_valid_after_utc:
            report.add(
                "validity",
                "failed",
                f"{subject} expired on {_fmt(cert.not_valid_after_utc)} ({-left} days ago)",
                position,
            )
        elif now < cert.not_valid_before_utc:
            report.add(
                "validity",
                "failed",
                f"{subject} is not valid until {_fmt(cert.not_valid_before_utc)}",
                position,
            )
        elif left < warning_days:
            report.add(
                "validity",
                "warning",
                f"{subject} expires in {left} days, on {_fmt(cert.not_valid_after_utc)}",
                position,
            )
        else:
            report.add(
                "validity",
                "ok",
                f"{subject} valid until {_fmt(cert.not_valid_after_utc)} ({left} days left)",
                position,
            )


def _check_hostname(report: CheckReport, hostname: str | None) -> None:
    leaf = report.chain[0]
    identity = peer_identity_from_certificate(leaf)
    names = [*identity.dns_names, *map(str, identity.ip_addresses)]
    covered = ", ".join(names) or "no names (no subjectAltName DNS or IP entries)"
    if hostname is None:
        report.add("hostname", "skipped", f"no --hostname given; certificate 1 covers {covered}", 1)
    elif hostname_matches(leaf, hostname):
        report.add("hostname", "ok", f"{hostname} is covered by certificate 1", 1)
    else:
        hint = ""
        if not names and identity.common_name:
            hint = " (the CN is not used for names by modern clients; add a subjectAltName)"
        report.add(
            "hostname",
            "failed",
            f"{hostname} is not covered by certificate 1, which covers {covered}{hint}",
            1,
        )


def _check_strength(report: CheckReport, path: list[tuple[int, x509.Certificate]]) -> None:
    for position, cert in path:
        subject = _name(position, cert)
        key = public_key_info(cert)
        problem = None
        if key["type"] == "RSA" and key["bits"] < MIN_RSA_BITS:
            problem = f"a weak {key['bits']}-bit RSA key (use {MIN_RSA_BITS} bits or more)"
        elif key["type"] == "EC" and key["curve"] not in ACCEPTED_CURVES:
            problem = f"an EC key on {key['curve']} (use P-256, P-384 or P-521)"
        elif key["type"] == "DSA":
            problem = "a DSA key, which TLS 1.3 and current clients do not accept"
        if problem is None:
            size = key["curve"] or f"{key['bits']} bits"
            report.add("key_strength", "ok", f"{subject}: {key['type']} key, {size}", position)
        else:
            report.add("key_strength", "failed", f"{subject} has {problem}", position)
        if cert is report.anchor and is_issued_by(cert, cert):
            continue  # a trust anchor's self-signature is never checked by clients
        algorithm = cert.signature_hash_algorithm
        if isinstance(algorithm, _WEAK_HASHES):
            report.add(
                "signature",
                "failed",
                f"{subject} is signed with {algorithm.name.upper()}, which clients reject",
                position,
            )
        else:
            name = describe_certificate(cert)["signature_algorithm"]
            report.add("signature", "ok", f"{subject} is signed with {name}", position)


def _check_purpose(report: CheckReport, purpose: Purpose) -> None:
    leaf = report.chain[0]
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    wanted = _EKU[purpose]
    if (
        eku is not None
        and wanted not in eku
        and x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
    ):
        report.add(
            "purpose",
            "failed",
            f"certificate 1 may not be used as a TLS {purpose} certificate "
            f"(extendedKeyUsage lacks {wanted._name})",
            1,
        )
        return
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        report.add(
            "purpose",
            "warning",
            "certificate 1's keyUsage lacks digitalSignature, which TLS 1.3 needs",
            1,
        )
        return
    report.add("purpose", "ok", f"certificate 1 may be used as a TLS {purpose} certificate", 1)


def check_certificate(
    cert_file: StrPath,
    key_file: StrPath | None = None,
    *,
    ca: StrPath | None = None,
    hostname: str | None = None,
    purpose: Purpose = "server",
    password: str | None = None,
    now: datetime.datetime | None = None,
    warning_days: int = EXPIRY_WARNING_DAYS,
) -> CheckReport:
    """Check a certificate chain file as a TLS client would judge it, and more.

    ``key_file`` None uses a key found in ``cert_file`` (or skips the key
    check); ``ca`` None trusts certifi's bundle. Raises CertificateFileError
    for files that cannot be read or hold no certificate or key; everything
    else is a :class:`Finding` in the report.
    """
    when = now if now is not None else datetime.datetime.now(datetime.timezone.utc)
    chain = load_pem_certificates(cert_file)
    store, ca_name = load_trust_store(ca)
    report = CheckReport(
        cert_file=os.fspath(cert_file), key_file=None, ca=ca_name, hostname=hostname, chain=chain
    )
    _check_key(report, key_file, password)
    path = _walk(report, store)
    _check_ca_constraints(report, path)
    _check_validity(report, path, when, warning_days)
    _check_hostname(report, hostname)
    _check_strength(report, path)
    _check_purpose(report, purpose)
    report.findings.sort(key=lambda f: CHECKS.index(f.check))
    return report
