"""securetcp.proxyproto: PROXY protocol v1/v2 parser and encoder.

Property-based tests (hypothesis) for round trips, prefixes and garbage;
example tests for the specification's examples and every malformed case;
and HAProxy itself (``send-proxy``/``send-proxy-v2`` with TLVs, checksum
and SSL facts) as a real sender, when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import HOST

from securetcp.proxyproto import (
    MAX_HEADER_LENGTH,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    crc32c,
    encode_proxy_header,
    encode_ssl_tlv,
    header_length_hint,
    parse_proxy_header,
    parse_ssl_tlv,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v2(ver_cmd: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header built by hand from the specification's layout."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, family, size) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BODY = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 443)


# -- the specification's examples ----------------------------------------------------


def test_v1_example_before_http() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    header, consumed = parse_proxy_header(data) or pytest.fail("incomplete")
    assert header == ProxyHeader(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), {})
    assert data[consumed:] == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (
            b"PROXY TCP6 "
            + b":".join([b"ffff"] * 8)
            + b" "
            + b":".join([b"ffff"] * 8)
            + b" 65535 65535\r\n",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
        (b"PROXY TCP6 2001:DB8::1 ::1 0 1\r\n", ("2001:db8::1", 0), ("::1", 1)),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", ("0.0.0.0", 0), ("10.0.0.1", 0)),
        # inet_ntop's form of an IPv4-mapped address (HAProxy's v1 sender writes it)
        (
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            ("::ffff:192.0.2.1", 1),  # hosts are written as inet_ntop (getpeername) does
            ("::1", 2),
        ),
        (b"PROXY UNKNOWN\r\n", None, None),
    ],
)
def test_v1_lines(line: bytes, source: Any, destination: Any) -> None:
    result = parse_proxy_header(line)
    assert result is not None
    header, consumed = result
    assert consumed == len(line)
    assert (header.version, header.command, header.tlvs) == (1, "PROXY", {})
    assert header.source == source and header.destination == destination


def test_v1_unknown_worst_case_is_107_bytes() -> None:
    ipv6 = b":".join([b"ffff"] * 8)
    line = b"PROXY UNKNOWN " + ipv6 + b" " + ipv6 + b" 65535 65535\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert parse_proxy_header(line + b"data") == (ProxyHeader(1, "PROXY", None, None), 107)
    # Whatever an UNKNOWN line holds before its CRLF is ignored.
    line = b"PROXY UNKNOWN \xff\x00 x  y\r\n"
    assert parse_proxy_header(line) == (ProxyHeader(1, "PROXY", None, None), len(line))


def test_v2_tcp4_by_hand() -> None:
    data = v2(0x21, 0x11, IPV4_BODY) + b"\x16\x03\x01"
    assert parse_proxy_header(data) == (
        ProxyHeader(2, "PROXY", ("192.0.2.1", 56324), ("198.51.100.7", 443), {}),
        28,
    )
    assert encode_proxy_header(("192.0.2.1", 56324), ("198.51.100.7", 443)) == data[:28]


def test_v2_tcp6_by_hand() -> None:
    body = socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(
        socket.AF_INET6, "::1"
    )
    data = v2(0x21, 0x21, body + struct.pack("!HH", 1, 2))
    assert parse_proxy_header(data) == (
        ProxyHeader(2, "PROXY", ("2001:db8::1", 1), ("::1", 2), {}),
        52,
    )


def test_v2_local() -> None:
    data = v2(0x20, 0x00, b"")
    assert data == encode_proxy_header(None, None)
    assert parse_proxy_header(data) == (ProxyHeader(2, "LOCAL", None, None, {}), 16)
    # LOCAL ignores the addresses (the family's block is skipped), TLVs still parse.
    data = v2(0x20, 0x11, IPV4_BODY + tlv(PP2_TYPE_NOOP, b"xy"))
    assert parse_proxy_header(data) == (
        ProxyHeader(2, "LOCAL", None, None, {PP2_TYPE_NOOP: b"xy"}),
        len(data),
    )


@pytest.mark.parametrize("family", [0x00, 0x10, 0x12, 0x20, 0x22, 0x30, 0x32])
def test_v2_unspec_and_dgram_fall_back_to_the_connection(family: int) -> None:
    size = {0: 0, 1: 12, 2: 36, 3: 216}[family >> 4]
    data = v2(0x21, family, b"\x01" * size + tlv(PP2_TYPE_ALPN, b"h2"))
    assert parse_proxy_header(data) == (
        ProxyHeader(2, "PROXY", None, None, {PP2_TYPE_ALPN: b"h2"}),
        len(data),
    )


def test_v2_unix() -> None:
    body = b"/run/client.sock".ljust(108, b"\0") + b"".ljust(108, b"\0")
    header, consumed = parse_proxy_header(v2(0x21, 0x31, body)) or pytest.fail("incomplete")
    assert (header.source, header.destination, consumed) == (("/run/client.sock", 0), ("", 0), 232)
    abstract = encode_proxy_header(("\0name", 0), ("/a b", 0))
    assert parse_proxy_header(abstract) == (
        ProxyHeader(2, "PROXY", ("\0name", 0), ("/a b", 0), {}),
        232,
    )


def test_v2_tlvs_and_checksum() -> None:
    tlvs = {
        PP2_TYPE_ALPN: b"h2",
        PP2_TYPE_AUTHORITY: "bücher.example".encode(),
        PP2_TYPE_UNIQUE_ID: b"u" * 128,
        PP2_TYPE_CRC32C: b"",
        PP2_TYPE_SSL: encode_ssl_tlv(
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
            0,
            {PP2_SUBTYPE_SSL_VERSION: b"TLSv1.3", PP2_SUBTYPE_SSL_CN: b"client"},
        ),
        0xE0: b"",
    }
    data = encode_proxy_header(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tlvs)
    header, consumed = parse_proxy_header(data) or pytest.fail("incomplete")
    assert consumed == len(data)
    checksum = header.tlvs[PP2_TYPE_CRC32C]
    assert len(checksum) == 4
    assert {**header.tlvs, PP2_TYPE_CRC32C: b""} == tlvs
    ssl_info = parse_ssl_tlv(header.tlvs[PP2_TYPE_SSL])
    assert ssl_info.client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN and ssl_info.verify == 0
    assert ssl_info.tlvs[PP2_SUBTYPE_SSL_CN] == b"client"
    # Every single-bit flip of the header is caught (by the checksum or the structure).
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        with contextlib.suppress(ProxyProtocolError):
            result = parse_proxy_header(bytes(flipped))
            assert result is None or result[0] != header, f"flip at {index} unnoticed"


def test_crc32c_known_values() -> None:
    # RFC 3720 B.4 test vectors and the usual check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"5678", crc32c(b"1234")) == crc32c(b"12345678")


def test_noop_padding_is_joined() -> None:
    data = v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_NOOP, b"a") + tlv(PP2_TYPE_NOOP, b"bc"))
    header, _ = parse_proxy_header(data) or pytest.fail("incomplete")
    assert header.tlvs == {PP2_TYPE_NOOP: b"abc"}


def test_bytes_like_input() -> None:
    data = encode_proxy_header(("192.0.2.1", 1), ("192.0.2.2", 2))
    for form in (bytearray(data), memoryview(data)):
        assert parse_proxy_header(form) == parse_proxy_header(data)
    for wrong in ("PROXY UNKNOWN\r\n", None, 5, [1, 2]):
        with pytest.raises(TypeError):
            parse_proxy_header(wrong)  # type: ignore[arg-type]


# -- malformed headers ---------------------------------------------------------------

MALFORMED = {
    # signatures
    "tls_client_hello": b"\x16\x03\x01\x02\x00\x01",
    "http": b"GET / HTTP/1.1\r\n",
    "v1_bad_prefix": b"PROXZ",
    "v1_no_space": b"PROXYTCP4",
    "v2_bad_signature": b"\r\n\r\n\x00\r\nQUIX\n",
    "v2_signature_then_v1": b"\r\nPROXY",
    # v1 line ends
    "v1_too_long": b"PROXY UNKNOWN " + b"x" * 100,
    "v1_bare_lf": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
    "v1_bare_cr": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX",
    "v1_cr_inside": b"PROXY UNKNOWN a\rb\r\n",
    # v1 fields
    "v1_unknown_protocol": b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_unknown_protocol_prefix": b"PROXY TCP5",
    "v1_unknown_glued": b"PROXY UNKNOWNx\r\n",
    "v1_lowercase": b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_double_space": b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_double_space_early": b"PROXY  TCP4",
    "v1_trailing_space": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
    "v1_missing_port": b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
    "v1_no_fields": b"PROXY TCP4\r\n",
    "v1_extra_field": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
    "v1_tab": b"PROXY TCP4\t192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_ipv4_leading_zero": b"PROXY TCP4 192.0.02.1 192.0.2.2 1 2\r\n",
    "v1_ipv4_octet_256": b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n",
    "v1_ipv4_three_octets": b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
    "v1_ipv6_in_tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1_ipv4_in_tcp6": b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_ipv6_bad": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "v1_ipv6_scope": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1_ipv6_too_long_field": b"PROXY TCP6 " + b"1" * 46,
    "v1_hostname": b"PROXY TCP4 localhost 192.0.2.2 1 2\r\n",
    "v1_port_leading_zero": b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
    "v1_port_too_big": b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
    "v1_port_sign": b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
    "v1_port_negative": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 -2\r\n",
    "v1_port_six_digits": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 100000",
    "v1_non_ascii": b"PROXY TCP4 192.0.2.\xd9\xa1 192.0.2.2 1 2\r\n",
    # v2 fixed part
    "v2_version_1": v2(0x11, 0x11, IPV4_BODY),
    "v2_version_3": v2(0x31, 0x11, IPV4_BODY),
    "v2_command_2": v2(0x22, 0x11, IPV4_BODY),
    "v2_command_f": v2(0x2F, 0x11, IPV4_BODY),
    "v2_family_4": v2(0x21, 0x41, IPV4_BODY),
    "v2_transport_3": v2(0x21, 0x13, IPV4_BODY),
    "v2_length_short_ipv4": v2(0x21, 0x11, IPV4_BODY[:11]),
    "v2_length_short_ipv6": v2(0x21, 0x21, bytes(35)),
    "v2_length_short_unix": v2(0x21, 0x31, bytes(215)),
    "v2_local_length_short": v2(0x20, 0x11, bytes(4)),
    # v2 TLVs
    "v2_tlv_truncated_header": v2(0x21, 0x11, IPV4_BODY + b"\x01\x00"),
    "v2_tlv_one_byte": v2(0x21, 0x11, IPV4_BODY + b"\x01"),
    "v2_tlv_truncated_value": v2(0x21, 0x11, IPV4_BODY + b"\x01\x00\x05abc"),
    "v2_tlv_duplicate": v2(0x21, 0x11, IPV4_BODY + tlv(1, b"h2") + tlv(1, b"h2")),
    "v2_crc_mismatch": v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_CRC32C, b"\0\0\0\1")),
    "v2_crc_wrong_size": v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_CRC32C, b"\0\0\0")),
    "v2_unique_id_too_long": v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129)),
    "v2_authority_not_utf8": v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_AUTHORITY, b"\xff")),
    "v2_ssl_short": v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_SSL, b"\x01\0\0\0")),
    "v2_ssl_truncated_sub_tlv": v2(
        0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0" + b"\x21\x00\x07TLS")
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(data)
    assert str(info.value)
    with pytest.raises(ProxyProtocolError):
        header_length_hint(data)
    # More data never makes a malformed header acceptable.
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data + b"\r\n" + bytes(300))


@pytest.mark.parametrize(
    "prefix",
    [b"\x16", b"G", b"PROXY TCP4 a", b"PROXY TCP4 1.2.3.4 ::", b"\r\n\r\n\x00\r\nQUIT\n\x21\x41"],
)
def test_garbage_is_refused_before_a_whole_header_arrives(prefix: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(prefix)


def test_a_valid_v2_length_waits_for_the_whole_body() -> None:
    data = v2(0x21, 0x11, IPV4_BODY + tlv(PP2_TYPE_ALPN, b"h2"))
    assert parse_proxy_header(data[:20]) is None
    assert header_length_hint(data[:20]) == len(data)
    assert header_length_hint(data[:15]) == 16


# -- encoding errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "options", "error"),
    [
        (("192.0.2.1", 1), ("::1", 2), {}, ProxyProtocolError),
        (("192.0.2.1", 1), None, {}, ProxyProtocolError),
        (None, ("192.0.2.1", 1), {}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"version": 3}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"version": 1, "tlvs": {1: b"x"}}, ProxyProtocolError),
        (("/run/a", 0), ("/run/b", 0), {"version": 1}, ProxyProtocolError),
        (("192.0.2.1", 65536), ("192.0.2.2", 2), {}, ProxyProtocolError),
        (("192.0.2.1", -1), ("192.0.2.2", 2), {}, ProxyProtocolError),
        (("192.0.2.1", True), ("192.0.2.2", 2), {}, ProxyProtocolError),
        (("example.com", 443), ("192.0.2.2", 2), {}, ProxyProtocolError),
        (("/" + "x" * 108, 0), ("/b", 0), {}, ProxyProtocolError),
        (("/a\0b", 0), ("/b", 0), {}, ProxyProtocolError),
        (("fe80::1%eth0", 1), ("fe80::2", 2), {}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"tlvs": {256: b""}}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"tlvs": {5: b"u" * 129}}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"tlvs": {1: b"x" * 65536}}, ProxyProtocolError),
        (("192.0.2.1", 1), ("192.0.2.2", 2), {"tlvs": {1: "h2"}}, TypeError),
        ("192.0.2.1:1", ("192.0.2.2", 2), {}, TypeError),
        ((b"192.0.2.1", 1), ("192.0.2.2", 2), {}, TypeError),
    ],
)
def test_encode_errors(source: Any, destination: Any, options: Any, error: type) -> None:
    with pytest.raises(error):
        encode_proxy_header(source, destination, **options)


def test_encode_accepts_sockaddr_tuples() -> None:
    # getpeername() of an IPv6 socket gives (host, port, flowinfo, scope_id).
    data = encode_proxy_header(("::1", 1, 0, 0), ("::1", 2, 0, 0), version=1)  # type: ignore[arg-type]
    assert data == b"PROXY TCP6 ::1 ::1 1 2\r\n"


def test_v1_ipv4_mapped_is_written_in_hex() -> None:
    data = encode_proxy_header(("::ffff:192.0.2.1", 1), ("::1", 2), version=1)
    assert b"." not in data
    assert parse_proxy_header(data) is not None


# -- properties ----------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
no_nul = st.binary(max_size=108).map(lambda b: b.replace(b"\0", b"/"))
unix_paths = st.one_of(
    no_nul,  # "" (unnamed) included
    no_nul.filter(lambda b: 0 < len(b) < 108).map(lambda b: b"\0" + b),  # abstract
).map(os.fsdecode)


@st.composite
def endpoints(draw: st.DrawFn, version: int) -> tuple[Any, Any]:
    kinds = ["none", "ipv4", "ipv6"] + (["unix"] if version == 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None, None
    if kind == "unix":
        return (draw(unix_paths), 0), (draw(unix_paths), 0)
    hosts = ipv4 if kind == "ipv4" else ipv6
    return (draw(hosts), draw(ports)), (draw(hosts), draw(ports))


plain_tlv_types = st.integers(0, 255).filter(
    lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL)
)
special_tlvs = st.fixed_dictionaries(
    {},
    optional={
        PP2_TYPE_CRC32C: st.just(b""),
        PP2_TYPE_AUTHORITY: st.text(max_size=20).map(str.encode),
        PP2_TYPE_UNIQUE_ID: st.binary(max_size=128),
        PP2_TYPE_SSL: st.builds(
            encode_ssl_tlv,
            st.integers(0, 255),
            st.integers(0, 0xFFFFFFFF),
            st.dictionaries(st.integers(0, 255), st.binary(max_size=20), max_size=3),
        ),
    },
)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """(encoded header, the header parsing must give back)."""
    version = draw(st.sampled_from([1, 2]))
    source, destination = draw(endpoints(version))
    tlvs: dict[int, bytes] = {}
    if version == 2:
        tlvs = draw(st.dictionaries(plain_tlv_types, st.binary(max_size=80), max_size=4))
        tlvs.update(draw(special_tlvs))
    data = encode_proxy_header(source, destination, version=version, tlvs=tlvs)

    def normal(address: Any) -> Any:
        if address is None or not _is_ip(address[0]):
            return address  # None, or an AF_UNIX path
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        return (socket.inet_ntop(family, socket.inet_pton(family, address[0])), address[1])

    command = "PROXY" if version == 1 or source is not None else "LOCAL"
    expected = ProxyHeader(version, command, normal(source), normal(destination), tlvs)
    return data, expected


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _crc_of(data: bytes) -> bytes:
    """The CRC32C TLV value `data` must carry: computed by hand over the header
    with the TLV's value zeroed (TLVs walked from the end of the addresses)."""
    offset = 16 + {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}[data[13]]
    while data[offset] != PP2_TYPE_CRC32C:
        offset += 3 + int.from_bytes(data[offset + 1 : offset + 3], "big")
    zeroed = data[: offset + 3] + bytes(4) + data[offset + 7 :]
    return crc32c(zeroed).to_bytes(4, "big")


