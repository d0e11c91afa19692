"""OpenSSL calls the stdlib ``ssl`` module does not offer, through ctypes.

Private. The symbols are looked up through the ``_ssl`` extension module, so
they come from the very libssl that Python uses (its version must equal
``ssl.OPENSSL_VERSION_NUMBER``). Object pointers are read from CPython's
structs: ``PySSLContext`` starts with ``SSL_CTX *ctx`` and ``PySSLSocket``
with ``PyObject *Socket; SSL *ssl; PySSLContext *ctx`` right after
``PyObject_HEAD``, as in every CPython from 3.7 to 3.14. Each layout is
checked before a pointer read from it is used (see `ssl_pointer`), and every
caller has a fallback for when this module cannot help.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LibSSL", "libssl", "ssl_ctx_pointer", "ssl_pointer", "tune_connection"]

log = logging.getLogger("securetcp.tls")

_POINTER = ctypes.sizeof(ctypes.c_void_p)
_OBJECT_HEAD = object.__basicsize__  # sizeof(PyObject), on any build

#: OpenSSL's read buffer for a connection with read-ahead: four full TLS
#: records (16 KiB plus header and AEAD overhead each) per read system call.
READ_BUFFER_LEN = 66 * 1024

_SSL_CTRL_MODE = 33
_SSL_MODE_RELEASE_BUFFERS = 0x10


@dataclass(frozen=True)
class LibSSL:
    """The libssl functions securetcp calls directly."""

    ctx_ctrl: Callable[..., int]
    ctx_get_options: Callable[..., int]
    clear_errors: Callable[[], None]
    ssl_ctrl: Callable[..., int]
    get_ssl_ctx: Callable[[int], int]
    has_pending: Callable[[int], int]
    set_read_ahead: Callable[[int, int], None]
    set_read_buffer_len: Callable[[int, int], None]


def _open() -> LibSSL:
    import _ssl

    # dlsym on the _ssl module's handle also searches its dependencies (libssl).
    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
    version = lib.OpenSSL_version_num
    version.restype, version.argtypes = ctypes.c_ulong, []
    if version() != ssl.OPENSSL_VERSION_NUMBER:
        raise OSError("the libssl found is not the one the ssl module uses")

    def function(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
        f = getattr(lib, name)
        f.restype, f.argtypes = restype, list(argtypes)
        return f  # type: ignore[no-any-return]

    vp, c_long, c_int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    return LibSSL(
        ctx_ctrl=function("SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp),
        ctx_get_options=function("SSL_CTX_get_options", ctypes.c_uint64, vp),
        clear_errors=function("ERR_clear_error", None),
        ssl_ctrl=function("SSL_ctrl", c_long, vp, c_int, c_long, vp),
        get_ssl_ctx=function("SSL_get_SSL_CTX", vp, vp),
        has_pending=function("SSL_has_pending", c_int, vp),
        set_read_ahead=function("SSL_set_read_ahead", None, vp, c_int),
        set_read_buffer_len=function("SSL_set_default_read_buffer_len", None, vp, ctypes.c_size_t),
    )


@functools.lru_cache(maxsize=1)
def libssl() -> LibSSL | None:
    """The libssl functions, or None (logged once) where they can't be had safely."""
    if platform.python_implementation() != "CPython":
        return None
    try:
        return _open()
    except (OSError, AttributeError, TypeError, ValueError) as exc:
        log.warning("OpenSSL functions beyond the ssl module are unavailable: %s", exc)
        return None


def _word(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The ``SSL_CTX*`` held by a CPython ``PySSLContext`` (0 if not found)."""
    if type(context).__basicsize__ < _OBJECT_HEAD + _POINTER:
        return 0
    return _word(id(context) + _OBJECT_HEAD)


def ssl_pointer(tls: Any) -> int:
    """The ``SSL*`` of an ``_ssl._SSLSocket`` object (0 if not found).

    The layout is confirmed before the pointer is trusted: the struct's
    ``ctx`` field must be the object's own context, and OpenSSL must agree
    that this ``SSL*`` belongs to that context's ``SSL_CTX*``.
    """
    lib = libssl()
    if lib is None or type(tls).__basicsize__ < _OBJECT_HEAD + 3 * _POINTER:
        return 0
    context = tls.context
    if _word(id(tls) + _OBJECT_HEAD + 2 * _POINTER) != id(context):
        return 0
    pointer = _word(id(tls) + _OBJECT_HEAD + _POINTER)
    if not pointer or lib.get_ssl_ctx(pointer) != ssl_ctx_pointer(context):
        return 0
    return pointer


def tune_connection(tls: Any) -> int:
    """Turn on read-ahead for one connection; its ``SSL*``, or 0 if not done.

    Without read-ahead OpenSSL reads each record with two system calls
    (header, then body); with it, one call fills its buffer (several records). The price is
    that bytes may then wait inside OpenSSL undecrypted, where neither the
    socket's readiness nor ``pending()`` shows them: the caller must check
    ``SSL_has_pending`` (`LibSSL.has_pending`) before waiting for readiness.
    Call this before the handshake (the buffer is sized at first use).
    """
    lib = libssl()
    pointer = ssl_pointer(tls) if lib is not None else 0
    if not pointer or lib is None:
        return 0
    lib.set_read_buffer_len(pointer, READ_BUFFER_LEN)
    lib.set_read_ahead(pointer, 1)
    # Buffers are freed whenever they empty, so an idle connection does not
    # keep its READ_BUFFER_LEN (measured: no cost to message rates here).
    lib.ssl_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_RELEASE_BUFFERS, None)
    return pointer
