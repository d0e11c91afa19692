"""PROXY protocol v1 and v2: a sans-I/O parser and encoder.

A proxy (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, stunnel, ...)
puts a PROXY header at the very start of a connection to tell the server
who the real client is. This module turns bytes into a :class:`ProxyHeader`
and back; it does no I/O, so a server, a proxy or a test can use it alike.
It follows HAProxy's specification, ``doc/proxy-protocol.txt`` (2026/04/27).

Parsing::

    result = parse_proxy_header(data)
    if result is None:
        ...                      # a valid but incomplete header: read more
    else:
        header, consumed = result  # data[consumed:] is application data

Anything malformed raises :class:`ProxyProtocolError` (a ``ValueError``),
as early as the bytes seen allow; nothing else is ever raised for bytes-like
input (``TypeError`` for anything else).

Reading a header from a socket without taking a byte of what follows (the
TLS layer must see the ClientHello intact) works in either of two ways:

* read exactly: ``header_length_hint(buffer)`` is a length the header is
  known to reach, so ``recv(hint - len(buffer))`` never reads past it::

      buffer = b""
      while (result := parse_proxy_header(buffer)) is None:
          chunk = sock.recv(header_length_hint(buffer) - len(buffer))
          if not chunk: raise EOFError  # closed mid-header
          buffer += chunk

  A v2 header takes three reads (15 bytes, 1, the rest), a v1 line up to
  about ten (the end of a line is only known once it is seen).
* peek: ``recv(n, MSG_PEEK)``, parse, then ``recv(consumed)`` to take the
  header alone: two system calls whatever the header, when it arrived in
  one segment as senders make it (536 bytes hold any but a v2 header with
  large TLVs). While the result is None, wait for more data before peeking
  again; or continue with the exact reads above.

Representation choices (the specification leaves them to the receiver):

* ``source``/``destination`` are ``(host, port)``; ``host`` is written as
  ``socket.inet_ntop`` writes it, so as ``getpeername()`` would have given it
  for a direct connection (``"192.0.2.1"``, ``"2001:db8::1"``,
  ``"::ffff:192.0.2.1"``), whatever form a v1 line used. They are None when the
  sender says to use the connection's own endpoints: a LOCAL command, a v1
  ``UNKNOWN`` line, a v2 ``AF_UNSPEC`` family or ``UNSPEC`` transport.
* ``AF_UNIX`` (v2) addresses are ``(path, 0)`` (to encode one, the path must
  not read as an IP address): the 108-byte field up to its
  first NUL (``""`` for an unnamed socket, the usual client side), decoded
  with :func:`os.fsdecode`; an abstract-namespace name keeps its leading
  ``"\\0"`` (trailing NUL padding dropped).
* Transport: ``STREAM`` is what a TCP server is told about. ``DGRAM``
  headers are valid, but a stream receiver does not implement them, so, as
  the specification asks of such receivers, they fall back to ``UNSPEC``:
  addresses None. Undefined family or transport values raise.
* The body of a v2 header is the family's address block (0 bytes for
  ``AF_UNSPEC``, 12, 36 or 216), whatever the command, then TLVs up to the
  announced length. TLVs are parsed fully: a truncated one raises; so do a
  repeated type (except ``PP2_TYPE_NOOP``, whose values are joined), a
  ``PP2_TYPE_CRC32C`` that is not 4 bytes or does not match (it is checked
  whenever present), a ``PP2_TYPE_UNIQUE_ID`` over 128 bytes, a
  ``PP2_TYPE_AUTHORITY`` that is not UTF-8 and a malformed ``PP2_TYPE_SSL``
  (see :func:`parse_ssl_tlv`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "MAX_HEADER_LENGTH",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CLIENT_CERT",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_GROUP",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_SIG_SCHEME",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "SSLTLV",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "crc32c",
    "encode_proxy_header",
    "encode_ssl_tlv",
    "header_length_hint",
    "parse_proxy_header",
    "parse_ssl_tlv",
]

Address: TypeAlias = "tuple[str, int]"
_Bytes: TypeAlias = bytes | bytearray | memoryview

# -- constants from the specification ---------------------------------------------

#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 line, CRLF included ("PROXY UNKNOWN" with two IPv6 addresses).
V1_MAX_LENGTH = 107
_V2_FIXED = 16
#: The longest header of either version (v2: 16 bytes + a 16-bit length).
MAX_HEADER_LENGTH = _V2_FIXED + 0xFFFF

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_SUBTYPE_SSL_GROUP = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28
PP2_TYPE_NETNS = 0x30
#: Bits of the ``client`` field of a ``PP2_TYPE_SSL`` value.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_UNIQUE_ID_MAX = 128
_UNIX_PATH = 108
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_ADDRESS_SIZE = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 2 * _UNIX_PATH}
_FAMILY_NAMES = {_AF_UNSPEC: "AF_UNSPEC", _AF_INET: "AF_INET", _AF_INET6: "AF_INET6"}
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0x0, 0x1, 0x2


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header (the message says why)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``version`` is 1 or 2; ``command`` ``"PROXY"`` or ``"LOCAL"`` (v1 lines
    are always ``"PROXY"``); ``source``/``destination`` are ``(host, port)``,
    or None when the connection's own endpoints apply (LOCAL, v1 UNKNOWN,
    v2 AF_UNSPEC or UNSPEC/DGRAM transport); ``tlvs`` maps a v2 TLV type to
    its value (empty for v1).
    """

    version: int
    command: str
    source: Address | None
    destination: Address | None
    tlvs: dict[int, bytes] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class SSLTLV:
    """The value of a ``PP2_TYPE_SSL`` TLV.

    ``client`` holds ``PP2_CLIENT_*`` bits; ``verify`` is 0 when the client
    presented a certificate that verified; ``tlvs`` are the sub-TLVs
    (``PP2_SUBTYPE_SSL_VERSION``, ``..._CN``, ``..._CIPHER``, ...).
    """

    client: int
    verify: int
    tlvs: dict[int, bytes] = field(default_factory=dict, hash=False)


