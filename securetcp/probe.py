"""What ``openssl s_client`` tells, as values: the logic behind ``securetcp probe``.

:func:`probe` connects to a TLS server with blocking sockets and an
``ssl.SSLObject`` over memory buffers, so it sees every byte the server
sends: a reply that is not TLS at all, a TLS 1.2 CertificateRequest, or the
alert a TLS 1.3 server sends *after* the handshake when it wanted a client
certificate. It verifies like any careful client (the CA file, or certifi,
and the hostname) and, when that fails, connects once more without
verifying to report what the server offers anyway.

Every failure gets a :attr:`ProbeFailure.kind` from a fixed vocabulary
(:data:`FAILURE_KINDS`) and a sentence naming the host and what is wrong.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from cryptography import x509

from securetcp._logging import format_address
from securetcp.certs import certificate_label, describe_certificate

__all__ = ["FAILURE_KINDS", "ProbeFailure", "ProbeResult", "parse_target", "probe"]

StrPath: TypeAlias = "str | os.PathLike[str]"

#: Every ``ProbeFailure.kind``; the certificate ones are those of ``services.badssl``.
FAILURE_KINDS = (
    "resolve",
    "refused",
    "unreachable",
    "timeout",
    "not_tls",
    "closed",
    "protocol_version",
    "handshake_failure",
    "expired",
    "not_yet_valid",
    "hostname_mismatch",
    "self_signed",
    "untrusted",
    "weak_key",
    "client_certificate_required",
    "client_certificate_rejected",
)

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) and what a person calls them.
_VERIFY_KINDS = {
    9: "not_yet_valid",
    10: "expired",
    13: "not_yet_valid",  # CA certificate not yet valid
    18: "self_signed",
    19: "untrusted",  # self-signed certificate in chain
    20: "untrusted",  # unable to get local issuer certificate
    21: "untrusted",  # unable to verify the first certificate
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
    66: "weak_key",  # EE key too small
    67: "weak_key",  # CA key too small
    68: "weak_key",  # CA digest too weak
}
_PROTOCOL_REASONS = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
        "WRONG_SSL_VERSION",
        "TLSV1_ALERT_INAPPROPRIATE_FALLBACK",
    }
)
_CLIENT_CERT_REJECTED = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
_CERT_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"

# TLS record and handshake types (RFC 8446 / 5246).
_HANDSHAKE, _ALERT, _CHANGE_CIPHER_SPEC = 22, 21, 20
_TLS_RECORD_TYPES = frozenset({20, 21, 22, 23})
_CERTIFICATE_REQUEST = 13

# NIDs that SSL_get_negotiated_group returns (OpenSSL obj_mac.h).
_GROUP_NAMES = {
    1034: "X25519",
    1035: "X448",
    415: "secp256r1",
    715: "secp384r1",
    716: "secp521r1",
    1126: "ffdhe2048",
    1127: "ffdhe3072",
    1128: "ffdhe4096",
    1129: "ffdhe6144",
    1130: "ffdhe8192",
}
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134
_RECORD_LIMIT = 64 * 1024  # of the server's first bytes kept for a diagnosis
_TICKET_WAIT = 1.0  # seconds to wait after the handshake for tickets or a late alert


@dataclass(frozen=True)
class ProbeFailure:
    """Why a probe did not end with a verified TLS connection."""

    kind: str
    """One of :data:`FAILURE_KINDS`."""
    message: str
    """One sentence naming the host and what is wrong."""


@dataclass
class ProbeResult:
    """What a probe found. ``ok`` only when the server's chain verified."""

    host: str
    port: int
    server_name: str | None
    address: str | None = None
    protocol: str | None = None
    cipher: str | None = None
    cipher_bits: int | None = None
    group: str | None = None
    alpn: str | None = None
    session_ticket: bool | None = None
    client_certificate_requested: bool | None = None
    chain: list[x509.Certificate] = field(default_factory=list)
    chain_complete: bool = True
    """False when only the leaf could be read (see ``_peer_chain``)."""
    verified: bool = False
    failure: ProbeFailure | None = None

    @property
    def ok(self) -> bool:
        """True when the handshake completed and the chain and hostname verified."""
        return self.verified and self.failure is None

    def to_json(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        """The ``probe --json`` shape (documented in the README)."""
        tls = None
        if self.protocol is not None:
            tls = {
                "protocol": self.protocol,
                "cipher": self.cipher,
                "cipher_bits": self.cipher_bits,
                "group": self.group,
                "alpn": self.alpn,
                "session_ticket": self.session_ticket,
                "client_certificate_requested": self.client_certificate_requested,
            }
        return {
            "host": self.host,
            "port": self.port,
            "server_name": self.server_name,
            "address": self.address,
            "ok": self.ok,
            "verified": self.verified,
            "failure": None
            if self.failure is None
            else {"kind": self.failure.kind, "message": self.failure.message},
            "tls": tls,
            "chain": [describe_certificate(c, now) for c in self.chain],
            "chain_complete": self.chain_complete,
        }


def parse_target(target: str, default_port: int = 443) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``v6`` or ``host`` as (host, port); ValueError if malformed."""
    text = target.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{target!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else str(default_port)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, str(default_port)
    else:
        host, port_text = text, str(default_port)
    if not host:
        raise ValueError(f"{target!r}: no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{target!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{target!r}: port {port} is out of range")
    return host, port


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining


class _Connection:
    """A TLS client over a blocking socket and memory BIOs; records what came in."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_name: str | None):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.received = bytearray()  # the server's bytes up to the end of the handshake

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self, deadline: _Deadline, record: bool) -> bool:
        self.sock.settimeout(deadline.left())
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError from None
        if not data:
            self.incoming.write_eof()
            return False
        if record and len(self.received) < _RECORD_LIMIT:
            self.received += data[: _RECORD_LIMIT - len(self.received)]
        self.incoming.write(data)
        return True

    def handshake(self, deadline: _Deadline) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill(deadline, record=True) and not self.received:
                    raise ConnectionResetError("closed before replying") from None
            except ssl.SSLError:
                # Send the alert OpenSSL wrote (bad certificate...), as a real client does.
                with contextlib.suppress(OSError):
                    self._flush()
                raise
        self._flush()

    def settle(self, deadline: _Deadline) -> None:
        """Read briefly after the handshake: TLS 1.3 tickets, or an alert refusing us."""
        while not (self.tls.session is not None and self.tls.session.has_ticket):
            try:
                self.tls.read(1024)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill(deadline, record=False):
                    self.tls.read(1024)  # raises the EOF (or alert) it ends with
                    raise ConnectionResetError("closed after the handshake") from None
            else:
                continue  # application data (a banner, say): keep reading

    def close(self) -> None:
        try:
            self.tls.unwrap()
            self._flush()
        except (OSError, ssl.SSLError, ValueError):
            pass
        self.sock.close()


