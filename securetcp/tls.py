"""Server-side TLS configuration: ``ssl_options`` validation and :class:`TLSConfig`.

``ssl_options`` may be ``None``, a tornado-style ``dict``, an
``ssl.SSLContext`` or a :class:`TLSConfig`. Whatever the form,
:func:`make_server_tls` validates it up front (raising
:class:`SSLOptionsError` with the option and the path in the message) and
returns a :class:`ServerTLS`, the one object a server needs: the current
context, the ``authorize`` hook and certificate reloading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from cryptography import x509

from securetcp import certs
from securetcp._tls_groups import set_groups
from securetcp.certs import PeerIdentity

__all__ = [
    "SSLOptionsError",
    "ServerTLS",
    "TLSConfig",
    "make_server_tls",
    "ssl_options_to_context",
]

log = logging.getLogger("securetcp.tls")

StrPath: TypeAlias = "str | os.PathLike[str]"
Authorize: TypeAlias = Callable[[PeerIdentity], bool]
SNIEntry: TypeAlias = "StrPath | tuple[StrPath, StrPath | None]"

#: The keys tornado accepts in a ``ssl_options`` dict.
SSL_OPTIONS_KEYS = ("certfile", "keyfile", "ssl_version", "cert_reqs", "ca_certs", "ciphers")

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

_PROFILES = ("modern", "intermediate")
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_DICT_PROTOCOLS = {ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS}
_CERT_REQS = {ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED}
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")


class SSLOptionsError(ValueError):
    """``ssl_options`` (dict or :class:`TLSConfig`) cannot be used.

    The message names the option and the file concerned.
    """


# -- certificate/key pairs -----------------------------------------------------


@dataclass(frozen=True)
class _KeyPair:
    """A certificate chain and its key, checked with cryptography."""

    certfile: str
    keyfile: str | None
    password: bytes | None
    chain: list[x509.Certificate]
    option: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _load_pair(
    certfile: StrPath,
    keyfile: StrPath | None,
    password: str | bytes | None,
    cert_option: str,
    key_option: str,
) -> _KeyPair:
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
    return _KeyPair(
        os.fspath(certfile),
        None if keyfile is None else os.fspath(keyfile),
        secret,
        chain,
        cert_option,
    )


def _use_pair(context: ssl.SSLContext, pair: _KeyPair) -> None:
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


def _warn_about(pair: _KeyPair) -> None:
    for warning in certs.certificate_warnings(pair.leaf):
        log.warning("%s: %s (%s)", pair.option, warning, pair.certfile)


def _load_ca(context: ssl.SSLContext, path: StrPath, option: str) -> None:
    """Trust the CA certificates of a PEM file or of every PEM file in a directory."""
    ca_path = os.fspath(path)
    files = _ca_files(ca_path, option) if os.path.isdir(ca_path) else [ca_path]
    for file in files:
        try:
            certs.load_pem_certificates(file)
            context.load_verify_locations(cafile=file)
        except certs.CertificateFileError as exc:
            raise SSLOptionsError(f"{option}: {exc}") from None
        except (ssl.SSLError, OSError) as exc:
            raise SSLOptionsError(f"{option}: OpenSSL cannot load CA file {file}: {exc}") from None


def _ca_files(directory: str, option: str) -> list[str]:
    # Loaded eagerly (not capath) so no c_rehash is needed and bad files show now.
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
        except OSError:
            continue
        if holds_cert:
            files.setdefault(os.path.realpath(file), file)  # hash links: load once
    if not files:
        raise SSLOptionsError(f"{option}: no PEM certificate file in directory {directory}")
    return list(files.values())


def _apply_keylog(context: ssl.SSLContext, keylog_file: StrPath | None, option: str) -> None:
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


def _set_ciphers(context: ssl.SSLContext, ciphers: str, option: str) -> None:
    try:
        context.set_ciphers(ciphers)
    except (ssl.SSLError, TypeError) as exc:
        raise SSLOptionsError(
            f"{option}: OpenSSL rejects the cipher string {ciphers!r}: {exc}"
        ) from None


# -- dict ssl_options ----------------------------------------------------------


def _dict_option(name: str) -> str:
    return f"ssl_options[{name!r}]"


def _check_dict(options: Mapping[str, Any]) -> None:
    unknown = sorted(str(key) for key in options if key not in SSL_OPTIONS_KEYS)
    if unknown:
        raise SSLOptionsError(
            f"ssl_options: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys are {', '.join(SSL_OPTIONS_KEYS)}"
        )
    if options.get("certfile") is None:
        raise SSLOptionsError("ssl_options: 'certfile' is required for a server")
    version = options.get("ssl_version", ssl.PROTOCOL_TLS_SERVER)
    if version not in _DICT_PROTOCOLS:
        raise SSLOptionsError(
            f"{_dict_option('ssl_version')}: {version!r} cannot serve; use "
            "ssl.PROTOCOL_TLS_SERVER (versions are limited to TLS 1.2 and newer)"
        )
    cert_reqs = options.get("cert_reqs", ssl.CERT_NONE)
    if isinstance(cert_reqs, bool) or cert_reqs not in _CERT_REQS:
        raise SSLOptionsError(
            f"{_dict_option('cert_reqs')}: {cert_reqs!r} is not one of "
            "ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED"
        )
    if cert_reqs != ssl.CERT_NONE and options.get("ca_certs") is None:
        raise SSLOptionsError(
            f"{_dict_option('cert_reqs')}: {ssl.VerifyMode(cert_reqs).name} needs "
            "ssl_options['ca_certs'] to verify client certificates"
        )


def _context_from_dict(options: Mapping[str, Any]) -> ssl.SSLContext:
    """Build a server context from tornado-style ``ssl_options``."""
    _check_dict(options)
    pair = _load_pair(
        options["certfile"],
        options.get("keyfile"),
        None,
        _dict_option("certfile"),
        _dict_option("keyfile"),
    )
    context = ssl.SSLContext(options.get("ssl_version", ssl.PROTOCOL_TLS_SERVER))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _use_pair(context, pair)
    if options.get("ca_certs") is not None:
        _load_ca(context, options["ca_certs"], _dict_option("ca_certs"))
    context.verify_mode = ssl.VerifyMode(options.get("cert_reqs", ssl.CERT_NONE))
    if options.get("ciphers") is not None:
        _set_ciphers(context, options["ciphers"], _dict_option("ciphers"))
    _apply_keylog(context, None, "SSLKEYLOGFILE")
    context.sni_callback = remember_server_name
    _warn_about(pair)
    return context


#: Attribute of an SSLSocket/SSLObject holding the SNI name its client sent
#: (the stdlib only shows it to the ``sni_callback``).
SERVER_NAME_ATTRIBUTE = "securetcp_server_name"


def remember_server_name(
    tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
) -> None:
    """``sni_callback`` that records the client's SNI name on the connection."""
    setattr(tls, SERVER_NAME_ATTRIBUTE, server_name)


