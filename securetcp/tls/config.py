"""`TLSConfig`: the opinionated server TLS configuration, and its profiles.

Profiles follow Mozilla's server-side TLS guidelines v5.7 ("modern": TLS 1.3
only; "intermediate": TLS 1.2+ with their ECDHE AEAD suites).

Key-exchange groups: Mozilla names X25519, prime256v1 and secp384r1, and
OpenSSL 3 offers more by default (X448, secp521r1, ffdhe*), so the groups are
pinned to that list, with one rule: **post-quantum hybrid groups the local
OpenSSL has (X25519MLKEM768 and friends, OpenSSL 3.5+) stay first**. Pinning
must never remove what the system would offer to protect today's traffic
from tomorrow's quantum computers; see `profile_groups`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from cryptography import x509

from securetcp._tls_groups import group_available, set_groups
from securetcp.tls.errors import SSLOptionsError
from securetcp.tls.files import (
    KeyPair,
    apply_keylog,
    load_ca,
    load_pair,
    set_ciphers,
    use_pair,
    warn_about,
)
from securetcp.tls.options import Authorize, ServerTLS
from securetcp.tls.reload import Reloader
from securetcp.tls.sni import SNISelector, remember_server_name

__all__ = [
    "HYBRID_GROUPS",
    "INTERMEDIATE_CIPHERS",
    "MOZILLA_GROUPS",
    "TLSConfig",
    "profile_groups",
]

log = logging.getLogger("securetcp.tls")

StrPath: TypeAlias = "str | os.PathLike[str]"
SNIEntry: TypeAlias = "StrPath | tuple[StrPath, StrPath | None]"

# Mozilla server-side TLS guidelines v5.7, "intermediate" TLS 1.2 suites.
# Their DHE-RSA suites are left out: only ECDHE is wanted, and without DH
# parameters OpenSSL would never pick them anyway. TLS 1.3 suites are
# OpenSSL's defaults, which are exactly Mozilla's three.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
#: Mozilla's key-exchange groups, for both profiles.
MOZILLA_GROUPS = ("X25519", "prime256v1", "secp384r1")
#: Post-quantum hybrid groups, in OpenSSL 3.5's default order of preference.
HYBRID_GROUPS = ("X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024")

_PROFILES = ("modern", "intermediate")
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")


@functools.lru_cache(maxsize=1)
def profile_groups() -> tuple[str, ...]:
    """The key-exchange groups both profiles offer, in order of preference:
    the hybrid groups this OpenSSL has, then Mozilla's."""
    return tuple(g for g in HYBRID_GROUPS if group_available(g)) + MOZILLA_GROUPS


def _normalize_host(name: str, option: str) -> str:
    """Lowercase A-label form of an SNI host name or ``*.`` wildcard."""
    if not isinstance(name, str) or not name:
        raise SSLOptionsError(f"{option}: host name must be a non-empty string, not {name!r}")
    host = name.strip().rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise SSLOptionsError(f"{option}: {name!r} is not a valid host name") from None
    labels = host.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if not labels or not all(_LABEL.match(label) for label in labels):
        raise SSLOptionsError(
            f"{option}: {name!r} is not a host name or a one-label wildcard like '*.example.com'"
        )
    return host


def _parse_sni(sni: Mapping[str, SNIEntry] | None) -> dict[str, tuple[str, str | None]]:
    entries: dict[str, tuple[str, str | None]] = {}
    for name, value in (sni or {}).items():
        host = _normalize_host(name, f"TLSConfig sni[{name!r}]")
        if isinstance(value, (str, os.PathLike)):
            entries[host] = (os.fspath(value), None)
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            certfile, keyfile = value
            entries[host] = (os.fspath(certfile), None if keyfile is None else os.fspath(keyfile))
        else:
            raise SSLOptionsError(
                f"TLSConfig sni[{name!r}]: expected (certfile, keyfile) or certfile, got {value!r}"
            )
    return entries


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


@dataclass(frozen=True)
class _State:
    """One consistent generation of contexts, swapped as a whole on reload."""

    context: ssl.SSLContext
    pairs: tuple[KeyPair, ...] = field(default_factory=tuple)


