"""securetcp.client: connect() and client_context() against real servers on loopback.

The servers are securetcp TCPServers (tests/servers.py's EchoServer) with
the session trustme PKI, or bare listening sockets for the failure cases.
Nothing leaves loopback: the certifi default is checked on the context
itself, and the "not trusted" cases connect to our own trustme server.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import shutil
import socket
import ssl
from pathlib import Path

import certifi
import pytest
import trustme
from conftest import PKI, open_fds
from cryptography.hazmat.primitives import serialization
from servers import HOST, EchoServer, server_process, serving, until, wait_for_text

from securetcp.client import client_context, connect
from securetcp.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError
from securetcp.tls import SSLOptionsError, TLSConfig

PING = b"ping\n"
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_HOSTNAME_MISMATCH = 62


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def echo(stream: IOStream, payload: bytes = PING) -> bytes:
    await stream.write(payload)
    return await asyncio.wait_for(stream.read_bytes(len(payload)), 5)


def tls_server(pki: PKI, **config: object) -> EchoServer:
    return EchoServer(TLSConfig(str(pki.cert_file), str(pki.key_file), **config))  # type: ignore[arg-type]


# -- connecting --------------------------------------------------------------------


async def test_plain_echo_with_nodelay(no_fd_leak: None) -> None:
    async with serving(EchoServer()) as port:
        stream = await connect(HOST, port)
        try:
            assert type(stream) is IOStream
            assert await echo(stream) == PING
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            stream.close()


async def test_tls_echo_has_every_tls_fact(pki: PKI, no_fd_leak: None) -> None:
    server = tls_server(pki)
    async with serving(server) as port:
        context = client_context(pki.ca_file)
        stream = await connect(HOST, port, ssl=context, server_hostname="localhost")
        try:
            assert isinstance(stream, SSLIOStream)
            assert stream.handshake_done
            assert await echo(stream) == PING
            assert stream.tls_version in ("TLSv1.2", "TLSv1.3")
            assert stream.cipher is not None and stream.cipher[0]
            assert stream.peer_certificate is not None
            assert ("DNS", "localhost") in stream.peer_certificate["subjectAltName"]
            identity = stream.peer_identity
            assert identity is not None and "localhost" in identity.dns_names
            assert stream.selected_alpn_protocol() is None
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            stream.close()


async def test_server_hostname_defaults_to_host(pki: PKI, no_fd_leak: None) -> None:
    # The certificate covers the IP address 127.0.0.1 too.
    async with serving(tls_server(pki)) as port:
        stream = await connect(HOST, port, ssl=client_context(pki.ca_file))
        try:
            assert await echo(stream) == PING
        finally:
            stream.close()


async def test_by_name_tries_each_address(pki: PKI, no_fd_leak: None) -> None:
    # "localhost" may resolve to ::1 first; the server is on 127.0.0.1 only,
    # so a refused ::1 is passed over. The name is also the SNI and checked name.
    async with serving(tls_server(pki)) as port:
        stream = await connect("localhost", port, ssl=client_context(pki.ca_file))
        try:
            assert await echo(stream) == PING
            assert stream.socket.getpeername()[0] == HOST
        finally:
            stream.close()


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
async def test_ipv6(pki: PKI, no_fd_leak: None) -> None:
    async with serving(tls_server(pki), "::1") as port:
        stream = await connect("::1", port, ssl=client_context(pki.ca_file))
        try:
            assert await echo(stream) == PING
            assert stream.socket.family == socket.AF_INET6
        finally:
            stream.close()


async def test_source_address(no_fd_leak: None) -> None:
    server = EchoServer()
    async with serving(server) as port:
        stream = await connect(HOST, port, source_address=("127.0.0.2", 0))
        try:
            assert await echo(stream) == PING
            assert stream.socket.getsockname()[0] == "127.0.0.2"
            await until(lambda: server.addresses, message="the server's handler")
            assert server.addresses[0][0] == "127.0.0.2"
        finally:
            stream.close()


async def test_source_address_that_is_not_ours(no_fd_leak: None) -> None:
    async with serving(EchoServer()) as port:
        with pytest.raises(ConnectionError) as info:
            # TEST-NET-1 is nobody's local address: bind() fails, nothing is sent.
            await connect(HOST, port, source_address=("192.0.2.1", 0), timeout=None)
        message = str(info.value)
        assert f"{HOST}:{port}" in message and "192.0.2.1" in message
        assert "cannot bind" in message


async def test_max_buffer_size_is_passed_on(no_fd_leak: None) -> None:
    async with serving(EchoServer()) as port:
        stream = await connect(HOST, port, max_buffer_size=16)
        await stream.write(b"x" * 17)
        with pytest.raises(StreamBufferFullError):
            await asyncio.wait_for(stream.read_until(b"\n"), 5)
        assert stream.closed()


async def test_mutual_tls(pki: PKI, no_fd_leak: None) -> None:
    server = tls_server(pki, client_auth="required", client_ca=str(pki.ca_file))
    async with serving(server) as port:
        context = client_context(
            pki.ca_file, certfile=pki.client_cert_file, keyfile=pki.client_key_file
        )
        stream = await connect(HOST, port, ssl=context, server_hostname="localhost")
        try:
            assert await echo(stream) == PING
            await until(lambda: server.streams, message="the server's handler")
            seen = server.streams[0]
            assert isinstance(seen, SSLIOStream)
            assert seen.peer_identity is not None
            assert seen.peer_identity.common_name == "test-client"
        finally:
            stream.close()


async def test_mutual_tls_key_in_certfile(pki: PKI, tmp_path: Path, no_fd_leak: None) -> None:
    combined = tmp_path / "client-combined.pem"
    combined.write_bytes(pki.client_cert_file.read_bytes() + pki.client_key_file.read_bytes())
    server = tls_server(pki, client_auth="required", client_ca=str(pki.ca_file))
    async with serving(server) as port:
        stream = await connect(HOST, port, ssl=client_context(pki.ca_file, certfile=combined))
        try:
            assert await echo(stream) == PING
        finally:
            stream.close()


async def test_missing_client_certificate_tls12_fails_at_connect(
    pki: PKI, no_fd_leak: None
) -> None:
    server = tls_server(pki, client_auth="required", client_ca=str(pki.ca_file))
    async with serving(server) as port:
        context = client_context(pki.ca_file)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError) as info:
            await connect(HOST, port, ssl=context, timeout=5)
        assert f"{HOST}:{port}" in str(info.value)
        await until(lambda: server.stats.failures.get("certificate"), message="the count")


async def test_missing_client_certificate_tls13_fails_on_read(pki: PKI, no_fd_leak: None) -> None:
    # TLS 1.3: the client's handshake ends before the server checks for a
    # certificate; the refusal arrives as an alert on the first read.
    server = tls_server(pki, client_auth="required", client_ca=str(pki.ca_file))
    async with serving(server) as port:
        stream = await connect(HOST, port, ssl=client_context(pki.ca_file, profile="modern"))
        try:
            assert stream.tls_version == "TLSv1.3"
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(stream.read_bytes(1), 5)
        finally:
            stream.close()


async def test_alpn(pki: PKI, no_fd_leak: None) -> None:
    async with serving(tls_server(pki, alpn_protocols=["h2", "http/1.1"])) as port:
        context = client_context(pki.ca_file, alpn_protocols=["http/1.1"])
        stream = await connect(HOST, port, ssl=context)
        try:
            assert isinstance(stream, SSLIOStream)
            assert stream.selected_alpn_protocol() == "http/1.1"
        finally:
            stream.close()


async def test_modern_profile_is_tls13_only(pki: PKI, no_fd_leak: None) -> None:
    async with serving(tls_server(pki)) as port:
        stream = await connect(HOST, port, ssl=client_context(pki.ca_file, profile="modern"))
        try:
            assert isinstance(stream, SSLIOStream)
            assert stream.tls_version == "TLSv1.3"
        finally:
            stream.close()
    # Against a server that stops at TLS 1.2, the modern client refuses.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.cert_file, pki.key_file)
    server_context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serving(EchoServer(server_context)) as port:
        with pytest.raises(ssl.SSLError) as info:
            await connect(HOST, port, ssl=client_context(pki.ca_file, profile="modern"))
        assert f"{HOST}:{port}" in str(info.value)
        assert not isinstance(info.value, ssl.SSLCertVerificationError)


def test_intermediate_profile_is_tls12_or_later(pki: PKI) -> None:
    context = client_context(pki.ca_file)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    suites = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all(name.startswith("ECDHE-") for name in suites)
    assert client_context(pki.ca_file, profile="modern").minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_against_openssl_s_server(pki: PKI, tmp_path: Path, no_fd_leak: None) -> None:
    # An independent TLS server: mutual TLS required, ALPN, TLS 1.3; -rev
    # answers each line reversed. It picks its port and prints it.
    command = [
        "openssl", "s_server", "-accept", f"{HOST}:0", "-naccept", "1", "-rev",
        "-cert", str(pki.cert_file), "-key", str(pki.key_file),
        "-Verify", "1", "-CAfile", str(pki.ca_file), "-alpn", "h2", "-tls1_3",
    ]  # fmt: skip
    with server_process(command, tmp_path) as (proc, out, _):
        accept = await asyncio.to_thread(wait_for_text, out, r"ACCEPT .*:(\d+)\n", proc)
        port = int(accept.group(1))
        context = client_context(
            pki.ca_file,
            certfile=pki.client_cert_file,
            keyfile=pki.client_key_file,
            alpn_protocols=["h2"],
        )
        stream = await connect(HOST, port, ssl=context, server_hostname="localhost")
        try:
            assert isinstance(stream, SSLIOStream)
            assert stream.tls_version == "TLSv1.3"
            assert stream.selected_alpn_protocol() == "h2"
            await stream.write(b"hello\n")
            assert await asyncio.wait_for(stream.read_until(b"\n"), 5) == b"olleh\n"
        finally:
            stream.close()


# -- failures ------------------------------------------------------------------------


async def test_refused(no_fd_leak: None) -> None:
    with socket.socket() as bound:  # bound, not listening: the kernel answers RST
        bound.bind((HOST, 0))
        port = bound.getsockname()[1]
        with pytest.raises(ConnectionRefusedError) as info:
            await connect(HOST, port)
        assert f"{HOST}:{port}" in str(info.value)
        assert "refused" in str(info.value)
        assert info.value.errno == errno.ECONNREFUSED
        with pytest.raises(ConnectionRefusedError):
            await connect(HOST, port, ssl=True)


async def test_handshake_timeout(pki: PKI, no_fd_leak: None) -> None:
    # The kernel completes the TCP handshake; nobody ever answers the ClientHello.
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(TimeoutError) as info:
            await connect(HOST, port, ssl=client_context(pki.ca_file), timeout=0.2)
        message = str(info.value)
        assert f"{HOST}:{port}" in message and "TLS handshake" in message
        assert "timed out" in message


async def test_cancelled_connect_leaves_nothing_open(pki: PKI, no_fd_leak: None) -> None:
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        task = asyncio.ensure_future(connect(HOST, port, ssl=client_context(pki.ca_file)))
        accepted: list[socket.socket] = []
        silent.setblocking(False)

        def accept() -> bool:
            try:
                accepted.append(silent.accept()[0])
            except BlockingIOError:
                return False
            return True

        await until(accept, message="the client's TCP connection")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        accepted[0].close()


async def test_untrusted_certificate(pki: PKI, no_fd_leak: None) -> None:
    other = trustme.CA()
    other_ca = Path(pki.ca_file).with_name("other-ca.pem")
    other.cert_pem.write_to_path(str(other_ca))
    server = tls_server(pki)
    async with serving(server) as port:
        for context in (client_context(other_ca), client_context(), True):
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await connect(HOST, port, ssl=context, server_hostname="localhost")
            error = info.value
            assert error.verify_code == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
            assert error.verify_message
            assert f"{HOST}:{port}" in str(error)
            assert error.verify_message in str(error)
        await until(lambda: server.stats.failures.get("peer_alert"), message="the count")


async def test_hostname_mismatch(pki: PKI, no_fd_leak: None) -> None:
    async with serving(tls_server(pki)) as port:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await connect(
                HOST, port, ssl=client_context(pki.ca_file), server_hostname="example.com"
            )
        error = info.value
        assert error.verify_code == X509_V_ERR_HOSTNAME_MISMATCH
        assert f"{HOST}:{port}" in str(error)
        assert "example.com" in str(error)


async def test_server_closes_during_handshake(pki: PKI, no_fd_leak: None) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]

        async def close_after_client_hello() -> None:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                await loop.sock_recv(conn, 1)

        closer = asyncio.ensure_future(close_after_client_hello())
        with pytest.raises((ssl.SSLError, ConnectionError)) as info:
            await connect(HOST, port, ssl=client_context(pki.ca_file), timeout=5)
        await closer
        assert f"{HOST}:{port}" in str(info.value)
        assert not isinstance(info.value, ssl.SSLCertVerificationError)


async def test_plaintext_server(no_fd_leak: None, pki: PKI) -> None:
    async with serving(EchoServer()) as port:  # echoes our ClientHello back
        with pytest.raises(ssl.SSLError) as info:
            await connect(HOST, port, ssl=client_context(pki.ca_file), timeout=5)
        assert f"{HOST}:{port}" in str(info.value)


async def test_name_that_does_not_resolve(no_fd_leak: None) -> None:
    # .invalid never resolves (RFC 6761); the resolver says so without a connection.
    with pytest.raises(socket.gaierror) as info:
        await connect("no-such-host.invalid", 443, timeout=5)
    assert "no-such-host.invalid" in str(info.value)


async def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        await connect(HOST, 1, ssl="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await connect(HOST, 1, server_hostname="localhost")
    for port in (0, 65536, "443", True):
        with pytest.raises(ValueError):
            await connect(HOST, port)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await connect("", 443)
    with pytest.raises(ValueError):
        await connect(HOST, 443, timeout=0)


# -- client_context: files and options -----------------------------------------------


def test_default_trusts_certifi() -> None:
    context = client_context()
    expected = ssl.create_default_context(cafile=certifi.where()).cert_store_stats()["x509_ca"]
    assert expected > 0
    assert context.cert_store_stats()["x509_ca"] == expected


def test_cafile_directory(pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.ca_file.read_bytes())
    (tmp_path / "notes.txt").write_text("not a certificate")
    assert client_context(tmp_path).cert_store_stats()["x509_ca"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SSLOptionsError, match="no PEM certificate file in directory"):
        client_context(empty)


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("missing", "does not exist"),
        ("key_only", "no PEM certificate"),
    ],
)
def test_cafile_errors(pki: PKI, tmp_path: Path, which: str, expected: str) -> None:
    path = tmp_path / "ca.pem"
    if which == "key_only":
        path.write_bytes(pki.client_key_file.read_bytes())
    with pytest.raises(SSLOptionsError) as info:
        client_context(path)
    message = str(info.value)
    assert message.startswith("client_context cafile:")
    assert str(path) in message and expected in message


def test_client_certificate_errors(pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(SSLOptionsError, match=r"client_context certfile: .*does not exist"):
        client_context(pki.ca_file, certfile=missing)
    with pytest.raises(SSLOptionsError, match=r"client_context keyfile: .*does not exist"):
        client_context(pki.ca_file, certfile=pki.client_cert_file, keyfile=missing)
    with pytest.raises(SSLOptionsError, match=r"client_context certfile: .*no PEM certificate"):
        client_context(pki.ca_file, certfile=pki.client_key_file)
    with pytest.raises(SSLOptionsError, match=r"client_context certfile: .*no PEM private key"):
        client_context(pki.ca_file, certfile=pki.client_cert_file)  # no key in it
    with pytest.raises(SSLOptionsError, match="does not match") as info:
        client_context(pki.ca_file, certfile=pki.client_cert_file, keyfile=pki.key_file)
    assert str(pki.key_file) in str(info.value) and str(pki.client_cert_file) in str(info.value)
    with pytest.raises(SSLOptionsError, match=r"client_context keyfile: .* without certfile"):
        client_context(pki.ca_file, keyfile=pki.client_key_file)


def test_expired_client_certificate(pki: PKI, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    old = pki.ca.issue_cert(
        "old@example.org",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    cert, key = tmp_path / "old.pem", tmp_path / "old.key"
    old.cert_chain_pems[0].write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    with pytest.raises(SSLOptionsError, match=r"client_context certfile: .* expired on"):
        client_context(pki.ca_file, certfile=cert, keyfile=key)


def test_encrypted_client_key(pki: PKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.client_key_file.read_bytes(), password=None)
    encrypted = tmp_path / "client-encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"sesame"),
        )
    )
    cert = pki.client_cert_file
    with pytest.raises(SSLOptionsError, match="needs a password"):
        client_context(pki.ca_file, certfile=cert, keyfile=encrypted)
    with pytest.raises(SSLOptionsError, match="wrong password"):
        client_context(pki.ca_file, certfile=cert, keyfile=encrypted, password="nope")
    for password in ("sesame", b"sesame"):
        client_context(pki.ca_file, certfile=cert, keyfile=encrypted, password=password)


def test_bad_options(pki: PKI) -> None:
    with pytest.raises(SSLOptionsError, match=r"client_context profile: 'old'"):
        client_context(pki.ca_file, profile="old")
    for alpn in ("h2", ["h2", ""], [b"h2"]):
        with pytest.raises(SSLOptionsError, match=r"client_context alpn_protocols"):
            client_context(pki.ca_file, alpn_protocols=alpn)  # type: ignore[arg-type]


# -- on uvloop -------------------------------------------------------------------------


def test_on_uvloop(pki: PKI) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.new_event_loop().close()  # libuv's process-wide pipe, before counting descriptors
    before = open_fds()

    async def scenarios() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        server = tls_server(pki, client_auth="required", client_ca=str(pki.ca_file))
        async with serving(server) as port:
            context = client_context(
                pki.ca_file, certfile=pki.client_cert_file, keyfile=pki.client_key_file
            )
            stream = await connect(HOST, port, ssl=context, server_hostname="localhost")
            try:
                assert await echo(stream) == PING
            finally:
                stream.close()
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(HOST, port, ssl=context, server_hostname="example.com")
        with socket.socket() as silent:
            silent.bind((HOST, 0))
            silent.listen(8)
            with pytest.raises(TimeoutError):
                await connect(HOST, silent.getsockname()[1], ssl=context, timeout=0.2)
        with socket.socket() as bound:
            bound.bind((HOST, 0))
            with pytest.raises(ConnectionRefusedError):
                await connect(HOST, bound.getsockname()[1])

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenarios(), 30))
    finally:
        loop.close()
    assert not open_fds() - before, "descriptors left open"