# -- the server's view -------------------------------------------------------


class ServerTLS:
    """Everything a TCPServer needs from any ``ssl_options`` form.

    ``context`` wraps each accepted socket (it may change after a reload);
    ``authorize`` vets authenticated peers. This base class serves one fixed
    context; :class:`TLSConfig` adds reloading.
    """

    authorize: Authorize | None

    def __init__(self, context: ssl.SSLContext, authorize: Authorize | None = None) -> None:
        self._context = context
        self.authorize = authorize

    @property
    def context(self) -> ssl.SSLContext:
        """The context to wrap the next accepted socket with."""
        return self._context

    def start_reloading(self) -> None:
        """Start watching certificate files (inside the running loop); no-op here."""

    def stop_reloading(self) -> None:
        """Stop watching certificate files; no-op here."""

    def reload(self) -> bool:
        """Re-read changed certificate files; always False for a fixed context."""
        return False


def ssl_options_to_context(
    options: Mapping[str, Any] | ssl.SSLContext | TLSConfig,
) -> ssl.SSLContext:
    """Turn ``ssl_options`` into a server-side ``ssl.SSLContext``.

    A dict gets a new, validated context; an ``SSLContext`` is returned as
    given; a :class:`TLSConfig` gives its current context.
    """
    if isinstance(options, ssl.SSLContext):
        return options
    if isinstance(options, TLSConfig):
        return options.context
    if isinstance(options, Mapping):
        return _context_from_dict(options)
    raise TypeError(
        "ssl_options must be a dict, an ssl.SSLContext or a TLSConfig, "
        f"not {type(options).__name__}"
    )


