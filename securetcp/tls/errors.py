"""The error every ``ssl_options`` form raises when it cannot be used."""

from __future__ import annotations

__all__ = ["SSLOptionsError"]


class SSLOptionsError(ValueError):
    """``ssl_options`` (dict or :class:`~securetcp.tls.TLSConfig`) cannot be used.

    The message names the option and the file concerned.
    """
