"""Server-side TLS: ``ssl_options`` validation, :class:`TLSConfig`, SNI, reload.

One module per job: `files` (key pairs, CA files, key log, ciphers),
`options` (dict options, `ServerTLS`, `make_server_tls`), `config`
(`TLSConfig` and its profiles), `sni` (securetcp's SNI callbacks and what
they may do to a connection), `reload` (watching files, swapping
certificates), `failures` (naming why a handshake failed). The names below
are the public ones; import them from here.
"""

from securetcp.tls.config import (
    HYBRID_GROUPS,
    INTERMEDIATE_CIPHERS,
    MOZILLA_GROUPS,
    TLSConfig,
    profile_groups,
)
from securetcp.tls.errors import SSLOptionsError
from securetcp.tls.failures import classify_handshake_error
from securetcp.tls.options import (
    SSL_OPTIONS_KEYS,
    Authorize,
    ServerTLS,
    make_server_tls,
    ssl_options_to_context,
)
from securetcp.tls.sni import SERVER_NAME_ATTRIBUTE, remember_server_name

__all__ = [
    "HYBRID_GROUPS",
    "INTERMEDIATE_CIPHERS",
    "MOZILLA_GROUPS",
    "SERVER_NAME_ATTRIBUTE",
    "SSL_OPTIONS_KEYS",
    "Authorize",
    "SSLOptionsError",
    "ServerTLS",
    "TLSConfig",
    "classify_handshake_error",
    "make_server_tls",
    "profile_groups",
    "remember_server_name",
    "ssl_options_to_context",
]
