"""Naming why a TLS handshake failed, for ``ServerStats.failures``."""

from __future__ import annotations

import ssl

__all__ = ["classify_handshake_error"]

# OpenSSL reason codes that say what went wrong in a failed handshake.
_PLAINTEXT_REASONS = frozenset(
    {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG"}
)
_CERTIFICATE_REASONS = frozenset(
    {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "CERTIFICATE_VERIFY_FAILED",
        "NO_CERTIFICATE_RETURNED",
        "CERTIFICATE_REQUIRED",
    }
)
_EOF_REASONS = frozenset({"UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"})


def classify_handshake_error(error: BaseException) -> str:
    """Name the reason a TLS handshake failed: "timeout", "eof", "plaintext",
    "protocol", "certificate", "peer_alert" or "sni"."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        return "eof"
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, "reason", None) or ""  # None or unset when built by hand
        if reason in _PLAINTEXT_REASONS:
            return "plaintext"
        if reason in _CERTIFICATE_REASONS:
            return "certificate"
        if reason in _EOF_REASONS:
            return "eof"
        if reason == "CALLBACK_FAILED" or "UNRECOGNIZED_NAME" in reason:
            # Our only callback that fails a handshake is strict SNI's refusal.
            return "sni"
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "peer_alert"
        return "protocol"
    if isinstance(error, OSError):
        return "eof"
    return "protocol"
