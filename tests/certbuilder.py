"""Every certificate the engine tests use is made here, at run time, into a directory.

* `PKI`: a trustme CA whose leaves (``pair``/``issue``) are written as
  ``<name>.pem`` (the chain) and ``<name>.key``; ``server_and_client()``
  adds a server certificate for localhost/127.0.0.1/::1 and a client one
  (`make_pki`, conftest's session ``pki`` fixture).
* `CertBuilder`: a CA built directly with cryptography, for what trustme
  cannot make: URI (SPIFFE) subject alternative names, and leaves that strict
  path validators such as the one sslyze uses (cryptography's RFC 5280
  verifier) accept, with a lifespan Mozilla's guidelines allow (90 days).
  Keys are ECDSA P-256 by default, or RSA 2048.
* `self_signed`: a one-off certificate with whatever odd property a test
  needs (dated, a weak key, no subject), not written anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import trustme
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


def utcnow() -> datetime.datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.datetime.now(datetime.timezone.utc)


def _now() -> datetime.datetime:
    return utcnow().replace(microsecond=0)


def leaf_of(der: bytes | None) -> x509.Certificate:
    """The certificate in DER form `der` (which must be there)."""
    assert der is not None
    return x509.load_der_x509_certificate(der)


Pair: TypeAlias = "tuple[Path, Path]"


def client_context(
    ca_file: Path,
    cert: Pair | None = None,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting `ca_file`, optionally presenting `cert`."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.maximum_version = maximum
    return context


# ------------------------------------------------------------------ trustme


class PKI:
    """A trustme CA in ``directory`` (``<name>.pem``) that writes leaves there.

    After `server_and_client` (what `make_pki` does) it also holds a server
    certificate for localhost, 127.0.0.1 and ::1 (``server.pem``/``.key``) and
    a client certificate (``client.pem``/``.key``, CN test-client).
    """

    server: trustme.LeafCert
    client: trustme.LeafCert
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def __init__(self, directory: Path, name: str = "ca", **ca_options: Any) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(**ca_options)
        self.ca_file = self.dir / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *identities: str, **kwargs: Any) -> trustme.LeafCert:
        """Issue a leaf for `identities` (default localhost); write name.pem (chain) and name.key.

        `kwargs` go to `trustme.CA.issue_cert` (common_name, not_before, not_after, key_type).
        """
        leaf = self.ca.issue_cert(*(identities or ("localhost",)), **kwargs)
        (self.dir / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (self.dir / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
        return leaf

    def pair(self, name: str, *identities: str, **kwargs: Any) -> Pair:
        """Like `issue`; returns (certfile, keyfile)."""
        self.issue(name, *identities, **kwargs)
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def server_and_client(self) -> PKI:
        """Issue the server and client certificates described above; returns self."""
        self.server = self.issue("server", "localhost", "127.0.0.1", "::1")
        self.client = self.issue("client", "client@example.org", common_name="test-client")
        self.cert_file, self.key_file = self.dir / "server.pem", self.dir / "server.key"
        self.client_cert_file = self.dir / "client.pem"
        self.client_key_file = self.dir / "client.key"
        return self

    def client_context(
        self,
        cert: Pair | None = None,
        *,
        with_client_cert: bool = False,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client context trusting this CA, presenting `cert` (or, with
        `with_client_cert`, the client certificate)."""
        if with_client_cert:
            cert = (self.client_cert_file, self.client_key_file)
        return client_context(self.ca_file, cert, minimum=minimum, maximum=maximum)

    def ssl_options(self, **extra: Any) -> dict[str, Any]:
        """Tornado-style ssl_options for the server certificate."""
        return {"certfile": str(self.cert_file), "keyfile": str(self.key_file), **extra}


def make_pki(directory: Path, **ca_options: Any) -> PKI:
    """A trustme CA with the server and client certificates, written to `directory`."""
    return PKI(directory, **ca_options).server_and_client()


# --------------------------------------------------------------- cryptography


def self_signed(
    key: PrivateKey,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    san: list[x509.GeneralName] | None = None,
    common_name: str | None = "peer",
    serial: int = 1234,
) -> x509.Certificate:
    """A certificate for `key`, signed by it, with no extensions but `san`."""
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "issuer")]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def encrypt_key(
    key_path: Path,
    password: bytes,
    *,
    out: Path | None = None,
    key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> Path:
    """Write the key in `key_path` encrypted with `password` (to `out`, by
    default ``<name>.enc.key`` beside it); return the new file."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    out = out or key_path.with_suffix(".enc.key")
    out.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, key_format, serialization.BestAvailableEncryption(password)
        )
    )
    return out


def pem_pair(cert: x509.Certificate, key: PrivateKey) -> bytes:
    """`cert` and `key` as one PEM file (what a combined certfile holds)."""
    return cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key)


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