# -- CRC32C (Castagnoli, RFC 4960 appendix B) ---------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: _Bytes, crc: int = 0) -> int:
    """The CRC32C of `data` (continuing from `crc`), as the PP2_TYPE_CRC32C TLV holds it."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- parsing -------------------------------------------------------------------------


def parse_proxy_header(data: _Bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header (v1 or v2, detected) at the start of `data`.

    Returns None while `data` is a valid but incomplete prefix of a header,
    else ``(header, consumed)``: the header took ``data[:consumed]``.
    Raises :class:`ProxyProtocolError` for anything malformed.
    """
    result = _parse(_as_bytes(data))
    return result if isinstance(result, tuple) else None


def header_length_hint(data: _Bytes) -> int:
    """A length the header at the start of `data` is known to reach.

    For a complete header, its length (``consumed``). Otherwise a number
    greater than ``len(data)`` and no greater than the header's length,
    however it ends: reading up to that many bytes in total never takes
    application data. Exact for v2 once its first 16 bytes are known.
    Raises :class:`ProxyProtocolError` as :func:`parse_proxy_header` does.
    """
    result = _parse(_as_bytes(data))
    return result[1] if isinstance(result, tuple) else result


def _as_bytes(data: _Bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"PROXY protocol data must be bytes-like, not {type(data).__name__}")
    if isinstance(data, memoryview):
        return data.tobytes()[:MAX_HEADER_LENGTH]
    return bytes(data[:MAX_HEADER_LENGTH])


