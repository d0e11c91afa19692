"""The scenario catalogue: what each badssl server does wrong, and what clients must see.

`SCENARIOS` maps a name to a `Scenario`. Its `expect` is the outcome a client
that verifies correctly sees (Python's ``ssl.create_default_context(cafile=CA)``
connecting with ``server_hostname=scenario.server_name``); `clients` records
where OpenSSL's ``s_client -verify_return_error`` or GnuTLS's ``gnutls-cli``
legitimately see something else. `credential()` builds the certificate chain a
scenario serves from a `BadSSLPKI`.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeAlias

import trustme
from cryptography.hazmat.primitives.asymmetric import rsa

from securetcp.services.badssl.pki import (
    DAY,
    Authority,
    BadSSLPKI,
    Credential,
    KeyKind,
    corrupt_signature,
    der,
    new_key,
    resign_with_sha1,
    self_signed,
)

__all__ = [
    "CLIENTS",
    "EXPECT_VALUES",
    "SCENARIOS",
    "VERIFY_CODE_OUTCOMES",
    "Scenario",
    "classify_error",
    "credential",
]

#: Every value `Scenario.expect` can take, and what it means for a client.
EXPECT_VALUES: Mapping[str, str] = MappingProxyType(
    {
        "ok": "the handshake completes and the certificate verifies",
        "expired": "a certificate in the chain is past its notAfter (X509 verify code 10)",
        "not_yet_valid": "a certificate in the chain is before its notBefore (code 9)",
        "hostname_mismatch": "the certificate does not cover the host name (code 62)",
        "untrusted": "the chain ends in a root the client does not trust (code 19)",
        "self_signed": "the server certificate is self-signed (code 18)",
        "incomplete_chain": "the server does not send the intermediate (code 20)",
        "client_certificate_required": "the server refuses a client without a certificate "
        "(TLS alert certificate_required, or handshake_failure before TLS 1.3)",
        "protocol_version": "no TLS version both sides allow (TLS alert protocol_version)",
        "weak_key": "the server key is too small for the client's security level (code 66)",
        "handshake_failure": "no cipher suite both sides allow (TLS alert handshake_failure)",
        "name_constraints": "a CA's name constraints exclude the server's name (code 48)",
        "bad_signature": "a certificate's signature does not verify (code 7)",
        "wrong_purpose": "the certificate is not for TLS servers (extended key usage, code 26)",
        "weak_signature": "a certificate is signed with a digest too weak (SHA-1, code 68)",
        "revoked": "the certificate is listed in its issuer's CRL (code 23, CRL checking on)",
    }
)

#: OpenSSL X509 verify codes (``SSLCertVerificationError.verify_code``, s_client's
#: "Verify return code") and the outcome each one means.
VERIFY_CODE_OUTCOMES: Mapping[int, str] = MappingProxyType(
    {
        0: "ok",
        7: "bad_signature",
        9: "not_yet_valid",
        10: "expired",
        18: "self_signed",
        19: "untrusted",
        20: "incomplete_chain",
        23: "revoked",
        26: "wrong_purpose",
        47: "name_constraints",
        48: "name_constraints",
        62: "hostname_mismatch",
        66: "weak_key",
        68: "weak_signature",
    }
)

#: The clients a scenario may give its own expectation for.
CLIENTS = ("python", "openssl", "gnutls", "curl")

TLSVersionName: TypeAlias = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]


@dataclass(frozen=True)
class Scenario:
    """One deliberately (mis)configured TLS server and the outcome clients must see."""

    name: str
    description: str
    expect: str
    """What Python's ``ssl`` with default verification sees (a key of `EXPECT_VALUES`)."""
    server_name: str = "localhost"
    """The host name the client verifies (and sends as SNI); connect to the harness host."""
    verify_code: int | None = None
    """The X509 verify code Python and OpenSSL report, when verification fails."""
    clients: Mapping[str, str] = field(default_factory=dict)
    """Per-client outcomes where they legitimately differ from `expect` ("openssl", ...)."""
    expect_with_crl: str | None = None
    """The outcome for a client that loads the harness CRL with ``VERIFY_CRL_CHECK_LEAF``."""
    note: str = ""
    """Why clients differ, or what else a test should check."""
    tls_versions: tuple[TLSVersionName, TLSVersionName] | None = None
    """(minimum, maximum) protocol version the server allows; None: its defaults."""
    ciphers: str | None = None
    """The server's TLS 1.2 cipher string; None: OpenSSL's default."""
    security_level_0: bool = False
    """The server runs at OpenSSL security level 0 (weak keys, digests, old protocols)."""
    client_auth: Literal["none", "optional", "required"] = "none"
    alpn: tuple[str, ...] = ()
    """ALPN protocols the server selects from (empty: no ALPN)."""

    def expect_for(self, client: str) -> str:
        """The outcome `client` ("python", "openssl", "gnutls", "curl") must see."""
        if client not in CLIENTS:
            raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
        if client == "curl":  # curl here is built on OpenSSL
            return self.clients.get("curl", self.clients.get("openssl", self.expect))
        return self.clients.get(client, self.expect)

    def sni_name(self) -> str:
        """The host name that selects this scenario on the harness's SNI port."""
        if self.server_name.endswith(".badssl.test"):
            return self.server_name
        return f"{self.name}.badssl.test"


