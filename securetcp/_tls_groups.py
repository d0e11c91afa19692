"""Restrict the key-exchange groups of an ``ssl.SSLContext``.

Mozilla's server-side TLS guidelines (v5.7) name the groups X25519,
prime256v1 and secp384r1. OpenSSL 3 offers more by default (X448,
secp521r1, ffdhe*), which scanners such as sslyze report. The stdlib ``ssl``
module before Python 3.15 can only pin one group (``set_ecdh_curve``), so:

1. ``SSLContext.set_groups`` is used when the running Python has it;
2. otherwise OpenSSL's ``SSL_CTX_set1_groups_list`` (a macro over
   ``SSL_CTX_ctrl``) is called through ctypes on the context's ``SSL_CTX*``.
   The symbols are looked up through the ``_ssl`` extension module, so they
   come from the very libssl that Python uses, and the pointer is read from
   the ``PySSLContext`` struct, whose first field after ``PyObject_HEAD`` has
   been ``SSL_CTX *ctx`` in every CPython release from 2.7 to 3.14.
   Before it is used on a real context, the whole path is proven once on a
   throw-away context: the library version must equal
   ``ssl.OPENSSL_VERSION_NUMBER``, ``SSL_CTX_get_options`` must track
   ``SSLContext.options``, and groups set through it must appear, and be
   the only ones, in the ClientHello that context produces;
3. if any step fails, one warning is logged and the fallback is
   ``set_ecdh_curve("prime256v1")`` (one Mozilla group; X25519 is then not
   offered), except on OpenSSL 3.5+, whose defaults lead with post-quantum
   hybrid groups: there OpenSSL's own list is left as it is rather than
   downgraded.

`groups_backend()` says which path is active ("native", "ctypes" or
"fallback"), for tests and for ``securetcp probe``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import ssl
from collections.abc import Sequence

from securetcp._openssl import LibSSL, libssl, ssl_ctx_pointer

__all__ = ["group_available", "groups_backend", "set_groups"]

log = logging.getLogger("securetcp.tls")

_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list
_PROBE_GROUPS = ("X25519", "secp384r1")
_PROBE_IDS = (0x001D, 0x0018)  # their TLS codepoints (RFC 8446, section 4.2.7)
_EXT_SUPPORTED_GROUPS = 10
_FALLBACK_GROUP = "prime256v1"


def _ctrl_set_groups(lib: LibSSL, context: ssl.SSLContext, groups: str) -> bool:
    pointer = ssl_ctx_pointer(context)
    if not pointer:
        return False
    buffer = ctypes.create_string_buffer(groups.encode("ascii"))
    if lib.ctx_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.addressof(buffer)) == 1:
        return True
    lib.clear_errors()  # leave no stale error for the ssl module to trip on
    return False


def _offered_groups(context: ssl.SSLContext) -> tuple[int, ...]:
    """Group ids in the supported_groups extension of a ClientHello from ``context``.

    The hello is produced in memory (no socket) and parsed just enough to
    read that one extension, so this checks exactly what goes on the wire.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return _supported_groups(outgoing.read())


class _Truncated(ValueError):
    """The ClientHello ended before a field it announced."""


def _field(record: bytes, pos: int, size: int) -> tuple[bytes, int]:
    end = pos + size
    if size < 0 or end > len(record):
        raise _Truncated(f"ClientHello truncated at byte {pos} (wanted {size} more)")
    return record[pos:end], end


def _number(record: bytes, pos: int, size: int) -> tuple[int, int]:
    raw, pos = _field(record, pos, size)
    return int.from_bytes(raw, "big"), pos


