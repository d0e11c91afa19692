"""What a server is given as ``ssl_options``, checked: dicts, contexts, `ServerTLS`.

``ssl_options`` may be ``None``, a tornado-style ``dict``, an
``ssl.SSLContext`` (used as given) or a :class:`~securetcp.tls.TLSConfig`.
:func:`make_server_tls` validates any of them up front (raising
:class:`SSLOptionsError` with the option and the path in the message) and
returns a :class:`ServerTLS`, the one object a server needs: the current
context, the ``authorize`` hook, reloading and the certificates served.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from securetcp.certs import PeerIdentity
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
from securetcp.tls.sni import remember_server_name

__all__ = [
    "SSL_OPTIONS_KEYS",
    "Authorize",
    "ServerTLS",
    "make_server_tls",
    "ssl_options_to_context",
]

Authorize: TypeAlias = Callable[[PeerIdentity], bool]

#: The keys tornado accepts in a ``ssl_options`` dict.
SSL_OPTIONS_KEYS = ("certfile", "keyfile", "ssl_version", "cert_reqs", "ca_certs", "ciphers")

_DICT_PROTOCOLS = {ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS}
_CERT_REQS = {ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED}


class ServerTLS:
    """Everything a TCPServer needs from any ``ssl_options`` form.

    ``context`` wraps each accepted socket (it may change after a reload);
    ``authorize`` vets authenticated peers. This base class serves one fixed
    context; :class:`~securetcp.tls.TLSConfig` adds reloading.
    """

    authorize: Authorize | None

    def __init__(
        self,
        context: ssl.SSLContext,
        authorize: Authorize | None = None,
        pairs: tuple[KeyPair, ...] = (),
    ) -> None:
        self._context = context
        self.authorize = authorize
        self._pairs = pairs

    @property
    def context(self) -> ssl.SSLContext:
        """The context to wrap the next accepted socket with."""
        return self._context

    def certificate_not_after(self) -> dict[str, float]:
        """Each served certificate file and when it expires (Unix time).

        Empty for an ``ssl.SSLContext`` given as is (the stdlib cannot show
        its certificate).
        """
        return {pair.certfile: pair.leaf.not_valid_after_utc.timestamp() for pair in self._pairs}

    def start_reloading(self) -> None:
        """Start watching certificate files (inside the running loop); no-op here."""

    def stop_reloading(self) -> None:
        """Stop watching certificate files; no-op here."""

    def reload(self) -> bool:
        """Re-read changed certificate files; always False for a fixed context."""
        return False


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


def _server_tls_from_dict(options: Mapping[str, Any]) -> ServerTLS:
    """Build a server context from tornado-style ``ssl_options``."""
    _check_dict(options)
    pair = load_pair(
        options["certfile"],
        options.get("keyfile"),
        None,
        _dict_option("certfile"),
        _dict_option("keyfile"),
    )
    context = ssl.SSLContext(options.get("ssl_version", ssl.PROTOCOL_TLS_SERVER))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    use_pair(context, pair)
    if options.get("ca_certs") is not None:
        load_ca(context, options["ca_certs"], _dict_option("ca_certs"))
    context.verify_mode = ssl.VerifyMode(options.get("cert_reqs", ssl.CERT_NONE))
    if options.get("ciphers") is not None:
        set_ciphers(context, options["ciphers"], _dict_option("ciphers"))
    apply_keylog(context, None, "SSLKEYLOGFILE")
    context.sni_callback = remember_server_name
    warn_about(pair)
    return ServerTLS(context, pairs=(pair,))


def ssl_options_to_context(
    options: Mapping[str, Any] | ssl.SSLContext | ServerTLS,
) -> ssl.SSLContext:
    """Turn ``ssl_options`` into a server-side ``ssl.SSLContext``.

    A dict gets a new, validated context; an ``SSLContext`` is returned as
    given; a :class:`~securetcp.tls.TLSConfig` gives its current context.
    """
    if isinstance(options, ssl.SSLContext):
        return options
    if isinstance(options, ServerTLS):
        return options.context
    if isinstance(options, Mapping):
        return _server_tls_from_dict(options).context
    raise TypeError(
        "ssl_options must be a dict, an ssl.SSLContext or a TLSConfig, "
        f"not {type(options).__name__}"
    )


def make_server_tls(
    ssl_options: Mapping[str, Any] | ssl.SSLContext | ServerTLS | None,
) -> ServerTLS | None:
    """Validate ``ssl_options`` (raising :class:`SSLOptionsError`) for a server.

    Returns None for None, a :class:`~securetcp.tls.TLSConfig` itself, or a
    :class:`ServerTLS` around the dict-built or given context.
    """
    if ssl_options is None:
        return None
    if isinstance(ssl_options, ServerTLS):
        return ssl_options
    if isinstance(ssl_options, ssl.SSLContext):
        if ssl_options.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise SSLOptionsError(
                "ssl_options: an ssl.PROTOCOL_TLS_CLIENT context cannot accept connections; "
                "create it with ssl.PROTOCOL_TLS_SERVER"
            )
        return ServerTLS(ssl_options)
    if isinstance(ssl_options, Mapping):
        return _server_tls_from_dict(ssl_options)
    raise TypeError(
        "ssl_options must be a dict, an ssl.SSLContext or a TLSConfig, "
        f"not {type(ssl_options).__name__}"
    )