def _parse(data: bytes) -> tuple[ProxyHeader, int] | int:
    """The header and its length, or (incomplete) a lower bound of its length."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return len(_V1_MIN_LINE)  # the shortest header of either version
    raise ProxyProtocolError(
        f"not a PROXY protocol header: starts with {data[:8]!r} "
        "(expected 'PROXY ' for v1 or the v2 signature)"
    )


# -- v1 ------------------------------------------------------------------------------

_V1_MIN_LINE = b"PROXY UNKNOWN\r\n"
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(_OCTET + rb"(?:\." + _OCTET + rb"){3}\Z")
# The bytes a field may hold, its shortest and its longest form. TCP6 takes
# the dotted tail of an IPv4-mapped address too: inet_ntop writes it so, and
# HAProxy's v1 sender uses inet_ntop.
_IPV4_FIELD = (b"0123456789.", 7, 15)
_IPV6_FIELD = (b"0123456789abcdefABCDEF:.", 2, 45)
_PORT_FIELD = (b"0123456789", 1, 5)
_V1_FIELDS = {
    b"TCP4": (_IPV4_FIELD, _IPV4_FIELD, _PORT_FIELD, _PORT_FIELD),
    b"TCP6": (_IPV6_FIELD, _IPV6_FIELD, _PORT_FIELD, _PORT_FIELD),
}
_V1_NAMES = ("source address", "destination address", "source port", "destination port")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | int:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    line = data[:end] if end >= 0 else data[: V1_MAX_LENGTH - 1]
    if b"\n" in line:
        raise ProxyProtocolError("PROXY v1 line: a bare LF (the line must end in CRLF)")
    cr = line.find(b"\r")
    # Only the very last byte seen may be a CR whose LF is still to come.
    if cr >= 0 and (end >= 0 or cr != len(data) - 1):
        raise ProxyProtocolError("PROXY v1 line: a CR not followed by LF")
    if end >= 0:
        return _v1_header(line), end + 2
    if len(data) >= V1_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 line: no CRLF within the first {V1_MAX_LENGTH} bytes")
    if cr >= 0:
        _v1_header(line[:-1])  # only the LF can follow: the line must be whole
        return len(data) + 1
    return _v1_prefix_bound(data)


def _v1_prefix_bound(data: bytes) -> int:
    """Check an incomplete v1 line as far as it goes; return a bound of its length."""
    fields = data.split(b" ")
    if fields[0] != b"PROXY" if len(fields) > 1 else not b"PROXY".startswith(fields[0]):
        raise ProxyProtocolError(f"PROXY v1 line: starts with {_show(data[:6])}, not 'PROXY '")
    bound = len(data) + 2  # the CRLF is still to come
    if len(fields) == 1:
        return max(bound, len(_V1_MIN_LINE))
    protocol = fields[1]
    if len(fields) == 2:
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"PROXY v1 line: unknown protocol {_show(protocol)}")
        return max(bound, len(_V1_MIN_LINE))
    if protocol == b"UNKNOWN":
        return bound  # the rest of an UNKNOWN line is ignored until its CRLF
    if protocol not in _V1_FIELDS:
        raise ProxyProtocolError(f"PROXY v1 line: unknown protocol {_show(protocol)}")
    specs = _V1_FIELDS[protocol]
    values = fields[2:]
    if len(values) > len(specs):
        raise ProxyProtocolError("PROXY v1 line: more than 6 fields")
    for index, value in enumerate(values):
        allowed, _, longest = specs[index]
        last = index == len(values) - 1
        if not value and not last:
            raise ProxyProtocolError("PROXY v1 line: fields must be separated by one space")
        if len(value) > longest or value.strip(allowed):
            raise ProxyProtocolError(
                f"PROXY v1 line: bad {_V1_NAMES[index]} {_show(value)} for {protocol.decode()}"
            )
        if not last:  # a space followed it: the field is whole
            _V1_DECODERS[protocol][index](value, _V1_NAMES[index])
    # The field being read needs its shortest form; each one still missing,
    # a space and its shortest form.
    bound += max(0, specs[len(values) - 1][1] - len(values[-1]))
    for _, shortest, _ in specs[len(values) :]:
        bound += 1 + shortest
    return min(bound, V1_MAX_LENGTH)


def _v1_header(line: bytes) -> ProxyHeader:
    """Decode a complete v1 line (without its CRLF)."""
    fields = line.split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyProtocolError(f"PROXY v1 line: starts with {_show(line[:6])}, not 'PROXY '")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None, {})
    if protocol not in _V1_FIELDS:
        raise ProxyProtocolError(f"PROXY v1 line: unknown protocol {_show(protocol)}")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 line: {protocol.decode()} needs 4 fields separated by single spaces "
            f"(addresses and ports), got {len(fields) - 2}"
        )
    address = _v1_ipv4 if protocol == b"TCP4" else _v1_ipv6
    source = (address(fields[2], _V1_NAMES[0]), _v1_port(fields[4], _V1_NAMES[2]))
    destination = (address(fields[3], _V1_NAMES[1]), _v1_port(fields[5], _V1_NAMES[3]))
    return ProxyHeader(1, "PROXY", source, destination, {})


def _v1_ipv4(value: bytes, what: str) -> str:
    if not _IPV4.match(value):
        raise ProxyProtocolError(
            f"PROXY v1 line: bad {what} {_show(value)} for TCP4 "
            "(four decimal numbers 0-255 without leading zeros)"
        )
    return value.decode("ascii")


def _v1_ipv6(value: bytes, what: str) -> str:
    try:
        if value.strip(_IPV6_FIELD[0]):
            raise ValueError
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, value.decode()))
    except (OSError, ValueError):
        raise ProxyProtocolError(f"PROXY v1 line: bad {what} {_show(value)} for TCP6") from None


def _v1_port(value: bytes, what: str) -> int:
    if not _PORT.match(value) or int(value) > 0xFFFF:
        raise ProxyProtocolError(
            f"PROXY v1 line: bad {what} {_show(value)} (0-65535, no leading zeros)"
        )
    return int(value)


_V1_DECODERS: dict[bytes, tuple[Callable[[bytes, str], str | int], ...]] = {
    b"TCP4": (_v1_ipv4, _v1_ipv4, _v1_port, _v1_port),
    b"TCP6": (_v1_ipv6, _v1_ipv6, _v1_port, _v1_port),
}


def _show(value: bytes) -> str:
    """A field for an error message: short, and never raising on odd bytes."""
    return repr(value[:48].decode("ascii", "backslashreplace"))


# -- v2 ------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | int:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyProtocolError(f"PROXY v2 header: bad signature {signature!r}")
    if len(data) < _V2_FIXED:
        # Refuse a bad version, command or family as soon as its byte is in.
        if len(data) > 12:
            _v2_command(data[12])
        if len(data) > 13:
            _v2_family(data[13])
        return _V2_FIXED
    command = _v2_command(data[12])
    family, transport = _v2_family(data[13])
    length = int.from_bytes(data[14:16], "big")
    address_size = _ADDRESS_SIZE[family]
    if length < address_size:
        raise ProxyProtocolError(
            f"PROXY v2 header: length {length} does not fit the "
            f"{address_size}-byte {_family_name(family)} addresses"
        )
    total = _V2_FIXED + length
    if len(data) < total:
        return total
    header = data[:total]
    body = header[_V2_FIXED:]
    source = destination = None
    if command == "PROXY" and transport == _TRANSPORT_STREAM and family != _AF_UNSPEC:
        source, destination = _v2_addresses(family, body)
    tlvs = _parse_tlvs(body, address_size, "PROXY v2 header")
    _check_tlvs(tlvs, header, address_size)
    return ProxyHeader(2, command, source, destination, tlvs), total


def _family_name(family: int) -> str:
    return _FAMILY_NAMES.get(family, "AF_UNIX")


def _v2_command(byte: int) -> str:
    if byte >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header: unknown version {byte >> 4} (expected 2)")
    command = _COMMANDS.get(byte & 0x0F)
    if command is None:
        raise ProxyProtocolError(f"PROXY v2 header: unknown command 0x{byte & 0x0F:x}")
    return command


def _v2_family(byte: int) -> tuple[int, int]:
    family, transport = byte >> 4, byte & 0x0F
    if family not in _ADDRESS_SIZE:
        raise ProxyProtocolError(f"PROXY v2 header: unknown address family 0x{family:x}")
    if transport > _TRANSPORT_DGRAM:
        raise ProxyProtocolError(f"PROXY v2 header: unknown transport protocol 0x{transport:x}")
    return family, transport


def _v2_addresses(family: int, body: bytes) -> tuple[Address, Address]:
    if family == _AF_INET:
        sport, dport = struct.unpack_from("!HH", body, 8)
        return (_ipv4_text(body[:4]), sport), (_ipv4_text(body[4:8]), dport)
    if family == _AF_INET6:
        sport, dport = struct.unpack_from("!HH", body, 32)
        return (
            (socket.inet_ntop(socket.AF_INET6, body[:16]), sport),
            (socket.inet_ntop(socket.AF_INET6, body[16:32]), dport),
        )
    return (_unix_path(body[:_UNIX_PATH]), 0), (_unix_path(body[_UNIX_PATH : 2 * _UNIX_PATH]), 0)


def _ipv4_text(packed: bytes) -> str:
    return ".".join(map(str, packed))  # what IPv4Address would say, at a fraction of the cost


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\x00" and raw.strip(b"\x00"):
        return "\x00" + os.fsdecode(raw[1:].rstrip(b"\x00"))  # abstract namespace
    return os.fsdecode(raw.split(b"\x00", 1)[0])


def _parse_tlvs(body: bytes, offset: int, where: str) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    end = len(body)
    while offset < end:
        if offset + 3 > end:
            raise ProxyProtocolError(
                f"{where}: truncated TLV at offset {offset} ({end - offset} of 3 header bytes)"
            )
        kind, size = body[offset], int.from_bytes(body[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + size > end:
            raise ProxyProtocolError(
                f"{where}: truncated TLV 0x{kind:02x}: {size} bytes announced, {end - start} left"
            )
        value = body[start : start + size]
        if kind in tlvs:
            if kind != PP2_TYPE_NOOP:
                raise ProxyProtocolError(f"{where}: TLV 0x{kind:02x} appears more than once")
            value = tlvs[kind] + value  # padding: no meaning, so joined
        tlvs[kind] = value
        offset = start + size
    return tlvs


def _check_tlvs(tlvs: dict[int, bytes], header: bytes, address_size: int) -> None:
    checksum = tlvs.get(PP2_TYPE_CRC32C)
    if checksum is not None:
        if len(checksum) != 4:
            raise ProxyProtocolError(
                f"PROXY v2 header: CRC32C TLV of {len(checksum)} bytes (must be 4)"
            )
        if crc32c(_zero_crc(header, address_size)) != int.from_bytes(checksum, "big"):
            raise ProxyProtocolError("PROXY v2 header: CRC32C checksum mismatch")
    unique_id = tlvs.get(PP2_TYPE_UNIQUE_ID)
    if unique_id is not None and len(unique_id) > _UNIQUE_ID_MAX:
        raise ProxyProtocolError(
            f"PROXY v2 header: UNIQUE_ID TLV of {len(unique_id)} bytes (at most 128)"
        )
    authority = tlvs.get(PP2_TYPE_AUTHORITY)
    if authority is not None:
        try:
            authority.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyProtocolError("PROXY v2 header: AUTHORITY TLV is not UTF-8") from None
    ssl = tlvs.get(PP2_TYPE_SSL)
    if ssl is not None:
        parse_ssl_tlv(ssl)


def _zero_crc(header: bytes, address_size: int) -> bytes:
    """`header` with the CRC32C TLV's 4-byte value zeroed, as it was when computed."""
    start = _crc_offset(header, address_size)
    return header[:start] + b"\x00\x00\x00\x00" + header[start + 4 :]


