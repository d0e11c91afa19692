"""Certificate inspection (cryptography) and a development PKI (trustme).

This module knows nothing of the rest of securetcp: it reads PEM files,
explains what is wrong with them in plain words, describes a peer's
certificate as a :class:`PeerIdentity`, and writes throw-away development
certificates for ``securetcp certs init``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

__all__ = [
    "CertificateFileError",
    "DevCertPaths",
    "PeerIdentity",
    "certificate_label",
    "certificate_warnings",
    "chain_order_problems",
    "days_left",
    "describe_certificate",
    "hostname_matches",
    "is_issued_by",
    "key_matches_certificate",
    "load_pem_certificates",
    "load_pem_private_key",
    "peer_identity_from_der",
    "public_key_info",
    "validity_problem",
    "write_dev_certs",
]

StrPath: TypeAlias = "str | os.PathLike[str]"
IPAddress: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"


class CertificateFileError(ValueError):
    """A certificate or key file is missing, unreadable or unusable.

    The message names the path and what is wrong with it.
    """


# -- reading files -----------------------------------------------------------


def _read(path: StrPath, what: str) -> bytes:
    """Read a whole file, turning OS errors into a CertificateFileError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateFileError(f"{what} {os.fspath(path)!s}: file does not exist") from None
    except IsADirectoryError:
        raise CertificateFileError(
            f"{what} {os.fspath(path)!s}: is a directory, not a file"
        ) from None
    except PermissionError:
        raise CertificateFileError(
            f"{what} {os.fspath(path)!s}: permission denied (cannot read the file)"
        ) from None
    except OSError as exc:
        raise CertificateFileError(
            f"{what} {os.fspath(path)!s}: cannot read: {exc.strerror or exc}"
        ) from None


