"""Loading and checking what TLS reads from disk: key pairs, CA files and
directories, the key log, cipher strings.

Every function raises :class:`SSLOptionsError` whose message names the
option (``option``) and the path, so a mistake is reported at construction.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import TypeAlias

from cryptography import x509

from securetcp import certs
from securetcp.tls.errors import SSLOptionsError

__all__ = [
    "KeyPair",
    "apply_keylog",
    "load_ca",
    "load_pair",
    "set_ciphers",
    "use_pair",
    "warn_about",
]

log = logging.getLogger("securetcp.tls")

StrPath: TypeAlias = "str | os.PathLike[str]"


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its key, checked with cryptography."""

    certfile: str
    keyfile: str | None
    #: Decrypts the key; kept out of the repr (and so out of logs).
    password: bytes | None = field(repr=False)
    chain: list[x509.Certificate] = field(repr=False)
    option: str

    @property
    def leaf(self) -> x509.Certificate:
        """The certificate itself (the first of the chain)."""
        return self.chain[0]


def load_pair(
    certfile: StrPath,
    keyfile: StrPath | None,
    password: str | bytes | None,
    cert_option: str,
    key_option: str,
) -> KeyPair:
    """Load and check a pair; the error names ``cert_option``/``key_option``."""
    try:
        chain = certs.load_pem_certificates(certfile)
    except certs.CertificateFileError as exc:
        raise SSLOptionsError(f"{cert_option}: {exc}") from None
    key_path = certfile if keyfile is None else keyfile
    key_name = cert_option if keyfile is None else key_option
    try:
        key = certs.load_pem_private_key(key_path, password)
    except certs.CertificateFileError as exc:
        raise SSLOptionsError(f"{key_name}: {exc}") from None
    if not certs.key_matches_certificate(key, chain[0]):
        raise SSLOptionsError(
            f"{key_name}: the private key in {os.fspath(key_path)!s} does not match "
            f"the certificate in {os.fspath(certfile)!s}"
        )
    problem = certs.validity_problem(chain[0])
    if problem is not None:
        raise SSLOptionsError(f"{cert_option}: certificate {os.fspath(certfile)!s} {problem}")
    secret = password.encode() if isinstance(password, str) else password
    return KeyPair(
        os.fspath(certfile),
        None if keyfile is None else os.fspath(keyfile),
        secret,
        chain,
        cert_option,
    )


def use_pair(context: ssl.SSLContext, pair: KeyPair) -> None:
    """Load a checked pair into ``context`` (OpenSSL may still refuse it)."""
    # A callable password, never None: OpenSSL would prompt on the terminal.
    secret = pair.password or b""
    try:
        context.load_cert_chain(pair.certfile, pair.keyfile, password=lambda: secret)
    except (ssl.SSLError, OSError) as exc:
        raise SSLOptionsError(
            f"{pair.option}: OpenSSL cannot use {pair.certfile}"
            f"{'' if pair.keyfile is None else ' with ' + pair.keyfile}: {exc}"
        ) from None


def warn_about(pair: KeyPair) -> None:
    """Log what is worrying about a usable certificate (expiring soon, weak key...)."""
    for warning in certs.certificate_warnings(pair.leaf):
        log.warning("%s: %s (%s)", pair.option, warning, pair.certfile)


def load_ca(context: ssl.SSLContext, path: StrPath, option: str) -> None:
    """Trust the CA certificates of a PEM file or of every PEM file in a directory."""
    ca_path = os.fspath(path)
    files = ca_files(ca_path, option) if os.path.isdir(ca_path) else [ca_path]
    for file in files:
        try:
            certs.load_pem_certificates(file)
            context.load_verify_locations(cafile=file)
        except certs.CertificateFileError as exc:
            raise SSLOptionsError(f"{option}: {exc}") from None
        except (ssl.SSLError, OSError) as exc:
            raise SSLOptionsError(f"{option}: OpenSSL cannot load CA file {file}: {exc}") from None


def ca_files(directory: str, option: str) -> list[str]:
    """The PEM certificate files of a CA directory (hash links counted once).

    Loaded eagerly (not as OpenSSL's capath) so no c_rehash is needed and a
    bad file shows now: a file that cannot be read is an error naming it,
    not silently skipped (it may be the CA that was meant to be trusted).
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise SSLOptionsError(
            f"{option}: cannot read directory {directory}: {exc.strerror or exc}"
        ) from None
    files: dict[str, str] = {}
    for name in names:
        file = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(file):
            continue
        try:
            with open(file, "rb") as f:
                holds_cert = b"-----BEGIN CERTIFICATE-----" in f.read()
        except OSError as exc:
            raise SSLOptionsError(
                f"{option}: cannot read {file} in CA directory {directory}: {exc.strerror or exc}"
            ) from None
        if holds_cert:
            files.setdefault(os.path.realpath(file), file)
    if not files:
        raise SSLOptionsError(f"{option}: no PEM certificate file in directory {directory}")
    return list(files.values())


def apply_keylog(context: ssl.SSLContext, keylog_file: StrPath | None, option: str) -> None:
    """Write TLS secrets for Wireshark to ``keylog_file``, else to $SSLKEYLOGFILE."""
    path = keylog_file if keylog_file is not None else os.environ.get("SSLKEYLOGFILE")
    if not path:
        return
    try:
        context.keylog_filename = os.fspath(path)
    except OSError as exc:
        raise SSLOptionsError(
            f"{option}: cannot open key log file {os.fspath(path)!s}: {exc.strerror or exc}"
        ) from None


def set_ciphers(context: ssl.SSLContext, ciphers: str, option: str) -> None:
    """``context.set_ciphers``, with an error naming the option."""
    try:
        context.set_ciphers(ciphers)
    except (ssl.SSLError, TypeError) as exc:
        raise SSLOptionsError(
            f"{option}: OpenSSL rejects the cipher string {ciphers!r}: {exc}"
        ) from None