@FAST
@given(headers(), st.binary(max_size=64))
def test_round_trip(case: tuple[bytes, ProxyHeader], trailing: bytes) -> None:
    data, expected = case
    if PP2_TYPE_CRC32C in expected.tlvs:
        expected = ProxyHeader(
            expected.version,
            expected.command,
            expected.source,
            expected.destination,
            {**expected.tlvs, PP2_TYPE_CRC32C: _crc_of(data)},
        )
    assert parse_proxy_header(data + trailing) == (expected, len(data))
    assert header_length_hint(data + trailing) == len(data)
    # Encoding what was parsed gives the same bytes back.
    assert (
        encode_proxy_header(
            expected.source, expected.destination, version=expected.version, tlvs=expected.tlvs
        )
        == data
    )


@FAST
@given(headers())
def test_every_strict_prefix_asks_for_more(case: tuple[bytes, ProxyHeader]) -> None:
    data, _ = case
    for end in range(len(data)):
        prefix = data[:end]
        assert parse_proxy_header(prefix) is None, f"prefix of {end} bytes"
        hint = header_length_hint(prefix)
        assert end < hint <= len(data), f"hint {hint} for a prefix of {end} of {len(data)}"


@FAST
@given(headers(), st.binary(min_size=1, max_size=64))
def test_reading_by_hints_takes_the_header_alone(
    case: tuple[bytes, ProxyHeader], trailing: bytes
) -> None:
    data, _ = case
    stream = data + trailing
    buffer = b""
    while (result := parse_proxy_header(buffer)) is None:
        wanted = header_length_hint(buffer) - len(buffer)
        buffer += stream[len(buffer) : len(buffer) + wanted]
    assert result[1] == len(data) == len(buffer)