def load_pem_certificates(path: StrPath) -> list[x509.Certificate]:
    """Load every certificate of a PEM file, leaf first.

    Raises :class:`CertificateFileError` if the file is missing or unreadable
    or holds no PEM certificate.
    """
    data = _read(path, "certificate file")
    if _CERT_MARKER not in data:
        hint = ""
        if data[:1] == b"\x30":
            hint = " (it looks like DER; convert it with `openssl x509 -inform der`)"
        elif _KEY_MARKER in data:
            hint = " (it holds a private key only)"
        raise CertificateFileError(
            f"certificate file {os.fspath(path)!s}: no PEM certificate "
            f"('{_CERT_MARKER.decode()}' block) found{hint}"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateFileError(
            f"certificate file {os.fspath(path)!s}: malformed PEM certificate: {exc}"
        ) from None


def load_pem_private_key(path: StrPath, password: str | bytes | None = None) -> PrivateKeyTypes:
    """Load the private key of a PEM file (which may also hold certificates).

    Raises :class:`CertificateFileError` if the file is missing or unreadable,
    holds no private key, holds an encrypted key and no password was given,
    or the password is wrong. A password given for an unencrypted key is
    ignored, as :meth:`ssl.SSLContext.load_cert_chain` does.
    """
    data = _read(path, "private key file")
    where = f"private key file {os.fspath(path)!s}"
    if _KEY_MARKER not in data:
        raise CertificateFileError(f"{where}: no PEM private key ('PRIVATE KEY' block) found")
    secret = password.encode() if isinstance(password, str) else password
    try:
        return serialization.load_pem_private_key(data, password=secret)
    except TypeError:
        if secret is None:
            raise CertificateFileError(
                f"{where}: the private key is encrypted and needs a password"
            ) from None
        # A password was given but the key is not encrypted.
        return _load_unencrypted_key(data, where)
    except ValueError as exc:
        if secret is not None and b"ENCRYPTED" in data:
            raise CertificateFileError(f"{where}: wrong password for the private key") from None
        raise CertificateFileError(f"{where}: malformed private key: {exc}") from None


def _load_unencrypted_key(data: bytes, where: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as exc:
        raise CertificateFileError(f"{where}: malformed private key: {exc}") from None


# -- checking ------------------------------------------------------------------


def _spki(public_key: object) -> bytes:
    to_bytes = getattr(public_key, "public_bytes", None)
    if to_bytes is None:  # pragma: no cover - every cryptography key has it
        return b""
    result: bytes = to_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return result


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """True if ``key`` is the private half of ``cert``'s public key."""
    return _spki(key.public_key()) == _spki(cert.public_key())


def _utcnow(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.timezone.utc)
    return now


def _fmt(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def validity_problem(cert: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """Why ``cert`` is not valid at ``now`` (default: the current time), or None."""
    now = _utcnow(now)
    if now > cert.not_valid_after_utc:
        return f"expired on {_fmt(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"not valid until {_fmt(cert.not_valid_before_utc)}"
    return None


def certificate_label(cert: x509.Certificate) -> str:
    """A short name for ``cert`` in messages: ``CN=...``, else its subject or serial."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        return f"CN={names[0].value!s}"
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _describe(cert: x509.Certificate) -> str:
    return f"certificate {certificate_label(cert)}"


def certificate_warnings(
    cert: x509.Certificate,
    now: datetime.datetime | None = None,
    expiry_warning_days: int = 14,
) -> list[str]:
    """Problems worth a warning in a certificate that is still usable.

    Reports a certificate that expires within ``expiry_warning_days`` days and
    an RSA key shorter than 2048 bits.
    """
    now = _utcnow(now)
    warnings: list[str] = []
    left = cert.not_valid_after_utc - now
    if datetime.timedelta(0) <= left < datetime.timedelta(days=expiry_warning_days):
        warnings.append(
            f"{_describe(cert)} expires in {left.days} day(s), on {_fmt(cert.not_valid_after_utc)}"
        )
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        warnings.append(
            f"{_describe(cert)} uses a weak {key.key_size}-bit RSA key (use 2048 bits or more)"
        )
    return warnings


# -- peer identity -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who a peer certificate says its holder is.

    ``uris`` includes SPIFFE IDs (``spiffe://example.org/service``);
    ``fingerprint_sha256`` is lowercase hex of the DER certificate;
    ``not_before``/``not_after`` are aware UTC datetimes.
    """

    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[IPAddress, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    serial: int
    fingerprint_sha256: str
    not_before: datetime.datetime
    not_after: datetime.datetime


def _common_name(cert: x509.Certificate) -> str | None:
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def peer_identity_from_certificate(cert: x509.Certificate) -> PeerIdentity:
    """Describe an already parsed certificate as a :class:`PeerIdentity`."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    ips = tuple(
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
    )
    return PeerIdentity(
        common_name=_common_name(cert),
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        ip_addresses=ips,
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        emails=tuple(san.get_values_for_type(x509.RFC822Name)),
        serial=cert.serial_number,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def peer_identity_from_der(der: bytes) -> PeerIdentity:
    """Parse a DER certificate (``getpeercert(binary_form=True)``) once."""
    return peer_identity_from_certificate(x509.load_der_x509_certificate(der))


# -- inspection ----------------------------------------------------------------


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    """OpenSSL's short name for an OID ("serverAuth"), or its dotted form."""
    name = getattr(oid, "_name", None)
    return name if isinstance(name, str) and name != "Unknown OID" else oid.dotted_string


def public_key_info(cert: x509.Certificate) -> dict[str, Any]:
    """The certificate's key: ``{"type": "RSA"|"EC"|"Ed25519"|..., "bits": n, "curve": ...}``.

    ``curve`` is the EC curve name (``secp256r1``), None for other key types.
    """
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return {"type": "RSA", "bits": key.key_size, "curve": None}
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"type": "EC", "bits": key.curve.key_size, "curve": key.curve.name}
    if isinstance(key, ed25519.Ed25519PublicKey):
        return {"type": "Ed25519", "bits": 256, "curve": None}
    if isinstance(key, ed448.Ed448PublicKey):
        return {"type": "Ed448", "bits": 456, "curve": None}
    if isinstance(key, dsa.DSAPublicKey):
        return {"type": "DSA", "bits": key.key_size, "curve": None}
    return {"type": type(key).__name__, "bits": None, "curve": None}


def days_left(cert: x509.Certificate, now: datetime.datetime | None = None) -> int:
    """Whole days until ``cert`` expires (negative once it has)."""
    return (cert.not_valid_after_utc - _utcnow(now)) // datetime.timedelta(days=1)


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s name and key signed ``cert``."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _extension(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[Any] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _key_usage(usage: x509.KeyUsage) -> list[str]:
    names = [name for name in _KEY_USAGES if getattr(usage, name)]
    if usage.key_agreement:
        names += [n for n in ("encipher_only", "decipher_only") if getattr(usage, n)]
    return names


def _general_name(name: x509.GeneralName) -> str:
    value = name.value
    if isinstance(value, x509.Name):
        return value.rfc4514_string()
    return str(value)


def describe_certificate(
    cert: x509.Certificate, now: datetime.datetime | None = None
) -> dict[str, Any]:
    """What matters in a certificate, as a JSON-ready dict (the ``certs show --json`` shape).

    Keys: ``subject``, ``issuer``, ``common_name``, ``serial`` (hex),
    ``not_before``/``not_after`` (ISO 8601 UTC), ``days_left``, ``key``
    (:func:`public_key_info`), ``signature_algorithm``, ``sha256``,
    ``self_signed``, ``subject_alt_names`` (``dns``, ``ip``, ``uri``,
    ``email`` lists), ``key_usage`` and ``extended_key_usage`` (lists of
    names, None when absent), ``basic_constraints`` (``ca``,
    ``path_length``, or None) and ``name_constraints`` (``permitted``,
    ``excluded``, or None).
    """
    identity = peer_identity_from_certificate(cert)
    key_usage = _extension(cert, x509.KeyUsage)
    eku = _extension(cert, x509.ExtendedKeyUsage)
    basic = _extension(cert, x509.BasicConstraints)
    constraints = _extension(cert, x509.NameConstraints)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "common_name": identity.common_name,
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "days_left": days_left(cert, now),
        "key": public_key_info(cert),
        "signature_algorithm": _oid_name(cert.signature_algorithm_oid),
        "sha256": identity.fingerprint_sha256,
        "self_signed": is_issued_by(cert, cert),
        "subject_alt_names": {
            "dns": list(identity.dns_names),
            "ip": [str(ip) for ip in identity.ip_addresses],
            "uri": list(identity.uris),
            "email": list(identity.emails),
        },
        "key_usage": None if key_usage is None else _key_usage(key_usage.value),
        "extended_key_usage": None if eku is None else [_oid_name(o) for o in eku.value],
        "basic_constraints": None
        if basic is None
        else {"ca": basic.value.ca, "path_length": basic.value.path_length},
        "name_constraints": None
        if constraints is None
        else {
            "permitted": [_general_name(n) for n in constraints.value.permitted_subtrees or ()],
            "excluded": [_general_name(n) for n in constraints.value.excluded_subtrees or ()],
        },
    }


def chain_order_problems(chain: Sequence[x509.Certificate]) -> list[str]:
    """Why ``chain`` (as a server would send it) is not leaf first, each issued by the next.

    An empty list means every certificate is signed by the one after it.
    Certificates that belong to the chain but are out of place are told
    apart from ones that belong to no chain at all.
    """
    problems: list[str] = []
    for i in range(len(chain) - 1):
        cert, following = chain[i], chain[i + 1]
        if is_issued_by(cert, following):
            continue
        issuers = [j + 1 for j, other in enumerate(chain) if j != i and is_issued_by(cert, other)]
        issued = [j + 1 for j, other in enumerate(chain) if j != i and is_issued_by(other, cert)]
        if issuers:
            where = f"its issuer is certificate {issuers[0]}: the chain is out of order"
        elif issued:
            where = (
                f"it issued certificate {issued[0]}, which must come before it: "
                "the chain is out of order (leaf first, then each issuer)"
            )
        else:
            where = "the next certificate did not issue it"
        problems.append(
            f"certificate {i + 1} ({certificate_label(cert)}) is followed by "
            f"certificate {i + 2} ({certificate_label(following)}), but {where}"
        )
    return problems


def _hostname_key(name: str) -> str:
    """A DNS name compared the way certificates spell it: A-labels, lowercase, no final dot."""
    name = name.rstrip(".")
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        name = name.encode("idna").decode("ascii")
    return name.lower()


def _wildcard_matches(pattern: str, name: str) -> bool:
    """RFC 6125 section 6.4.3, as browsers apply it.

    The wildcard must be the whole left-most label and stands for exactly one
    non-empty label; it never matches an IDN A-label, and at least two labels
    must follow it (no ``*.com``).
    """
    labels = pattern.split(".")
    if labels[0] != "*" or len(labels) < 3 or "*" in ".".join(labels[1:]):
        return False
    first, _, rest = name.partition(".")
    return bool(first) and not first.startswith("xn--") and rest == ".".join(labels[1:])


def hostname_matches(cert: x509.Certificate, hostname: str) -> bool:
    """True if ``cert``'s subjectAltName covers ``hostname`` (a DNS name or an IP address).

    IP addresses match IP entries only; DNS names match DNS entries exactly
    (case-insensitive) or through a wildcard per RFC 6125. The subject's
    common name is not used, as modern clients no longer do.
    """
    identity = peer_identity_from_certificate(cert)
    try:
        address = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        pass
    else:
        return address in identity.ip_addresses
    name = _hostname_key(hostname)
    for pattern in identity.dns_names:
        pattern = _hostname_key(pattern)
        if pattern == name or _wildcard_matches(pattern, name):
            return True
    return False


# -- development PKI -----------------------------------------------------------


@dataclass(frozen=True)
class DevCertPaths:
    """Where :func:`write_dev_certs` put the development PKI."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def all(self) -> tuple[Path, ...]:
        """Every path, CA first."""
        return (self.ca, self.server_cert, self.server_key, self.client_cert, self.client_key)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with ``mode`` and renamed over ``path``.

    Keys are never visible with looser permissions, nor half written.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_dev_certs(
    directory: StrPath,
    *,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    client_name: str = "securetcp-dev-client",
    overwrite: bool = False,
) -> DevCertPaths:
    """Write a development CA, a server and a client certificate with trustme.

    Files: ``ca.pem``, ``server.pem`` (leaf + chain), ``server.key``,
    ``client.pem``, ``client.key``; keys get mode 0600. If all files exist
    and not ``overwrite``, nothing is written. If only some exist, raises
    FileExistsError rather than mixing two PKIs (pass ``overwrite=True``).
    """
    import trustme  # imported here: only the dev PKI needs it

    root = Path(directory)
    paths = DevCertPaths(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
    )
    existing = [p for p in paths.all() if p.exists()]
    if existing and not overwrite:
        if len(existing) == len(paths.all()):
            return paths
        missing = ", ".join(p.name for p in paths.all() if p not in existing)
        raise FileExistsError(
            f"{root}: incomplete development certificates ({missing} missing); "
            "use overwrite=True to write a new set"
        )
    if not hostnames:
        raise ValueError("write_dev_certs: hostnames must name at least one host")
    root.mkdir(parents=True, exist_ok=True)

    ca = trustme.CA(organization_name="securetcp development CA")
    server = ca.issue_cert(*hostnames, common_name=hostnames[0])
    client = ca.issue_cert(client_name, common_name=client_name)

    _write_atomically(paths.ca, ca.cert_pem.bytes(), 0o644)
    _write_atomically(paths.server_key, server.private_key_pem.bytes(), 0o600)
    _write_atomically(paths.server_cert, b"".join(b.bytes() for b in server.cert_chain_pems), 0o644)
    _write_atomically(paths.client_key, client.private_key_pem.bytes(), 0o600)
    _write_atomically(paths.client_cert, b"".join(b.bytes() for b in client.cert_chain_pems), 0o644)
    return paths
