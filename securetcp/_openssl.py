"""OpenSSL calls the stdlib ``ssl`` module does not offer, through ctypes.

Private. The symbols are looked up through the ``_ssl`` extension module, so
they come from the very libssl that Python uses (its version must equal
``ssl.OPENSSL_VERSION_NUMBER``). Object pointers are read from CPython's
structs: ``PySSLContext`` starts with ``SSL_CTX *ctx`` and ``PySSLSocket``
with ``PyObject *Socket; SSL *ssl; PySSLContext *ctx`` right after
``PyObject_HEAD``, as in every CPython from 3.7 to 3.14. A pointer read from
a struct is never handed to OpenSSL before it is proven safe: the memory it
points to must be readable (asked of the kernel, which answers EFAULT where
a read would crash, see `readable`) and, for an ``SSL*``, the struct's layout
must be confirmed (see `ssl_pointer`). Every caller has a fallback for when
this module cannot help.

The functions are loaded with ``ctypes.PyDLL``: they hold the GIL, which is
right for calls this short (``CDLL`` would release and retake it on each
``SSL_has_pending`` in the read loop).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LibSSL",
    "enlarge_read_buffer",
    "libssl",
    "prepare_connection",
    "readable",
    "ssl_ctx_pointer",
    "ssl_pointer",
]

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
    shutdown: Callable[[int], int]


def _open() -> LibSSL:
    import _ssl

    # dlsym on the _ssl module's handle also searches its dependencies (libssl).
    lib = ctypes.PyDLL(getattr(_ssl, "__file__", None))
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
        shutdown=function("SSL_shutdown", c_int, vp),
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
    # Only ever called on addresses inside a live Python object's struct.
    return ctypes.c_void_p.from_address(address).value or 0


#: Bytes that must be readable behind a pointer before OpenSSL is given it
#: (more than the fields read through it: options, the SSL_CTX of an SSL).
_PROBE_SIZE = 1024


@functools.lru_cache(maxsize=1)
def _libc_write() -> Callable[..., int] | None:
    try:
        write = ctypes.CDLL(None).write
    except (OSError, AttributeError):
        return None
    write.restype = ctypes.c_ssize_t
    write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return write


def readable(address: int, size: int = _PROBE_SIZE) -> bool:
    """Whether `size` bytes at `address` can be read without crashing.

    Asks the kernel: ``write(2)`` from the address into a pipe fails with
    EFAULT for unmapped memory, where reading it would crash. (The pipe
    lives for one call: this runs when a context or a struct layout is
    first proven, not per connection.)
    """
    write = _libc_write()
    if write is None or address <= 0 or address % _POINTER:
        return False
    read_fd, write_fd = os.pipe()
    try:
        return bool(write(write_fd, address, size) == size)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The ``SSL_CTX*`` held by a CPython ``PySSLContext`` (0 if not found).

    Readable memory is all this proves; `securetcp._tls_groups` proves the
    rest (OpenSSL's view of the options must track the context's) before
    changing anything through it.
    """
    if type(context).__basicsize__ < _OBJECT_HEAD + _POINTER:
        return 0
    pointer = _word(id(context) + _OBJECT_HEAD)
    return pointer if readable(pointer) else 0


_proven_layouts: set[type] = set()


def ssl_pointer(tls: Any) -> int:
    """The ``SSL*`` of an ``_ssl._SSLSocket`` object (0 if not found).

    The layout is confirmed before the pointer is trusted: the struct's
    ``ctx`` field must be the object's own context (checked every time: a
    cheap read inside the object), and, the first time for its type, the
    pointer must be readable memory and OpenSSL must agree that this
    ``SSL*`` belongs to that context's ``SSL_CTX*``. Once a type's layout
    is proven, its ``SSL*`` field is what CPython stored there.
    """
    lib = libssl()
    kind = type(tls)
    if lib is None or kind.__basicsize__ < _OBJECT_HEAD + 3 * _POINTER:
        return 0
    context = tls.context
    if _word(id(tls) + _OBJECT_HEAD + 2 * _POINTER) != id(context):
        return 0
    pointer = _word(id(tls) + _OBJECT_HEAD + _POINTER)
    if kind in _proven_layouts:
        return pointer
    if not readable(pointer):
        return 0
    context_pointer = ssl_ctx_pointer(context)
    if not context_pointer or lib.get_ssl_ctx(pointer) != context_pointer:
        return 0
    _proven_layouts.add(kind)
    return pointer


def prepare_connection(tls: Any) -> int:
    """Read ahead, and free buffers whenever they empty; the ``SSL*``, or 0.

    Call it before the handshake. Without read-ahead OpenSSL reads each
    record with two system calls (header, then body); with it, one call
    takes what the socket has, up to the read buffer (OpenSSL's default,
    ~16.7 KiB, until `enlarge_read_buffer`): a handshake then reads in two
    or three calls instead of eight or more. Buffers are released whenever
    they empty, so an idle connection holds none. The price of read-ahead
    is that bytes may wait inside OpenSSL undecrypted, where neither the
    socket's readiness nor ``pending()`` shows them: the caller must check
    ``SSL_has_pending`` (`LibSSL.has_pending`) before waiting for readiness.
    """
    lib = libssl()
    pointer = ssl_pointer(tls) if lib is not None else 0
    if not pointer or lib is None:
        return 0
    lib.ssl_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_RELEASE_BUFFERS, None)
    lib.set_read_ahead(pointer, 1)
    return pointer


def enlarge_read_buffer(pointer: int) -> None:
    """Give the connection whose ``SSL*`` is `pointer` a `READ_BUFFER_LEN` read buffer.

    Called once the handshake is done (so a ClientHello never gets the large
    buffer: a flood of them costs OpenSSL's default); it applies from the
    next buffer OpenSSL allocates, i.e. once the current one has emptied.
    """
    lib = libssl()
    if lib is None or not pointer:
        return
    lib.set_read_buffer_len(pointer, READ_BUFFER_LEN)