def make_server_tls(
    ssl_options: Mapping[str, Any] | ssl.SSLContext | TLSConfig | None,
) -> ServerTLS | None:
    """Validate ``ssl_options`` (raising :class:`SSLOptionsError`) for a server.

    Returns None for None, the :class:`TLSConfig` itself, or a
    :class:`ServerTLS` around the dict-built or given context.
    """
    if ssl_options is None:
        return None
    if isinstance(ssl_options, TLSConfig):
        return ssl_options
    if isinstance(ssl_options, ssl.SSLContext):
        if ssl_options.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise SSLOptionsError(
                "ssl_options: an ssl.PROTOCOL_TLS_CLIENT context cannot accept connections; "
                "create it with ssl.PROTOCOL_TLS_SERVER"
            )
        return ServerTLS(ssl_options)
    return ServerTLS(ssl_options_to_context(ssl_options))


# -- TLSConfig -----------------------------------------------------------------


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


def _lookup(table: Mapping[str, ssl.SSLContext], name: str) -> ssl.SSLContext | None:
    """Exact match first, then a one-label wildcard."""
    found = table.get(name)
    if found is None and "." in name:
        found = table.get("*." + name.split(".", 1)[1])
    return found


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


@dataclass(frozen=True)
class _SNISelector:
    """``SSLContext.sni_callback``: switch to the named host's context."""

    hosts: Mapping[str, ssl.SSLContext]
    strict: bool
    # Names the default certificate covers (accepted even when strict).
    default_names: Mapping[str, ssl.SSLContext]

    def __call__(
        self, tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        remember_server_name(tls, server_name, _)
        if server_name is None:  # no SNI (e.g. connecting by IP): default certificate
            return None
        name = server_name.rstrip(".").lower()
        chosen = _lookup(self.hosts, name)
        if chosen is not None:
            tls.context = chosen
        elif self.strict and _lookup(self.default_names, name) is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None


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
    pairs: list[_KeyPair] = field(default_factory=list)


_Signature = tuple[tuple[str, int, int, int], ...]


def _signature(paths: Iterable[str]) -> _Signature:
    """(mtime_ns, inode, size) of each path; errno for a missing one."""
    result = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            result.append((path, -1, -1, exc.errno or 0))
        else:
            result.append((path, st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(result)


class TLSConfig(ServerTLS):
    """A validated, opinionated server TLS configuration.

    ``profile`` follows Mozilla's server-side TLS guidelines v5.7:
    ``"modern"`` is TLS 1.3 only, ``"intermediate"`` TLS 1.2+ with their
    ECDHE AEAD suites; both offer only the X25519, prime256v1 and secp384r1
    groups and let the client choose the cipher. ``keyfile=None`` means the
    key is in ``certfile``. ``client_auth`` ("none", "optional",
    "required") verifies client certificates against ``client_ca`` (a PEM
    file or a directory of them). ``sni`` maps host names or one-label
    wildcards ("*.example.com") to ``(certfile, keyfile)`` or a certfile
    holding its key; other names get the default certificate unless
    ``sni_strict``, which refuses them with an unrecognized_name alert (names
    the default certificate covers, and clients sending no SNI, are still
    served). ``password`` decrypts every key. ``keylog_file`` (else
    $SSLKEYLOGFILE) receives TLS secrets. ``session_tickets=False`` disables
    resumption tickets. With ``reload_interval`` (seconds), changed files
    are re-read and, once valid, used for new connections; a broken file is
    logged once and the old certificate stays in use.

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
        self._reload_handle: asyncio.TimerHandle | None = None
        self._reload_users = 0
        self._failed: _Signature | None = None
        # Stat before loading: a change during loading is then seen next time.
        self._seen = _signature(self._watched_files())
        self._state = self._build()
        for pair in self._state.pairs:
            _warn_about(pair)
        super().__init__(self._state.context, authorize)

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
        default = _load_pair(
            self.certfile, self.keyfile, self._password, "TLSConfig certfile", "TLSConfig keyfile"
        )
        context = self._new_context(default)
        pairs = [default]
        hosts: dict[str, ssl.SSLContext] = {}
        for host, (certfile, keyfile) in self._sni.items():
            option = f"TLSConfig sni[{host!r}]"
            pair = _load_pair(certfile, keyfile, self._password, option, option + " keyfile")
            pairs.append(pair)
            hosts[host] = self._new_context(pair)
        if hosts or self.sni_strict:
            default_names = dict.fromkeys(_dns_names(default.leaf), context)
            context.sni_callback = _SNISelector(hosts, self.sni_strict, default_names)
        else:
            context.sni_callback = remember_server_name
        return _State(context, pairs)

    def _new_context(self, pair: _KeyPair) -> ssl.SSLContext:
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
            _set_ciphers(context, INTERMEDIATE_CIPHERS, "TLSConfig profile")
        set_groups(context, MOZILLA_GROUPS)
        _use_pair(context, pair)
        if self.client_ca is not None:
            _load_ca(context, self.client_ca, "TLSConfig client_ca")
        context.verify_mode = _CLIENT_AUTH[self.client_auth]
        if self.alpn_protocols:
            context.set_alpn_protocols(list(self.alpn_protocols))
        if not self.session_tickets:
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
        _apply_keylog(context, self.keylog_file, "TLSConfig keylog_file")
        return context

    # -- reloading -------------------------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        """The current default context (replaced when a reload succeeds)."""
        return self._state.context

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

    def reload(self) -> bool:
        """Check the files now; True if a changed, valid set was swapped in."""
        return self._check(manual=True)

    def _check(self, *, manual: bool) -> bool:
        seen = _signature(self._watched_files())
        if seen == self._seen or (seen == self._failed and not manual):
            return False
        try:
            state = self._build()
        except SSLOptionsError as exc:
            if seen != self._failed or manual:
                log.error("certificate reload failed, still serving the previous one: %s", exc)
            self._failed = seen
            return False
        self._state, self._seen, self._failed = state, seen, None
        log.info("certificates reloaded from %s", ", ".join(p.certfile for p in state.pairs))
        for pair in state.pairs:
            _warn_about(pair)
        return True

    def start_reloading(self) -> None:
        """Poll the files every ``reload_interval`` seconds in the running loop."""
        if self.reload_interval is None:
            return
        self._reload_users += 1
        if self._reload_handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop_reloading(self) -> None:
        """Stop polling once every server that started it has stopped."""
        self._reload_users = max(0, self._reload_users - 1)
        if self._reload_users == 0 and self._reload_handle is not None:
            self._reload_handle.cancel()
            self._reload_handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.reload_interval is not None
        self._reload_handle = loop.call_later(self.reload_interval, self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._check(manual=False)
        except Exception:  # never let a surprise stop the polling
            log.exception("unexpected error while checking certificate files")
        if self._reload_handle is not None:
            self._schedule(loop)