def _crc_offset(header: bytes, address_size: int) -> int:
    """Where the value of the (well-formed, present) CRC32C TLV starts."""
    offset = _V2_FIXED + address_size
    while header[offset] != PP2_TYPE_CRC32C:
        offset += 3 + int.from_bytes(header[offset + 1 : offset + 3], "big")
    return offset + 3


def parse_ssl_tlv(value: _Bytes) -> SSLTLV:
    """Decode the value of a ``PP2_TYPE_SSL`` TLV (client bits, verify, sub-TLVs).

    Raises :class:`ProxyProtocolError` if it is shorter than 5 bytes or a
    sub-TLV is truncated (parse_proxy_header has checked that already).
    """
    raw = bytes(value)
    if len(raw) < 5:
        raise ProxyProtocolError(f"PROXY v2 SSL TLV: {len(raw)} bytes (at least 5)")
    client, verify = struct.unpack_from("!BI", raw)
    return SSLTLV(client, verify, _parse_tlvs(raw, 5, "PROXY v2 SSL TLV"))


# -- encoding ------------------------------------------------------------------------


def encode_proxy_header(
    source: Address | None,
    destination: Address | None,
    *,
    version: int = 2,
    tlvs: dict[int, bytes] | None = None,
) -> bytes:
    """The PROXY header that tells a server a connection is from `source` to `destination`.

    Addresses are ``(host, port)`` with an IPv4 or IPv6 address (a longer
    sockaddr tuple such as IPv6's 4-tuple is accepted, its extra items
    ignored), both of one family; ``(path, 0)`` is an ``AF_UNIX`` address
    (v2 only). ``source=None`` and ``destination=None`` encode LOCAL (v2) or
    UNKNOWN (v1). `tlvs` (v2 only) maps a type to its value; a
    ``PP2_TYPE_CRC32C`` entry's value is replaced by the computed checksum.
    Raises :class:`ProxyProtocolError` for what cannot be encoded.
    """
    if version not in (1, 2) or isinstance(version, bool):
        raise ProxyProtocolError(f"PROXY protocol version must be 1 or 2, not {version!r}")
    if (source is None) != (destination is None):
        raise ProxyProtocolError("source and destination must both be given, or both be None")
    if version == 1:
        if tlvs:
            raise ProxyProtocolError("TLVs need PROXY protocol version 2")
        return _encode_v1(source, destination)
    return _encode_v2(source, destination, tlvs or {})


