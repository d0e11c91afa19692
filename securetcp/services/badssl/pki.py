"""The harness's PKI: one trustme root, and every certificate the scenarios serve.

The root CA comes from trustme (the certificate clients are told to trust);
everything trustme cannot make (expired and not-yet-valid certificates,
intermediates with name constraints, corrupted signatures, odd key types and
digests, a CRL) is built here with cryptography, signed by that root's key.
Nothing is shipped: each `BadSSLPKI()` makes fresh keys.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "BadSSLPKI", "Credential", "KeyKind", "new_key"]

KeyKind: TypeAlias = Literal["ec256", "ec384", "rsa1024", "rsa2048", "rsa4096", "ed25519"]
PrivateKey: TypeAlias = CertificateIssuerPrivateKeyTypes
Digest: TypeAlias = Literal["sha256", "sha384"]

ORGANIZATION = "securetcp badssl"
DAY = datetime.timedelta(days=1)


def new_key(kind: KeyKind) -> PrivateKey:
    """A fresh private key of `kind`."""
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = {"rsa1024": 1024, "rsa2048": 2048, "rsa4096": 4096}[kind]
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _hash(digest: Digest, key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 signs without a separate digest
    return hashes.SHA384() if digest == "sha384" else hashes.SHA256()


def _key_usage(*, ca: bool, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Authority:
    """A CA certificate and its key: signs intermediates, leaves and CRLs."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def from_trustme(cls, ca: trustme.CA) -> Authority:
        """The certificate and key of a trustme CA, to sign with cryptography."""
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        return cls(cert, key)  # type: ignore[arg-type]

    def _builder(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue_ca(
        self,
        common_name: str,
        *,
        key: PrivateKey | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        excluded_dns: Sequence[str] = (),
    ) -> Authority:
        """An intermediate CA under this one (`key`, or a new EC P-256 key), maybe
        name-constrained."""
        key = key or new_key("ec256")
        now = _now()
        builder = (
            self._builder(
                _name(common_name),
                key.public_key(),
                not_before or now - DAY,
                not_after or now + 365 * DAY,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True, key_encipherment=False), critical=True)
        )
        if excluded_dns:
            # RFC 5280 4.2.1.10: name constraints are always critical.
            builder = builder.add_extension(
                x509.NameConstraints(
                    permitted_subtrees=None,
                    excluded_subtrees=[x509.DNSName(n) for n in excluded_dns],
                ),
                critical=True,
            )
        return Authority(builder.sign(self.key, _hash("sha256", self.key)), key)

    def issue_leaf(
        self,
        names: Sequence[str],
        *,
        common_name: str,
        key: PrivateKey,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        client_auth_only: bool = False,
        digest: Digest = "sha256",
    ) -> x509.Certificate:
        """A server certificate for `names` (DNS names or IP addresses; none: CN only)."""
        now = _now()
        builder = (
            self._builder(
                _name(common_name),
                key.public_key(),
                not_before or now - DAY,
                not_after or now + 90 * DAY,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH]
                    if client_auth_only
                    else [ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
            )
        return builder.sign(self.key, _hash(digest, self.key))

    def crl(self, revoked_serials: Sequence[int]) -> x509.CertificateRevocationList:
        """A CRL signed by this CA that lists `revoked_serials`, valid for a week."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - DAY)
            .next_update(now + 7 * DAY)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - DAY)
                .build()
            )
        return builder.sign(self.key, _hash("sha256", self.key))


def self_signed(names: Sequence[str], *, common_name: str, key: PrivateKey) -> x509.Certificate:
    """A self-signed server certificate (not a CA) for `names`."""
    now = _now()
    subject = _name(common_name)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, key_encipherment=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .sign(key, _hash("sha256", key))
    )


def corrupt_signature(cert: x509.Certificate) -> bytes:
    """`cert`'s DER with one bit of its signature flipped (still parses, never verifies)."""
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    # The signature BIT STRING is the last field of the certificate.
    der[-1] ^= 0x01
    return bytes(der)


_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")  # OID 1.2.840.113549.1.1.11
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")  # OID 1.2.840.113549.1.1.5


def resign_with_sha1(cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey) -> bytes:
    """`cert` (signed sha256WithRSA by `issuer_key`) re-signed with sha1WithRSA, as DER.

    cryptography refuses to sign with SHA-1, so the algorithm identifiers (same
    length in DER) are swapped in place and the TBS part signed again; an RSA
    signature keeps its length, so no DER length changes.
    """
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA256):
        raise ValueError("expected a sha256WithRSA certificate")
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    whole = der(cert)
    head = whole[: len(whole) - len(cert.signature)]
    head = head.replace(cert.tbs_certificate_bytes, tbs).replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    return head + signature