def _only_protocol_errors(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError as e:
        assert str(e)
        with pytest.raises(ProxyProtocolError):
            header_length_hint(data)
        return
    hint = header_length_hint(data)
    if result is None:
        assert len(data) < hint <= MAX_HEADER_LENGTH
    else:
        assert result[1] == hint <= len(data)


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _only_protocol_errors(data)


@FAST
@given(
    st.sampled_from([V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x20", b"PROXY ", b"PROXY TCP4 "]),
    st.binary(max_size=300),
)
def test_random_bytes_after_a_signature(prefix: bytes, data: bytes) -> None:
    _only_protocol_errors(prefix + data)


@FAST
@given(headers(), st.data())
def test_mutated_headers_raise_only_protocol_errors(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    raw = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        index = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if action == "flip" and raw:
            raw[index] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            raw[index:index] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and raw:
            del raw[index]
        else:
            del raw[index:]
    _only_protocol_errors(bytes(raw))


# -- HAProxy as the sender -------------------------------------------------------------

HAPROXY = shutil.which("haproxy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def haproxy(config: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    assert HAPROXY is not None
    log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def receive_through_haproxy(
    tmp_path: Path, server_line: str, bind_options: str, client: Any
) -> tuple[ProxyHeader, bytes, tuple[str, int], int]:
    """Start HAProxy in front of a listener; return what the listener got."""
    loop = asyncio.get_running_loop()
    front = free_port()
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(8)
        listener.setblocking(False)
        back = listener.getsockname()[1]
        config = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind {HOST}:{front} {bind_options}
    unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt
    default_backend back
backend back
    server upstream {HOST}:{back} {server_line}
"""
        with haproxy(config, tmp_path) as proc:

            async def connected() -> socket.socket | None:
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (HOST, front))
                except OSError:
                    sock.close()
                    return None
                return sock

            sock: socket.socket | None = None

            async def try_connect() -> bool:
                nonlocal sock
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                sock = await connected()
                return sock is not None

            deadline = loop.time() + 15
            while not await try_connect():
                assert loop.time() < deadline, "HAProxy did not start listening"
                await asyncio.sleep(0.02)
            assert sock is not None
            with sock:
                client_address = sock.getsockname()[:2]
                sender = asyncio.ensure_future(client(sock))
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
                with conn:
                    buffer = b""
                    while (result := parse_proxy_header(buffer)) is None:
                        want = header_length_hint(buffer) - len(buffer)
                        chunk = await asyncio.wait_for(loop.sock_recv(conn, want), 10)
                        assert chunk, "HAProxy closed before the whole header"
                        buffer += chunk
                    header, consumed = result
                    assert consumed == len(buffer)  # nothing past the header was read
                    rest = b""
                    while len(rest) < 5:
                        chunk = await asyncio.wait_for(loop.sock_recv(conn, 64), 10)
                        if not chunk:
                            break
                        rest += chunk
                await asyncio.wait_for(sender, 10)
    return header, rest, client_address, front


async def send_hello(sock: socket.socket) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, b"hello")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_plain(option: str, tmp_path: Path) -> None:
    server_line = option + (" proxy-v2-options crc32c,unique-id" if option.endswith("v2") else "")
    header, rest, client, front = await receive_through_haproxy(
        tmp_path, server_line, "", send_hello
    )
    assert rest == b"hello"
    assert header.version == (2 if option.endswith("v2") else 1)
    assert header.command == "PROXY"
    assert header.source == client
    assert header.destination == (HOST, front)
    if header.version == 2:
        assert len(header.tlvs[PP2_TYPE_CRC32C]) == 4  # and it verified
        assert header.tlvs[PP2_TYPE_UNIQUE_ID]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
async def test_haproxy_tls_facts(pki: PKI, tmp_path: Path) -> None:
    bundle = tmp_path / "server-bundle.pem"
    bundle.write_bytes(pki.cert_file.read_bytes() + pki.key_file.read_bytes())
    bind = f"ssl crt {bundle} ca-file {pki.ca_file} verify optional alpn h2,http/1.1"
    server_line = "send-proxy-v2 proxy-v2-options ssl,cert-cn,ssl-cipher,authority,crc32c"
    context = pki.client_context(with_client_cert=True)
    context.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()

    async def tls_hello(sock: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(sock, outgoing.read())
                data = await loop.sock_recv(sock, 65536)
                assert data, "HAProxy closed during the handshake"
                incoming.write(data)
        tls.write(b"hello")
        await loop.sock_sendall(sock, outgoing.read())

    header, rest, client, front = await receive_through_haproxy(
        tmp_path, server_line, bind, tls_hello
    )
    assert rest == b"hello"  # decrypted by HAProxy
    assert header.source == client and header.destination == (HOST, front)
    assert header.tlvs[PP2_TYPE_AUTHORITY] == b"localhost"
    info = parse_ssl_tlv(header.tlvs[PP2_TYPE_SSL])
    assert info.client & PP2_CLIENT_SSL and info.client & PP2_CLIENT_CERT_CONN
    assert info.verify == 0
    assert info.tlvs[PP2_SUBTYPE_SSL_CN] == b"test-client"
    assert info.tlvs[PP2_SUBTYPE_SSL_VERSION].startswith(b"TLSv1.")
    assert info.tlvs[PP2_SUBTYPE_SSL_CIPHER]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("version", [1, 2])
async def test_haproxy_accepts_what_we_encode(version: int, tmp_path: Path) -> None:
    # HAProxy reads our header (accept-proxy; it checks the CRC32C) and tells
    # the listener behind it, in its own v2 header, the addresses we sent.
    tlvs = {PP2_TYPE_CRC32C: b"", PP2_TYPE_AUTHORITY: b"example.org"} if version == 2 else None
    ours = encode_proxy_header(
        ("203.0.113.7", 4242), ("198.51.100.1", 443), version=version, tlvs=tlvs
    )

    async def send_header(sock: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, ours + b"hello")

    header, rest, _, _ = await receive_through_haproxy(
        tmp_path, "send-proxy-v2 proxy-v2-options authority,crc32c", "accept-proxy", send_header
    )
    assert rest == b"hello"
    assert header.source == ("203.0.113.7", 4242)
    assert header.destination == ("198.51.100.1", 443)
    if version == 2:
        assert header.tlvs[PP2_TYPE_AUTHORITY] == b"example.org"


def test_unix_paths_with_percent_and_colon_are_not_scoped_ipv6() -> None:
    """Found by hypothesis on 3.10: '%:' is a unix path, not an IPv6 scope id."""
    data = encode_proxy_header(("%:", 0), ("/run/a%b:c", 0))
    parsed = parse_proxy_header(data)
    assert parsed is not None
    header, consumed = parsed
    assert (header.source, header.destination, consumed) == (
        ("%:", 0),
        ("/run/a%b:c", 0),
        len(data),
    )
    with pytest.raises(ProxyProtocolError, match="scope id"):
        encode_proxy_header(("fe80::1%eth0", 1), ("::1", 2))
