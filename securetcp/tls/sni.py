"""SNI: securetcp's ``sni_callback``s, and what they may do to a connection.

The stdlib shows the client's server name only to ``SSLContext.sni_callback``.
securetcp's callbacks (and only those: a user's ``SSLContext`` is used as
given) record it on the connection and may switch the connection's context
to the certificate for that name. The connection they see is either an
``ssl.SSLSocket``/``SSLObject`` or, for connections that `SSLIOStream` wraps
itself, the stream: it is the stream's owner only when the context's
callback is one of these (`is_securetcp_callback`). The protocol, owned here:

* `record_server_name(connection, name)` stores the name in the attribute
  `SERVER_NAME_ATTRIBUTE` (the stream declares it as a slot);
* `recorded_server_name(connection)` reads it back (None if never set);
* ``connection.context = other`` switches certificates (``SSLSocket``,
  ``SSLObject`` and ``SSLIOStream`` all accept it).
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REFUSED_ATTRIBUTE",
    "SERVER_NAME_ATTRIBUTE",
    "RememberServerName",
    "SNICallback",
    "SNISelector",
    "is_securetcp_callback",
    "lookup",
    "record_server_name",
    "recorded_server_name",
    "refused_by_strict_sni",
    "remember_server_name",
    "silence_sni_decode_errors",
]

#: Attribute of a connection holding the SNI name its client sent.
SERVER_NAME_ATTRIBUTE = "securetcp_server_name"
#: Attribute set on a connection whose name strict SNI refused.
REFUSED_ATTRIBUTE = "securetcp_sni_refused"


def record_server_name(connection: Any, server_name: str | None) -> None:
    """Store the client's SNI name on `connection` (ignored where it cannot be)."""
    try:
        setattr(connection, SERVER_NAME_ATTRIBUTE, server_name)
    except AttributeError:
        pass  # an object with no room for it (e.g. a bare _ssl._SSLSocket)


def recorded_server_name(connection: Any) -> str | None:
    """The SNI name `record_server_name` stored on `connection`, or None."""
    name = getattr(connection, SERVER_NAME_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


class SNICallback:
    """Base of securetcp's own ``sni_callback``s (see `is_securetcp_callback`)."""

    def __call__(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> Any:
        raise NotImplementedError


class RememberServerName(SNICallback):
    """Record the client's SNI name; nothing else."""

    def __call__(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        record_server_name(connection, server_name)


remember_server_name = RememberServerName()


def is_securetcp_callback(callback: object) -> bool:
    """Whether `callback` is one of securetcp's, which may be shown the stream."""
    return isinstance(callback, SNICallback)


def lookup(table: Mapping[str, ssl.SSLContext], name: str) -> ssl.SSLContext | None:
    """The context for `name`: an exact match first, then a one-label wildcard."""
    found = table.get(name)
    if found is None and "." in name:
        found = table.get("*." + name.split(".", 1)[1])
    return found


@dataclass(frozen=True)
class SNISelector(SNICallback):
    """Switch the connection to the named host's context (TLSConfig's ``sni``)."""

    hosts: Mapping[str, ssl.SSLContext]
    strict: bool
    #: Names the default certificate covers (accepted even when strict).
    default_names: Mapping[str, ssl.SSLContext]

    def __call__(
        self, connection: Any, server_name: str | None, context: ssl.SSLContext
    ) -> int | None:
        record_server_name(connection, server_name)
        if server_name is None:  # no SNI (e.g. connecting by IP): default certificate
            return None
        name = server_name.rstrip(".").lower()
        chosen = lookup(self.hosts, name)
        if chosen is not None:
            connection.context = chosen
        elif self.strict and lookup(self.default_names, name) is None:
            try:
                setattr(connection, REFUSED_ATTRIBUTE, True)
            except AttributeError:
                pass
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None


def refused_by_strict_sni(connection: Any) -> bool:
    """Whether securetcp's strict SNI refused the name `connection`'s client sent.

    A handshake can also fail in the SNI callback before any securetcp code
    runs: CPython decodes the name as ASCII first, and a name with a byte
    >= 0x80 fails there (a malformed ClientHello, not an SNI rule).
    """
    return getattr(connection, REFUSED_ATTRIBUTE, False) is True


def _is_sni_decode_error(unraisable: Any) -> bool:
    return isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(
        unraisable.object, bytes
    )


_installed = False


def silence_sni_decode_errors() -> None:
    """Keep a ClientHello with a non-ASCII server name from printing a traceback.

    CPython's SNI wrapper reports the failed ASCII decoding of such a name
    through ``sys.unraisablehook`` (a traceback on stderr per connection,
    outside any rate limit: a cheap way to flood a server's logs). The
    handshake fails anyway and the server counts it; this chained hook drops
    exactly those reports (a UnicodeDecodeError about a bytes object) and
    passes every other one to the hook that was there before.
    """
    global _installed
    if _installed:
        return
    _installed = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_sni_decode_error(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