def _pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (
        label.encode(),
        b"\n".join(lines),
        label.encode(),
    )


@dataclass(frozen=True)
class Credential:
    """What one scenario's server presents: the chain as sent (leaf first) and its key."""

    chain: tuple[bytes, ...]
    """DER certificates in the order the server sends them."""
    key: PrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.pem`` (the chain) and ``stem.key`` (mode 0600); return both paths."""
        cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_file.write_bytes(b"".join(_pem(der) for der in self.chain))
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        return cert_file, key_file


def der(cert: x509.Certificate) -> bytes:
    """`cert` as DER bytes."""
    return cert.public_bytes(serialization.Encoding.DER)


class BadSSLPKI:
    """The root every scenario chains to (or, on purpose, does not), and its CRL.

    `ca` is the trustme CA clients trust; `intermediate` issues the ordinary
    leaves; `client` is a client certificate (trustme) for the mutual-TLS
    scenarios; `revoke(serial)` adds a certificate to the root's CRL.
    """

    def __init__(self, prefetch: Iterable[KeyKind] = ()) -> None:
        # RSA key generation is slow and releases the GIL: the keys named in
        # `prefetch` are made in two worker threads while the rest is built.
        self._executor: ThreadPoolExecutor | None = None
        self._prefetched: dict[KeyKind, list[Future[PrivateKey]]] = {}
        for kind in prefetch:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(2, thread_name_prefix="badssl-keys")
            self._prefetched.setdefault(kind, []).append(self._executor.submit(new_key, kind))
        self.ca = trustme.CA(organization_name=ORGANIZATION)
        self.root = Authority.from_trustme(self.ca)
        self.intermediate = self.root.issue_ca("securetcp badssl intermediate")
        self.client = self.ca.issue_cert(
            "client@badssl.test", common_name="securetcp badssl client"
        )
        self._revoked: list[int] = []

    def new_key(self, kind: KeyKind) -> PrivateKey:
        """A fresh key of `kind`: a prefetched one if there is one left."""
        pending = self._prefetched.get(kind)
        if pending:
            return pending.pop(0).result()
        return new_key(kind)

    def close(self) -> None:
        """Stop the key threads (keys prefetched but not used are dropped)."""
        for pending in self._prefetched.values():
            for future in pending:
                future.cancel()
        self._prefetched.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def revoke(self, serial: int) -> None:
        """List `serial` (of a certificate the root issued) in the root's CRL."""
        self._revoked.append(serial)

    def crl_pem(self) -> bytes:
        """The root's CRL (PEM), listing every revoked certificate."""
        crl = self.root.crl(self._revoked)
        return crl.public_bytes(serialization.Encoding.PEM)

    def ca_pem(self) -> bytes:
        """The root certificate (PEM): what clients trust."""
        return self.ca.cert_pem.bytes()

    def write_client(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write the client certificate chain and key; return (certfile, keyfile)."""
        cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
        with open(cert_file, "wb") as f:
            for blob in self.client.cert_chain_pems:
                f.write(blob.bytes())
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.client.private_key_pem.bytes())
        return cert_file, key_file