def classify_error(error: BaseException | None) -> str:
    """The `EXPECT_VALUES` outcome a Python ``ssl`` exception (or None: "ok") stands for.

    Certificate errors are read from ``verify_code``; alerts from the OpenSSL
    reason. Anything else is ``"handshake_failure"``.
    """
    if error is None:
        return "ok"
    if isinstance(error, ssl.SSLCertVerificationError):
        return VERIFY_CODE_OUTCOMES.get(error.verify_code, "handshake_failure")
    reason = getattr(error, "reason", None) or ""
    if "CERTIFICATE_REQUIRED" in reason:
        return "client_certificate_required"
    if "PROTOCOL_VERSION" in reason or reason in {
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "WRONG_SSL_VERSION",
    }:
        return "protocol_version"
    return "handshake_failure"


# -- certificates ------------------------------------------------------------------------


def _names(name: str) -> list[str]:
    """What an ordinary scenario certificate covers: loopback and its SNI name."""
    return ["localhost", "127.0.0.1", "::1", f"{name}.badssl.test"]


def _leaf(
    pki: BadSSLPKI,
    name: str,
    *,
    key_kind: KeyKind = "ec256",
    names: list[str] | None = None,
    **options: object,
) -> Credential:
    key = pki.new_key(key_kind)
    cert = pki.intermediate.issue_leaf(
        _names(name) if names is None else names,
        common_name=f"{name}.badssl.test",
        key=key,
        **options,  # type: ignore[arg-type]
    )
    return Credential((der(cert), der(pki.intermediate.cert)), key)


def _dated(pki: BadSSLPKI, name: str, start_days: int, end_days: int) -> Credential:
    now = datetime.datetime.now(datetime.timezone.utc)
    return _leaf(pki, name, not_before=now + start_days * DAY, not_after=now + end_days * DAY)


def _self_signed(pki: BadSSLPKI, name: str) -> Credential:
    key = new_key("ec256")
    cert = self_signed(_names(name), common_name=f"{name}.badssl.test", key=key)
    return Credential((der(cert),), key)


def _untrusted_root(pki: BadSSLPKI, name: str) -> Credential:
    root = Authority.from_trustme(trustme.CA(organization_name="securetcp badssl UNTRUSTED"))
    key = new_key("ec256")
    cert = root.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    return Credential((der(cert), der(root.cert)), key)


def _incomplete(pki: BadSSLPKI, name: str) -> Credential:
    full = _leaf(pki, name)
    return Credential(full.chain[:1], full.key)


def _chain_of(pki: BadSSLPKI, name: str, depth: int, *, reverse: bool) -> Credential:
    authorities = [pki.root.issue_ca(f"securetcp badssl {name} 1")]
    for i in range(2, depth + 1):
        authorities.append(authorities[-1].issue_ca(f"securetcp badssl {name} {i}"))
    key = new_key("ec256")
    leaf = authorities[-1].issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    # Sent leaf first, then issuer by issuer; "reverse" sends the intermediates root-first.
    cas = [der(a.cert) for a in reversed(authorities)]
    if reverse:
        cas.reverse()
    return Credential((der(leaf), *cas), key)