def _encode_v1(source: Address | None, destination: Address | None) -> bytes:
    if source is None or destination is None:
        return _V1_MIN_LINE
    family, src, sport = _endpoint(source, "source")
    dst_family, dst, dport = _endpoint(destination, "destination")
    _same_family(family, dst_family)
    if family == _AF_UNIX:
        raise ProxyProtocolError("PROXY v1 cannot carry AF_UNIX addresses (use version 2)")
    protocol = "TCP4" if family == _AF_INET else "TCP6"
    return f"PROXY {protocol} {_v1_text(src)} {_v1_text(dst)} {sport} {dport}\r\n".encode()


def _v1_text(packed: bytes) -> str:
    """An address as a v1 line spells it."""
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    text = socket.inet_ntop(socket.AF_INET6, packed)
    if "." not in text:
        return text
    # The specification's form is hex groups only; inet_ntop writes the
    # tail of an IPv4-mapped or -compatible address dotted.
    return ":".join(f"{int.from_bytes(packed[i : i + 2], 'big'):x}" for i in range(0, 16, 2))


def _encode_v2(
    source: Address | None, destination: Address | None, tlvs: dict[int, bytes]
) -> bytes:
    if source is None or destination is None:
        command, family_byte, addresses, address_size = 0x20, 0x00, b"", 0
    else:
        family, src, sport = _endpoint(source, "source")
        dst_family, dst, dport = _endpoint(destination, "destination")
        _same_family(family, dst_family)
        command, family_byte = 0x21, family << 4 | _TRANSPORT_STREAM
        addresses = src + dst
        if family != _AF_UNIX:
            addresses += struct.pack("!HH", sport, dport)
        address_size = len(addresses)
    body = bytearray(addresses)
    for kind, value in tlvs.items():
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 0xFF:
            raise ProxyProtocolError(f"TLV type must be an integer 0-255, not {kind!r}")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"TLV 0x{kind:02x} value must be bytes, not {type(value).__name__}")
        raw = b"\x00\x00\x00\x00" if kind == PP2_TYPE_CRC32C else bytes(value)
        if len(raw) > 0xFFFF:
            raise ProxyProtocolError(f"TLV 0x{kind:02x} value of {len(raw)} bytes (at most 65535)")
        body += struct.pack("!BH", kind, len(raw)) + raw
    if len(body) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v2 header body of {len(body)} bytes (at most 65535)")
    header = V2_SIGNATURE + struct.pack("!BBH", command, family_byte, len(body)) + bytes(body)
    if PP2_TYPE_CRC32C in tlvs:
        # Computed over the header with the TLV's value zeroed, as written.
        checksum = crc32c(header).to_bytes(4, "big")
        offset = _crc_offset(header, address_size)
        header = header[:offset] + checksum + header[offset + 4 :]
    if tlvs:
        _parse_v2(header)  # what is sent must parse: TLV values are checked alike
    return header


