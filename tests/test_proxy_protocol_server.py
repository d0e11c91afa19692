"""TCPServer(proxy_protocol=True): the header before TLS, its source as the
address, untrusted sources and bad headers refused and counted."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Any

import pytest
from conftest import PKI
from servers import HOST, EchoServer, raw_connect, read_to_eof, serving, until

from securetcp import TCPServer
from securetcp.proxyproto import encode_proxy_header

CLIENT = ("203.0.113.7", 40123)
SERVER = ("198.51.100.1", 443)


async def tls_over(sock: socket.socket, context: ssl.SSLContext) -> tuple[Any, Any]:
    """An asyncio TLS client on a socket that already sent its PROXY header."""
    return await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost"), 10
    )


@pytest.mark.parametrize("version", [1, 2])
async def test_header_then_tls_gives_the_real_client_address(
    version: int, pki: PKI, no_fd_leak: None
) -> None:
    server = EchoServer(pki.ssl_options(), proxy_protocol=True)
    async with serving(server) as port:
        sock = await raw_connect(port)
        # The header and the ClientHello may share a segment: the server must
        # take no byte past the header.
        sock.send(encode_proxy_header(CLIENT, SERVER, version=version))
        reader, writer = await tls_over(sock, pki.client_context())
        writer.write(b"through a load balancer")
        assert await asyncio.wait_for(reader.readexactly(23), 5) == b"through a load balancer"
        writer.close()
        await until(lambda: server.stats.active == 0)
    assert server.addresses == [CLIENT]
    (stream,) = server.streams
    assert stream.proxy_header is not None
    assert stream.proxy_header.version == version
    assert stream.proxy_header.destination == SERVER
    assert server.stats.handshakes == 1 and server.stats.failures == {}


async def test_header_and_client_hello_in_one_segment(pki: PKI, no_fd_leak: None) -> None:
    """The ClientHello right behind the header, in the same send: intact for TLS."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    server = EchoServer(pki.ssl_options(), proxy_protocol=True)
    async with serving(server) as port:
        sock = await raw_connect(port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, encode_proxy_header(CLIENT, SERVER) + hello)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert reply[:1] == b"\x16"  # a ServerHello record: the hello arrived whole
        sock.close()
        await until(lambda: server.stats.active == 0)
    assert server.stats.failures.get("proxy_protocol", 0) == 0


async def test_plain_tcp_with_header_and_local_command(no_fd_leak: None) -> None:
    server = EchoServer(proxy_protocol=True)
    async with serving(server) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(encode_proxy_header(None, None) + b"health check")  # LOCAL
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"health check"
        writer.close()
        await until(lambda: server.stats.active == 0)
    (address,) = server.addresses
    assert address[0] == HOST  # LOCAL: the socket's own peer
    assert server.streams[0].proxy_header is not None
    assert server.streams[0].proxy_header.command == "LOCAL"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00", "proxy_protocol"),  # TLS without a header
        (b"GET / HTTP/1.1\r\n\r\n", "proxy_protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "proxy_protocol"),  # bad port
        (b"PROXY TCP4 1.2.3.4", "eof"),  # closed before the header ended
    ],
)
async def test_missing_or_malformed_header_is_closed_and_counted(
    payload: bytes, reason: str, pki: PKI, no_fd_leak: None
) -> None:
    server = EchoServer(pki.ssl_options(), proxy_protocol=True)
    async with serving(server) as port:
        sock = await raw_connect(port)
        try:
            sock.send(payload)
            if reason == "eof":
                sock.shutdown(socket.SHUT_WR)
            assert await read_to_eof(sock) == b""
        finally:
            sock.close()
        await until(lambda: server.stats.active == 0)
    assert server.stats.failures == {reason: 1}
    assert server.streams == []


async def test_header_timeout(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options(), proxy_protocol=True, handshake_timeout=0.3)
    async with serving(server) as port:
        sock = await raw_connect(port)
        try:
            sock.send(b"PROXY ")  # and nothing more
            assert await read_to_eof(sock) == b""
        finally:
            sock.close()
    assert server.stats.failures == {"timeout": 1}


async def test_untrusted_source_is_closed_unread(pki: PKI, no_fd_leak: None) -> None:
    server = EchoServer(pki.ssl_options(), proxy_protocol=True, trusted_proxies=["10.0.0.0/8"])
    async with serving(server) as port:
        sock = await raw_connect(port)
        try:
            sock.send(encode_proxy_header(CLIENT, SERVER))
            assert await read_to_eof(sock) == b""
        finally:
            sock.close()
        await until(lambda: server.stats.active == 0)
    assert server.stats.failures == {"untrusted_proxy": 1}
    assert server.stats.rejected == 1


async def test_trusted_networks_accept_ipv6_and_objects(pki: PKI, no_fd_leak: None) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    trusted = [ipaddress.ip_network("::1/128"), "192.0.2.0/24"]
    server = EchoServer(pki.ssl_options(), proxy_protocol=True, trusted_proxies=trusted)
    async with serving(server, "::1") as port:
        sock = await raw_connect(port, "::1")
        sock.send(encode_proxy_header(("2001:db8::5", 5555), ("2001:db8::1", 443)))
        reader, writer = await tls_over(sock, pki.client_context())
        writer.write(b"v6")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"v6"
        writer.close()
        await until(lambda: server.stats.active == 0)
    assert server.addresses == [("2001:db8::5", 5555)]


def test_trusted_proxies_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="trusted_proxies: 'nonsense'"):
        TCPServer(proxy_protocol=True, trusted_proxies=["nonsense"])


async def test_connections_without_proxy_protocol_have_no_header(
    pki: PKI, no_fd_leak: None
) -> None:
    server = EchoServer(pki.ssl_options())
    async with serving(server) as port:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                HOST, port, ssl=pki.client_context(), server_hostname="localhost"
            ),
            10,
        )
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        writer.close()
        await until(lambda: server.stats.active == 0)
    assert server.streams[0].proxy_header is None
