"""TLS bytes built by hand: records, legacy ClientHellos, and real ones to mutate.

Only what the attacks need: a ClientHello for SSLv2/SSLv3/TLS 1.0/TLS 1.1
(which a TLS 1.2+ server must refuse), the record layer, and the ClientHello
a real client (Python's ssl) sends, grown or cut as a case wants.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import struct

HANDSHAKE = 0x16
ALERT = 0x15
APPLICATION_DATA = 0x17

VERSIONS = {"SSLv3": 0x0300, "TLSv1.0": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303}

# Suites those versions knew: RSA and ECDHE with AES-CBC/SHA-1, 3DES, RC4.
_LEGACY_SUITES = (0xC014, 0xC013, 0x0035, 0x002F, 0x000A, 0x0005, 0x00FF)


def record(content_type: int, payload: bytes, version: int = 0x0301) -> bytes:
    """One TLS record (no length check: callers may lie about it on purpose)."""
    return struct.pack("!BHH", content_type, version, len(payload)) + payload


def records(content_type: int, payload: bytes, size: int = 16384, version: int = 0x0301) -> bytes:
    """`payload` split into records of at most `size` bytes."""
    return b"".join(
        record(content_type, payload[i : i + size], version) for i in range(0, len(payload), size)
    )


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def legacy_client_hello(version: int, server_name: str = "localhost") -> bytes:
    """A ClientHello record offering only `version` (no supported_versions extension)."""
    name = server_name.encode()
    extensions = b"".join(
        [
            # server_name
            _extension(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name),
            # supported_groups: secp256r1, secp384r1
            _extension(10, struct.pack("!HHH", 4, 23, 24)),
            # ec_point_formats: uncompressed
            _extension(11, b"\x01\x00"),
        ]
    )
    suites = b"".join(struct.pack("!H", s) for s in _LEGACY_SUITES)
    body = (
        struct.pack("!H", version)
        + os.urandom(32)
        + b"\x00"  # no session id
        + struct.pack("!H", len(suites))
        + suites
        + b"\x01\x00"  # compression: null
    )
    if version > 0x0300:  # SSLv3 ClientHellos carried no extensions
        body += struct.pack("!H", len(extensions)) + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return record(HANDSHAKE, message, version=min(version, 0x0301))


def sslv2_client_hello() -> bytes:
    """An SSLv2-format CLIENT-HELLO (two-byte header with the high bit set)."""
    specs = bytes.fromhex("0100800300800700c000000500000a")
    challenge = os.urandom(16)
    body = (
        b"\x01"  # MSG-CLIENT-HELLO
        + struct.pack("!HHHH", 0x0002, len(specs), 0, len(challenge))
        + specs
        + challenge
    )
    return struct.pack("!H", 0x8000 | len(body)) + body


def python_client_hello(context: ssl.SSLContext | None = None) -> bytes:
    """The ClientHello record(s) Python's ssl sends (a fresh random each time)."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_message(client_hello_record: bytes) -> bytes:
    """The handshake message inside one ClientHello record."""
    content_type, _, length = struct.unpack("!BHH", client_hello_record[:5])
    assert content_type == HANDSHAKE and len(client_hello_record) == 5 + length
    return client_hello_record[5:]


def padded_client_hello(total: int, context: ssl.SSLContext | None = None) -> bytes:
    """A real ClientHello grown to `total` bytes of handshake message by an
    unknown extension, split into 16 KiB records as the record layer must."""
    message = handshake_message(python_client_hello(context))
    body = message[4:]
    # body: version(2) random(32) sid(1+n) suites(2+n) compression(1+n) ext_len(2) exts
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + struct.unpack("!H", body[pos : pos + 2])[0]
    pos += 1 + body[pos]
    extensions = body[pos + 2 :]
    grow = total - len(message) - 4  # the new extension's own header
    assert grow > 0, "the ClientHello is already that big"
    # An unassigned extension type (0xfafa is a GREASE value: servers ignore it),
    # placed first: TLS 1.3 wants pre_shared_key last.
    unknown = _extension(0xFAFA, b"\x00" * grow)
    extensions = unknown + extensions
    body = body[:pos] + struct.pack("!H", len(extensions)) + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(HANDSHAKE, message)