def _endpoint(address: Address, what: str) -> tuple[int, bytes, int]:
    """(family, packed address or 108-byte AF_UNIX field, port) of an address to encode."""
    if not isinstance(address, tuple) or len(address) < 2:
        raise TypeError(f"{what} must be a (host, port) tuple, not {address!r}")
    host, port = address[0], address[1]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ProxyProtocolError(f"{what} port must be an integer 0-65535, not {port!r}")
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        host = str(host)
    if not isinstance(host, str):
        raise TypeError(f"{what} host must be a string, not {host!r}")
    # inet_pton: strict (no leading zeros, no scope) and far cheaper than ipaddress.
    for family, af in ((_AF_INET, socket.AF_INET), (_AF_INET6, socket.AF_INET6)):
        try:
            return family, socket.inet_pton(af, host), port
        except (OSError, ValueError):
            pass
    if "%" in host and _is_ipv6(host.split("%", 1)[0]):
        raise ProxyProtocolError(f"{what} address {host!r}: a scope id cannot be carried")
    if port != 0:
        raise ProxyProtocolError(
            f"{what} host {host!r} is not an IP address (an AF_UNIX path needs port 0)"
        )
    return _AF_UNIX, _unix_field(host, what), 0


def _same_family(source: int, destination: int) -> None:
    if source != destination:
        raise ProxyProtocolError(
            f"source and destination must be of one family, not "
            f"{_family_name(source)} and {_family_name(destination)}"
        )