def _handshake_messages(data: bytes) -> list[int]:
    """Types of the plaintext handshake messages in the server's first bytes (TLS 1.2)."""
    payload = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        kind, length = data[pos], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if kind != _HANDSHAKE:
            break  # ChangeCipherSpec: what follows is encrypted
        payload += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    types: list[int] = []
    pos = 0
    while pos + 4 <= len(payload):
        types.append(payload[pos])
        pos += 4 + int.from_bytes(payload[pos + 1 : pos + 4], "big")
    return types


def _negotiated_group(tls: ssl.SSLObject) -> str:
    """The key-exchange group's name, or "unknown" where Python cannot tell."""
    native = getattr(tls, "group", None)  # Python 3.15+
    if callable(native):
        name = native()
        return str(name) if name else "unknown"
    try:
        from securetcp._openssl import libssl, ssl_pointer

        lib = libssl()
        pointer = ssl_pointer(getattr(tls, "_sslobj", None)) if lib is not None else 0
        if lib is None or not pointer:
            return "unknown"
        nid = lib.ssl_ctrl(pointer, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
    except (ImportError, OSError, AttributeError, TypeError, ValueError):
        return "unknown"
    return _GROUP_NAMES.get(nid & 0xFFFFFFFF, "unknown")


def _der(certificate: Any) -> bytes:
    import _ssl

    der: bytes = certificate.public_bytes(_ssl.ENCODING_DER)
    return der


def _peer_chain(tls: ssl.SSLObject) -> tuple[list[x509.Certificate], bool]:
    """The certificates the server sent, leaf first, and whether that is all of them.

    ``get_unverified_chain`` is public from Python 3.13; on 3.10 to 3.12 the
    same method exists on the ``_ssl`` object underneath. Without either,
    only the leaf is known.
    """
    method = getattr(tls, "get_unverified_chain", None)
    if method is None:
        method = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if method is not None:
        try:
            items = method() or []
            # 3.13+ gives DER bytes; the private method, _ssl.Certificate objects.
            ders = [item if isinstance(item, bytes) else _der(item) for item in items]
            return [x509.load_der_x509_certificate(der) for der in ders], True
        except (ValueError, AttributeError, TypeError, ssl.SSLError):
            pass
    der = tls.getpeercert(binary_form=True)
    return ([x509.load_der_x509_certificate(der)] if der else []), False


def _context(
    verify: bool,
    ca: StrPath | None,
    cert: StrPath | None,
    key: StrPath | None,
    alpn: Sequence[str],
    version: str | None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        if ca is None:
            import certifi

            context.load_verify_locations(cafile=certifi.where())
        elif os.path.isdir(ca):
            context.load_verify_locations(capath=os.fspath(ca))
        else:
            context.load_verify_locations(cafile=os.fspath(ca))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    where = format_address((host, port))
    try:
        return socket.create_connection((host, port), timeout=deadline.left())
    except socket.gaierror as e:
        raise _Failed("resolve", f"cannot resolve {host}: {e.strerror or e}") from None
    except ConnectionRefusedError:
        raise _Failed(
            "refused", f"{where} refused the connection (nothing listens there)"
        ) from None
    except TimeoutError:
        raise _Failed(
            "timeout", f"{where}: no TCP connection within {deadline.seconds:g} s"
        ) from None
    except OSError as e:
        raise _Failed("unreachable", f"{where}: cannot connect: {e.strerror or e}") from None


class _Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.failure = ProbeFailure(kind, message)


def _verify_failure(error: ssl.SSLCertVerificationError, where: str, name: str | None) -> _Failed:
    code = getattr(error, "verify_code", None)
    detail = getattr(error, "verify_message", None) or str(error)
    kind = _VERIFY_KINDS.get(code if isinstance(code, int) else -1, "untrusted")
    if kind == "hostname_mismatch":
        return _Failed(kind, f"{where}: the certificate does not cover {name!r} ({detail})")
    if kind == "untrusted" and code in (20, 21):
        detail += (
            " (the server does not send the intermediate certificate, "
            "or its CA is not the one you trust)"
        )
    return _Failed(kind, f"{where}: the certificate does not verify: {detail}")


def _handshake_failure(
    error: BaseException, conn: _Connection, where: str, with_cert: bool, version: str | None
) -> _Failed:
    received = bytes(conn.received)
    if received and received[0] not in _TLS_RECORD_TYPES:
        shown = received[:40].decode("ascii", "replace").strip()
        return _Failed("not_tls", f"{where} does not speak TLS (it answered {shown!r})")
    if isinstance(error, ssl.SSLCertVerificationError):
        return _verify_failure(error, where, conn.tls.server_hostname)
    requested = _CERTIFICATE_REQUEST in _handshake_messages(received)
    reason = getattr(error, "reason", None) or ""
    if isinstance(error, ssl.SSLError) and reason:
        text = reason.replace("_", " ").lower()
        if reason in _PROTOCOL_REASONS:
            wanted = f"TLS {version}" if version else "TLS 1.2 or 1.3"
            return _Failed(
                "protocol_version", f"{where}: no common protocol version ({wanted}): {text}"
            )
        if reason == _CERT_REQUIRED or (requested and not with_cert):
            return _Failed(
                "client_certificate_required",
                f"{where} requires a client certificate (give one with --cert and --key)",
            )
        if reason in _CLIENT_CERT_REJECTED and with_cert:
            return _Failed(
                "client_certificate_rejected", f"{where} rejected our client certificate: {text}"
            )
        if "UNRECOGNIZED_NAME" in reason:
            return _Failed(
                "handshake_failure",
                f"{where} does not serve the name {conn.tls.server_hostname!r} (SNI): {text}",
            )
        return _Failed("handshake_failure", f"{where}: the TLS handshake failed: {text}")
    if isinstance(error, TimeoutError):
        if not received:
            return _Failed(
                "timeout",
                f"{where} accepted the connection but sent no TLS reply "
                "(not a TLS server, or a busy one)",
            )
        return _Failed("timeout", f"{where}: the TLS handshake did not complete in time")
    if not received:
        return _Failed(
            "closed",
            f"{where} closed the connection without replying to our TLS hello "
            "(not TLS, or it refused us: try --servername or --tls1.2)",
        )
    return _Failed("closed", f"{where} closed the connection during the TLS handshake")


def _after_handshake_failure(error: BaseException, where: str, with_cert: bool) -> _Failed:
    reason = getattr(error, "reason", None) or ""
    if reason == _CERT_REQUIRED:
        return _Failed(
            "client_certificate_required",
            f"{where} requires a client certificate (give one with --cert and --key)",
        )
    if reason in _CLIENT_CERT_REJECTED:
        who = "our client certificate" if with_cert else "the connection"
        return _Failed("client_certificate_rejected", f"{where} rejected {who}: {reason.lower()}")
    return _Failed(
        "closed",
        f"{where} closed the connection right after the handshake "
        "(it may not accept this client or its certificate)",
    )


def _attempt(
    result: ProbeResult,
    context: ssl.SSLContext,
    deadline: _Deadline,
    with_cert: bool,
    version: str | None,
) -> None:
    """One connection: fill ``result`` with what it shows; raise _Failed if it fails."""
    where = format_address((result.host, result.port))
    sock = _connect(result.host, result.port, deadline)
    peer = sock.getpeername()
    result.address = format_address((peer[0], peer[1]))
    conn = _Connection(sock, context, result.server_name)
    try:
        try:
            conn.handshake(deadline)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            raise _handshake_failure(e, conn, where, with_cert, version) from None
        tls = conn.tls
        result.protocol = tls.version()
        cipher = tls.cipher()
        if cipher is not None:
            result.cipher, result.cipher_bits = cipher[0], cipher[2]
        result.alpn = tls.selected_alpn_protocol()
        result.group = _negotiated_group(tls)
        result.chain, result.chain_complete = _peer_chain(tls)
        if result.protocol == "TLSv1.2":
            result.client_certificate_requested = _CERTIFICATE_REQUEST in _handshake_messages(
                bytes(conn.received)
            )
        try:
            conn.settle(_Deadline(min(_TICKET_WAIT, max(deadline.end - time.monotonic(), 0.05))))
        except TimeoutError:
            pass  # quiet server: nothing refused us
        except (OSError, ssl.SSLError) as e:
            raise _after_handshake_failure(e, where, with_cert) from None
        finally:
            session = tls.session
            result.session_ticket = bool(session is not None and session.has_ticket)
    finally:
        conn.close()


def probe(
    host: str,
    port: int,
    *,
    server_name: str | None = None,
    ca: StrPath | None = None,
    cert: StrPath | None = None,
    key: StrPath | None = None,
    alpn: Sequence[str] = (),
    version: str | None = None,
    timeout: float = 10.0,
) -> ProbeResult:
    """Connect to ``host:port``, verify, and report what the server offers.

    ``server_name`` (default ``host``) is sent as SNI and checked against
    the certificate; ``ca`` None trusts certifi. ``version`` "1.2" or "1.3"
    pins the protocol. Each connection is bounded by ``timeout`` seconds.
    Raises ``ssl.SSLError``/``OSError`` only for unusable local files
    (``ca``, ``cert``, ``key``); every network outcome is in the result.
    """
    name = server_name or host
    result = ProbeResult(host=host, port=port, server_name=name)
    verifying = _context(True, ca, cert, key, alpn, version)
    with_cert = cert is not None
    try:
        _attempt(result, verifying, _Deadline(timeout), with_cert, version)
    except _Failed as failed:
        result.failure = failed.failure
        if failed.failure.kind not in _VERIFY_KINDS.values():
            return result
    else:
        result.verified = True
        return result
    # The chain did not verify: look again without verifying, for the facts.
    failure = result.failure
    try:
        _attempt(
            result,
            _context(False, None, cert, key, alpn, version),
            _Deadline(timeout),
            with_cert,
            version,
        )
    except _Failed:
        pass
    result.failure = failure
    return result


def summary(result: ProbeResult) -> str:
    """One line: what was found, or why it failed."""
    if result.failure is not None:
        return result.failure.message
    leaf = certificate_label(result.chain[0]) if result.chain else "no certificate"
    where = format_address((result.host, result.port))
    return f"{where}: {result.protocol} {result.cipher}, {leaf}, verified"