def _expired_intermediate(pki: BadSSLPKI, name: str) -> Credential:
    now = datetime.datetime.now(datetime.timezone.utc)
    old = pki.root.issue_ca(
        "securetcp badssl expired intermediate",
        not_before=now - 400 * DAY,
        not_after=now - 30 * DAY,
    )
    key = new_key("ec256")
    leaf = old.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    return Credential((der(leaf), der(old.cert)), key)


def _name_constrained(pki: BadSSLPKI, name: str) -> Credential:
    constrained = pki.root.issue_ca(
        "securetcp badssl constrained intermediate", excluded_dns=[f"{name}.badssl.test"]
    )
    key = new_key("ec256")
    leaf = constrained.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    return Credential((der(leaf), der(constrained.cert)), key)


def _bad_signature(pki: BadSSLPKI, name: str) -> Credential:
    key = new_key("ec256")
    leaf = pki.intermediate.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    return Credential((corrupt_signature(leaf), der(pki.intermediate.cert)), key)


def _sha1_leaf(pki: BadSSLPKI, name: str) -> Credential:
    issuer = pki.root.issue_ca("securetcp badssl RSA intermediate", key=pki.new_key("rsa2048"))
    key = new_key("ec256")
    leaf = issuer.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    assert isinstance(issuer.key, rsa.RSAPrivateKey)
    return Credential((resign_with_sha1(leaf, issuer.key), der(issuer.cert)), key)


def _revoked(pki: BadSSLPKI, name: str) -> Credential:
    # Issued by the root itself, so the CRL is the root's: a client (GnuTLS) that
    # checks a CRL's signature when loading it needs its issuer among the trusted.
    key = new_key("ec256")
    leaf = pki.root.issue_leaf(_names(name), common_name=f"{name}.badssl.test", key=key)
    pki.revoke(leaf.serial_number)
    return Credential((der(leaf),), key)


Recipe: TypeAlias = Callable[[BadSSLPKI, str], Credential]

_RECIPES: dict[str, Recipe] = {
    "expired": lambda pki, n: _dated(pki, n, -60, -30),
    "not-yet-valid": lambda pki, n: _dated(pki, n, 30, 120),
    "wrong-host": lambda pki, n: _leaf(pki, n, names=["wrong.host.example"]),
    "self-signed": _self_signed,
    "untrusted-root": _untrusted_root,
    "incomplete-chain": _incomplete,
    "reversed-chain": lambda pki, n: _chain_of(pki, n, 2, reverse=True),
    "expired-intermediate": _expired_intermediate,
    "long-chain": lambda pki, n: _chain_of(pki, n, 8, reverse=False),
    "no-san": lambda pki, n: _leaf(pki, n, names=[]),
    "wildcard": lambda pki, n: _leaf(pki, n, names=["*.badssl.test"]),
    "wildcard-not-covered": lambda pki, n: _leaf(pki, n, names=["*.badssl.test"]),
    "ip-san": lambda pki, n: _leaf(pki, n, names=["127.0.0.1"]),
    "name-constraints": _name_constrained,
    "bad-signature": _bad_signature,
    "wrong-eku": lambda pki, n: _leaf(pki, n, client_auth_only=True),
    "sha1-leaf": _sha1_leaf,
    "revoked": _revoked,
    "static-rsa": lambda pki, n: _leaf(pki, n, key_kind="rsa2048"),
    "rsa2048": lambda pki, n: _leaf(pki, n, key_kind="rsa2048"),
    "rsa4096": lambda pki, n: _leaf(pki, n, key_kind="rsa4096"),
    "ecdsa-p384": lambda pki, n: _leaf(pki, n, key_kind="ec384"),
    "ed25519": lambda pki, n: _leaf(pki, n, key_kind="ed25519"),
    "sha384": lambda pki, n: _leaf(pki, n, digest="sha384"),
    "weak-rsa1024": lambda pki, n: _leaf(pki, n, key_kind="rsa1024"),
    "many-sans": lambda pki, n: _leaf(
        pki, n, names=[*_names(n), *(f"san-{i}.many-sans.badssl.test" for i in range(996))]
    ),
    "idn": lambda pki, n: _leaf(pki, n, names=["xn--bcher-kva.idn.badssl.test"]),
}