def _is_ipv6(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return False
    return True


def _unix_field(path: str, what: str) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH:
        raise ProxyProtocolError(f"{what} AF_UNIX path of {len(raw)} bytes (at most 108)")
    if b"\x00" in raw[1:] or (raw[:1] == b"\x00" and not raw[1:]):
        raise ProxyProtocolError(f"{what} AF_UNIX path {path!r}: NUL bytes inside")
    return raw.ljust(_UNIX_PATH, b"\x00")


def encode_ssl_tlv(client: int, verify: int, tlvs: dict[int, bytes] | None = None) -> bytes:
    """The value of a ``PP2_TYPE_SSL`` TLV (see :class:`SSLTLV`)."""
    if not 0 <= client <= 0xFF or not 0 <= verify <= 0xFFFFFFFF:
        raise ProxyProtocolError("SSL TLV: client must fit 8 bits and verify 32 bits")
    value = bytearray(struct.pack("!BI", client, verify))
    for kind, sub in (tlvs or {}).items():
        if not 0 <= kind <= 0xFF or len(sub) > 0xFFFF:
            raise ProxyProtocolError(f"SSL sub-TLV 0x{kind:02x}: bad type or length")
        value += struct.pack("!BH", kind, len(sub)) + bytes(sub)
    return bytes(value)