def _supported_groups(record: bytes) -> tuple[int, ...]:
    """The supported_groups of a ClientHello record; ValueError if it is malformed."""
    # record header (5) + handshake header (4) + version (2) + random (32)
    pos = 5 + 4 + 2 + 32
    size, pos = _number(record, pos, 1)
    _, pos = _field(record, pos, size)  # session id
    size, pos = _number(record, pos, 2)
    _, pos = _field(record, pos, size)  # cipher suites
    size, pos = _number(record, pos, 1)
    _, pos = _field(record, pos, size)  # compression methods
    size, pos = _number(record, pos, 2)
    extensions, _ = _field(record, pos, size)
    pos = 0
    while pos < len(extensions):
        kind, pos = _number(extensions, pos, 2)
        size, pos = _number(extensions, pos, 2)
        body, pos = _field(extensions, pos, size)
        if kind == _EXT_SUPPORTED_GROUPS:
            count, _ = _number(body, 0, 2)
            groups, _ = _field(body, 2, count)
            if count % 2:
                raise ValueError("odd length in the supported_groups extension")
            return tuple(int.from_bytes(groups[i : i + 2], "big") for i in range(0, count, 2))
    return ()


def _prove(lib: LibSSL) -> None:
    """Check the ctypes path on a throw-away context; raise if anything is off."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    pointer = ssl_ctx_pointer(probe)
    if not pointer:
        raise OSError("no SSL_CTX pointer in the SSLContext object")
    for options in (probe.options | ssl.OP_NO_TICKET, probe.options & ~ssl.OP_NO_TICKET):
        probe.options = options
        if lib.ctx_get_options(pointer) != int(probe.options):
            raise OSError("SSL_CTX_get_options does not match SSLContext.options")
    if not _ctrl_set_groups(lib, probe, ":".join(_PROBE_GROUPS)):
        raise OSError("SSL_CTX_set1_groups_list failed")
    if _offered_groups(probe) != _PROBE_IDS:
        raise OSError("groups set through SSL_CTX_ctrl did not read back")


@functools.lru_cache(maxsize=1)
def _proven_libssl() -> LibSSL | None:
    if platform.python_implementation() != "CPython":
        log.warning("cannot restrict TLS groups on %s", platform.python_implementation())
        return None
    try:
        lib = libssl()
        if lib is None:
            raise OSError("libssl is not reachable through ctypes")
        _prove(lib)
    except (OSError, AttributeError, TypeError, ValueError, IndexError) as exc:
        log.warning(
            "cannot restrict TLS key-exchange groups through OpenSSL (%s); %s",
            exc,
            "keeping OpenSSL's default groups (they include post-quantum hybrids)"
            if _keep_defaults()
            else f"falling back to the single group {_FALLBACK_GROUP}",
        )
        return None
    return lib


def _keep_defaults() -> bool:
    # OpenSSL 3.5+ offers hybrid post-quantum groups first by default.
    return ssl.OPENSSL_VERSION_INFO >= (3, 5)


def groups_backend() -> str:
    """How `set_groups` works here: "native" (``SSLContext.set_groups``),
    "ctypes" (OpenSSL through ctypes, proven first) or "fallback"."""
    if hasattr(ssl.SSLContext, "set_groups"):
        return "native"
    return "ctypes" if _proven_libssl() is not None else "fallback"


@functools.cache
def group_available(name: str) -> bool:
    """Whether the local OpenSSL can offer the group `name` (e.g. "X25519MLKEM768")."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    native = getattr(probe, "set_groups", None)
    if native is not None:
        try:
            native(name)
        except (ssl.SSLError, ValueError):
            return False
        return True
    lib = _proven_libssl()
    if lib is not None:
        return _ctrl_set_groups(lib, probe, name)
    try:
        probe.set_ecdh_curve(name)  # classic curves only: hybrids are not curves
    except (ssl.SSLError, ValueError):
        return False
    return True


def set_groups(context: ssl.SSLContext, groups: Sequence[str]) -> bool:
    """Limit ``context`` to ``groups`` (OpenSSL names), best effort.

    Returns True if the exact list was set, False if the fallback was used
    instead (see the module's docstring). Raises ValueError if
    OpenSSL rejects a group name.
    """
    group_list = ":".join(groups)
    native = getattr(context, "set_groups", None)
    if native is not None:  # Python 3.15+
        native(group_list)
        return True
    lib = _proven_libssl()
    if lib is not None:
        if not _ctrl_set_groups(lib, context, group_list):
            raise ValueError(f"OpenSSL rejected the group list {group_list!r}")
        return True
    if not _keep_defaults():
        context.set_ecdh_curve(_FALLBACK_GROUP)
    return False