class TLSConfig(ServerTLS):
    """A validated, opinionated server TLS configuration.

    ``profile`` follows Mozilla's server-side TLS guidelines v5.7:
    ``"modern"`` is TLS 1.3 only, ``"intermediate"`` TLS 1.2+ with their
    ECDHE AEAD suites; both offer the groups of `profile_groups` (hybrid
    post-quantum groups where OpenSSL has them, then X25519, prime256v1 and
    secp384r1) and let the client choose the cipher. ``keyfile=None`` means
    the key is in ``certfile``. ``client_auth`` ("none", "optional",
    "required") verifies client certificates against ``client_ca`` (a PEM
    file or a directory of them). ``sni`` maps host names or one-label
    wildcards ("*.example.com") to ``(certfile, keyfile)`` or a certfile
    holding its key; other names get the default certificate unless
    ``sni_strict``, which refuses them with an unrecognized_name alert (names
    the default certificate covers, and clients sending no SNI, are still
    served). ``password`` decrypts every key. ``keylog_file`` (else
    $SSLKEYLOGFILE) receives TLS secrets. ``session_tickets=False`` disables
    resumption tickets (otherwise one TLS 1.3 ticket is sent per handshake).
    With ``reload_interval`` (seconds), changed files are re-read once they
    have stopped changing and, once valid, used for new connections; a
    broken set is logged once and the old certificate stays in use.

    Everything is loaded and checked here: any problem raises
    :class:`SSLOptionsError`.
    """

    def __init__(
        self,
        certfile: StrPath,
        keyfile: StrPath | None = None,
        *,
        password: str | bytes | None = None,
        profile: Literal["modern", "intermediate"] = "intermediate",
        client_auth: Literal["none", "optional", "required"] = "none",
        client_ca: StrPath | None = None,
        alpn_protocols: Sequence[str] = (),
        sni: Mapping[str, SNIEntry] | None = None,
        sni_strict: bool = False,
        authorize: Authorize | None = None,
        reload_interval: float | None = None,
        keylog_file: StrPath | None = None,
        session_tickets: bool = True,
    ) -> None:
        self.certfile = os.fspath(certfile)
        self.keyfile = None if keyfile is None else os.fspath(keyfile)
        self._password = password
        self.profile = profile
        self.client_auth = client_auth
        self.client_ca = None if client_ca is None else os.fspath(client_ca)
        self.alpn_protocols = tuple(alpn_protocols)
        self.sni_strict = bool(sni_strict)
        self.reload_interval = reload_interval
        self.keylog_file = None if keylog_file is None else os.fspath(keylog_file)
        self.session_tickets = bool(session_tickets)
        self._check_settings(alpn_protocols, authorize)
        self._sni = _parse_sni(sni)
        # Made before loading (it takes the files' signature): a change
        # during loading is then seen at the next poll.
        self._reloader: Reloader[_State] = Reloader(
            self._watched_files, self._build, self._swap, reload_interval
        )
        self._state = self._build()
        for pair in self._state.pairs:
            warn_about(pair)
        super().__init__(self._state.context, authorize, self._state.pairs)

    def __repr__(self) -> str:
        return (
            f"TLSConfig({self.certfile!r}, {self.keyfile!r}, profile={self.profile!r}, "
            f"client_auth={self.client_auth!r}, sni={sorted(self._sni)!r})"
        )

    def _check_settings(self, alpn_protocols: Sequence[str], authorize: object) -> None:
        if self.profile not in _PROFILES:
            raise SSLOptionsError(
                f"TLSConfig profile: {self.profile!r} is not one of {', '.join(_PROFILES)}"
            )
        if self.client_auth not in _CLIENT_AUTH:
            raise SSLOptionsError(
                f"TLSConfig client_auth: {self.client_auth!r} is not one of "
                f"{', '.join(_CLIENT_AUTH)}"
            )
        if self.client_auth != "none" and self.client_ca is None:
            raise SSLOptionsError(
                f"TLSConfig client_auth: {self.client_auth!r} needs client_ca "
                "(the CA file or directory that issues client certificates)"
            )
        if self.client_auth == "none" and self.client_ca is not None:
            raise SSLOptionsError(
                f"TLSConfig client_ca: {self.client_ca} is given but client_auth is 'none', "
                "so client certificates would not be asked for"
            )
        if isinstance(alpn_protocols, (str, bytes)) or not all(
            isinstance(p, str) and 0 < len(p.encode()) < 256 for p in self.alpn_protocols
        ):
            raise SSLOptionsError(
                f"TLSConfig alpn_protocols: expected a sequence of protocol names like "
                f"['h2', 'http/1.1'], got {alpn_protocols!r}"
            )
        if authorize is not None and not callable(authorize):
            raise SSLOptionsError(f"TLSConfig authorize: {authorize!r} is not callable")
        interval = self.reload_interval
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0
        ):
            raise SSLOptionsError(
                f"TLSConfig reload_interval: expected a positive number of seconds, "
                f"got {interval!r}"
            )

    # -- building contexts ---------------------------------------------------

    def _build(self) -> _State:
        """Load every file and build a new generation of contexts."""
        default = load_pair(
            self.certfile, self.keyfile, self._password, "TLSConfig certfile", "TLSConfig keyfile"
        )
        context = self._new_context(default)
        pairs = [default]
        hosts: dict[str, ssl.SSLContext] = {}
        for host, (certfile, keyfile) in self._sni.items():
            option = f"TLSConfig sni[{host!r}]"
            pair = load_pair(certfile, keyfile, self._password, option, option + " keyfile")
            pairs.append(pair)
            hosts[host] = self._new_context(pair)
        if hosts or self.sni_strict:
            default_names = dict.fromkeys(_dns_names(default.leaf), context)
            context.sni_callback = SNISelector(hosts, self.sni_strict, default_names)
        else:
            context.sni_callback = remember_server_name
        return _State(context, tuple(pairs))

    def _new_context(self, pair: KeyPair) -> ssl.SSLContext:
        """A server context with this configuration's settings and ``pair``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        # Mozilla: every offered suite is strong, so let the client pick
        # (it knows whether it has AES hardware).
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.profile == "modern":
            context.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            set_ciphers(context, INTERMEDIATE_CIPHERS, "TLSConfig profile")
        set_groups(context, profile_groups())
        use_pair(context, pair)
        if self.client_ca is not None:
            load_ca(context, self.client_ca, "TLSConfig client_ca")
        context.verify_mode = _CLIENT_AUTH[self.client_auth]
        if self.alpn_protocols:
            context.set_alpn_protocols(list(self.alpn_protocols))
        if not self.session_tickets:
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
        else:
            # One TLS 1.3 ticket per handshake, as browsers need, not
            # OpenSSL's two: a ticket costs an encryption and a record.
            context.num_tickets = 1
        apply_keylog(context, self.keylog_file, "TLSConfig keylog_file")
        return context

    # -- reloading -------------------------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        """The current default context (replaced when a reload succeeds)."""
        return self._state.context

    def certificate_not_after(self) -> dict[str, float]:
        """Each served certificate file and when it expires (Unix time), as loaded now."""
        return {p.certfile: p.leaf.not_valid_after_utc.timestamp() for p in self._state.pairs}

    def _watched_files(self) -> list[str]:
        files = [self.certfile]
        if self.keyfile is not None:
            files.append(self.keyfile)
        for certfile, keyfile in self._sni.values():
            files.append(certfile)
            if keyfile is not None:
                files.append(keyfile)
        if self.client_ca is not None:
            files.append(self.client_ca)
            if os.path.isdir(self.client_ca):
                try:
                    names = sorted(os.listdir(self.client_ca))
                except OSError:
                    names = []
                files.extend(os.path.join(self.client_ca, name) for name in names)
        return files

    def _swap(self, state: _State) -> None:
        self._state = state
        self._pairs = state.pairs
        log.info("certificates reloaded from %s", ", ".join(p.certfile for p in state.pairs))
        for pair in state.pairs:
            warn_about(pair)

    def reload(self) -> bool:
        """Check the files now; True if a changed, valid set was swapped in."""
        return self._reloader.check(manual=True)

    def poll(self) -> bool:
        """What each periodic poll does: True if changed files, once they have
        looked the same for two polls, were valid and swapped in."""
        return self._reloader.check()

    @property
    def reloading(self) -> bool:
        """Whether the files are being polled now (between start and stop)."""
        return self._reloader.active

    def start_reloading(self) -> None:
        """Poll the files every ``reload_interval`` seconds in the running loop."""
        self._reloader.start()

    def stop_reloading(self) -> None:
        """Stop polling once every server that started it has stopped."""
        self._reloader.stop()