# The slow (RSA) keys each scenario's recipe asks `BadSSLPKI.new_key` for.
_RSA_KEYS: dict[str, tuple[KeyKind, ...]] = {
    "rsa4096": ("rsa4096",),
    "rsa2048": ("rsa2048",),
    "static-rsa": ("rsa2048",),
    "sha1-leaf": ("rsa2048",),
    "weak-rsa1024": ("rsa1024",),
}


def slow_keys(names: Iterable[str]) -> list[KeyKind]:
    """The RSA keys the scenarios `names` need, slowest first (for `BadSSLPKI(prefetch=)`)."""
    kinds = [kind for name in names for kind in _RSA_KEYS.get(name, ())]
    return sorted(kinds, key=lambda kind: kind != "rsa4096")


def credential(pki: BadSSLPKI, scenario: Scenario) -> Credential:
    """Build the certificate chain and key `scenario` serves, from `pki`."""
    recipe = _RECIPES.get(scenario.name, _leaf)
    return recipe(pki, scenario.name)


# -- the catalogue -----------------------------------------------------------------------

_GNUTLS_UNKNOWN_ISSUER = "gnutls-cli says only 'The certificate issuer is unknown.'"

_OLD_TLS_CLIENTS = {"openssl": "handshake_failure", "gnutls": "ok"}
_OLD_TLS_NOTE = (
    "Python's default context allows TLS 1.2+ only; OpenSSL 3's s_client still offers "
    "TLS 1.0/1.1 but refuses their SHA-1 signatures at security level 1+ ('legacy sigalg "
    "disallowed'); GnuTLS 3.7's NORMAL priority still negotiates them"
)

