"""A small certificate authority built directly with cryptography.

trustme covers most tests, but some need what it cannot make: URI (SPIFFE)
subject alternative names, and leaves that strict path validators such as
the one sslyze uses (cryptography's RFC 5280 verifier) accept, with a
lifespan Mozilla's guidelines allow (90 days). Keys are ECDSA P-256 by
default, or RSA 2048; files are written into a directory (a tmp_path).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType: TypeAlias = Literal["ec", "rsa"]
PrivateKey: TypeAlias = "ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey"

#: Mozilla's recommended (and, for "modern", maximum) certificate lifespan.
LEAF_DAYS = 90


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


@dataclass(frozen=True)
class Issued:
    """A leaf certificate, its key, and the files they were written to."""

    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def pair(self) -> tuple[Path, Path]:
        """(certfile, keyfile), as TLSConfig and load_cert_chain take them."""
        return self.cert_file, self.key_file

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class CertBuilder:
    """A self-signed CA in ``directory`` (``<name>.pem``) that issues leaves."""

    def __init__(self, directory: Path, name: str = "ca", key_type: KeyType = "ec") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = _new_key(key_type)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securetcp tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"securetcp test CA {name}"),
            ]
        )
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.dir / f"{name}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        common_name: str | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        uris: Sequence[str] = (),
        emails: Sequence[str] = (),
        key_type: KeyType = "ec",
        days: int = LEAF_DAYS,
        client: bool = False,
    ) -> Issued:
        """Issue a server (or, with ``client``, a client) certificate; write name.pem/.key.

        The lifespan (not_after - not_before) is ``days`` days exactly.
        """
        key = _new_key(key_type)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securetcp tests")]
        if common_name is not None:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        general_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        general_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        general_names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        general_names += [x509.RFC822Name(email) for email in emails]
        not_before = _now() - datetime.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if general_names:
            # Not critical: the subject is never empty (RFC 5280, 4.2.1.6).
            builder = builder.add_extension(
                x509.SubjectAlternativeName(general_names), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_key_pem(key))
        return Issued(cert, cert_file, key_file)