_CATALOGUE = [
    Scenario("good", "a valid chain (leaf + intermediate) for localhost", "ok"),
    Scenario("expired", "the leaf expired 30 days ago", "expired", verify_code=10),
    Scenario("not-yet-valid", "the leaf becomes valid in 30 days", "not_yet_valid", verify_code=9),
    Scenario(
        "wrong-host",
        "a valid chain for wrong.host.example only",
        "hostname_mismatch",
        verify_code=62,
    ),
    Scenario(
        "self-signed",
        "a self-signed leaf for localhost",
        "self_signed",
        verify_code=18,
        clients={"gnutls": "untrusted"},
        note=_GNUTLS_UNKNOWN_ISSUER,
    ),
    Scenario(
        "untrusted-root",
        "leaf + root of another CA, which the client does not trust",
        "untrusted",
        verify_code=19,
    ),
    Scenario(
        "incomplete-chain",
        "the leaf only, without the intermediate that issued it",
        "incomplete_chain",
        verify_code=20,
        clients={"gnutls": "untrusted"},
        note=_GNUTLS_UNKNOWN_ISSUER,
    ),
    Scenario(
        "reversed-chain",
        "two intermediates sent root-side first (out of order); clients must reorder",
        "ok",
    ),
    Scenario(
        "expired-intermediate",
        "a valid leaf under an intermediate that expired 30 days ago",
        "expired",
        verify_code=10,
    ),
    Scenario("long-chain", "eight intermediates between the leaf and the root", "ok"),
    Scenario(
        "no-san",
        "no subjectAltName: the name is only in the common name",
        "ok",
        server_name="no-san.badssl.test",
        note="Python, OpenSSL and GnuTLS still fall back to the common name; "
        "browsers (RFC 6125, CA/B Forum) refuse it",
    ),
    Scenario(
        "wildcard",
        "a certificate for *.badssl.test, asked for wildcard.badssl.test",
        "ok",
        server_name="wildcard.badssl.test",
    ),
    Scenario(
        "wildcard-not-covered",
        "the *.badssl.test certificate, asked for a name two labels deep",
        "hostname_mismatch",
        server_name="deep.wildcard-not-covered.badssl.test",
        verify_code=62,
    ),
    Scenario(
        "ip-san",
        "a certificate whose only name is the IP address 127.0.0.1",
        "ok",
        server_name="127.0.0.1",
    ),
    Scenario(
        "name-constraints",
        "an intermediate whose name constraints exclude the leaf's DNS name",
        "name_constraints",
        verify_code=48,
    ),
    Scenario(
        "bad-signature",
        "the leaf's signature has one bit flipped",
        "bad_signature",
        verify_code=7,
        clients={"curl": "handshake_failure"},
        note="curl 7.88 reports the ASN.1 error of the failed signature check "
        "(exit 35, 'EVP lib') rather than the verify code",
    ),
    Scenario(
        "wrong-eku",
        "a leaf whose extended key usage is clientAuth only",
        "wrong_purpose",
        verify_code=26,
    ),
    Scenario(
        "sha1-leaf",
        "a leaf signed with SHA-1 (sha1WithRSA; served at security level 0)",
        "weak_signature",
        verify_code=68,
        security_level_0=True,
    ),
    Scenario(
        "revoked",
        "a leaf (issued by the root) listed in the root's CRL, which the harness writes",
        "ok",
        expect_with_crl="revoked",
        note="ok without revocation checking; 'revoked' (code 23) with the CRL loaded "
        "and VERIFY_CRL_CHECK_LEAF",
    ),
    Scenario(
        "client-cert-required",
        "the server requires a client certificate from the harness CA",
        "client_certificate_required",
        client_auth="required",
        note="with TLS 1.3 the client's handshake completes and the alert arrives on "
        "the first read (a write before it may already fail); curl 7.88 reports either "
        "the alert (exit 56) or 'getpeername() failed' (exit 55), depending on timing; "
        "with the harness client certificate the outcome is ok",
    ),
    Scenario(
        "client-cert-optional",
        "the server asks for a client certificate but accepts none",
        "ok",
        client_auth="optional",
    ),
    Scenario("tls1.2-only", "TLS 1.2 only", "ok", tls_versions=("TLSv1.2", "TLSv1.2")),
    Scenario("tls1.3-only", "TLS 1.3 only", "ok", tls_versions=("TLSv1.3", "TLSv1.3")),
    Scenario(
        "tls1.0-only",
        "TLS 1.0 only (security level 0)",
        "protocol_version",
        tls_versions=("TLSv1", "TLSv1"),
        security_level_0=True,
        clients=_OLD_TLS_CLIENTS,
        note=_OLD_TLS_NOTE,
    ),
    Scenario(
        "tls1.1-only",
        "TLS 1.1 only (security level 0)",
        "protocol_version",
        tls_versions=("TLSv1.1", "TLSv1.1"),
        security_level_0=True,
        clients=_OLD_TLS_CLIENTS,
        note=_OLD_TLS_NOTE,
    ),
    Scenario(
        "static-rsa",
        "TLS 1.2 with RSA key exchange only (no forward secrecy)",
        "handshake_failure",
        tls_versions=("TLSv1.2", "TLSv1.2"),
        ciphers="AES128-GCM-SHA256:AES256-GCM-SHA384",
        clients={"openssl": "ok", "gnutls": "ok"},
        note="Python's default cipher string offers only ECDHE/DHE suites; "
        "OpenSSL's and GnuTLS's defaults still include RSA key exchange",
    ),
    Scenario("rsa2048", "an RSA 2048 leaf", "ok"),
    Scenario("rsa4096", "an RSA 4096 leaf", "ok"),
    Scenario("ecdsa-p256", "an ECDSA P-256 leaf", "ok"),
    Scenario("ecdsa-p384", "an ECDSA P-384 leaf", "ok"),
    Scenario("ed25519", "an Ed25519 leaf", "ok"),
    Scenario("sha384", "a leaf signed with ECDSA-SHA384", "ok"),
    Scenario(
        "weak-rsa1024",
        "an RSA 1024 leaf (served at security level 0)",
        "weak_key",
        verify_code=66,
        security_level_0=True,
        clients={"gnutls": "ok"},
        note="GnuTLS's default verification profile still accepts 1024-bit RSA",
    ),
    Scenario(
        "many-sans",
        "a certificate with 1,000 subjectAltNames",
        "ok",
    ),
    Scenario(
        "idn",
        "an internationalized name (bücher.idn.badssl.test), as its A-label",
        "ok",
        server_name="xn--bcher-kva.idn.badssl.test",
    ),
    Scenario(
        "alpn-h2",
        "ALPN: the server selects h2",
        "ok",
        alpn=("h2",),
        note="a client offering h2 gets h2; one offering only http/1.1 gets no ALPN",
    ),
    Scenario(
        "no-alpn",
        "no ALPN: the server ignores the client's offer",
        "ok",
        note="selected_alpn_protocol() is None whatever the client offers",
    ),
]

#: Every scenario by name, in catalogue order.
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({s.name: s for s in _CATALOGUE})
