"""securetcp.testing as a pytest plugin, seen from another project's test suite.

Each test writes a small test file into a temporary project (pytester), runs
pytest on it, and then checks from the outside that every server, thread and
listening socket the fixtures made is gone, also when the inner tests fail.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import securetcp.testing
from securetcp.testing import BadSSLTestServer, TLSTestServer

pytest_plugins = ["pytester"]

FIXTURES = {
    "tls_ca",
    "tls_ca_file",
    "tls_server_cert",
    "tls_client_cert",
    "tls_echo_server",
    "tls_server_factory",
    "badssl_server",
}

INNER_HEADER = '''
import asyncio
import http.client
import os
import socket
import ssl
import urllib.request

import pytest
import trustme

from securetcp import StreamClosedError, TCPServer


def record(*ports):
    with open(os.environ["SECURETCP_PORTS_FILE"], "a") as f:
        f.writelines(f"{port}\\n" for port in ports)


class Hello(TCPServer):
    """A one-request HTTP server."""

    async def handle_stream(self, stream, address):
        try:
            await stream.read_until(b"\\r\\n\\r\\n")
            await stream.write(
                b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\nConnection: close\\r\\n\\r\\nhello"
            )
        except StreamClosedError:
            pass
        stream.close()


def blocking_echo(handle, data=b"ping", client_cert=False):
    context = handle.client_context(client_cert=client_cert)
    with socket.create_connection(handle.address, timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(data)
            return tls.recv(len(data))


async def asyncio_echo(handle, data=b"ping", client_cert=False):
    reader, writer = await asyncio.open_connection(
        *handle.address, ssl=handle.client_context(client_cert=client_cert),
        server_hostname="localhost",
    )
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.readexactly(len(data)), 10)
    finally:
        writer.close()
        await writer.wait_closed()
'''

INNER_PASSING = (
    INNER_HEADER
    + """

def test_certificates(tls_ca, tls_server_cert, tls_client_cert, tls_ca_file):
    assert isinstance(tls_ca, trustme.CA)
    assert isinstance(tls_server_cert, trustme.LeafCert)
    assert isinstance(tls_client_cert, trustme.LeafCert)
    with open(tls_ca_file, "rb") as f:
        assert f.read() == tls_ca.cert_pem.bytes()


def test_echo_blocking(tls_echo_server):
    record(tls_echo_server.port)
    assert tls_echo_server.host == "127.0.0.1"
    assert tls_echo_server.address == ("127.0.0.1", tls_echo_server.port)
    assert blocking_echo(tls_echo_server) == b"ping"
    assert blocking_echo(tls_echo_server, b"mtls", client_cert=True) == b"mtls"


def test_echo_asyncio(tls_echo_server):
    record(tls_echo_server.port)
    assert asyncio.run(asyncio_echo(tls_echo_server, client_cert=True)) == b"ping"
    assert tls_echo_server.server.stats.handshakes >= 1


def test_echo_refuses_an_untrusting_client(tls_echo_server):
    with socket.create_connection(tls_echo_server.address, timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")


def test_factory_with_urllib_and_http_client(tls_server_factory):
    server = tls_server_factory(Hello, handshake_timeout=5.0)
    record(server.port)
    context = server.client_context()
    url = f"https://localhost:{server.port}/"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert response.read() == b"hello"
    connection = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=10)
    connection.request("GET", "/")
    assert connection.getresponse().read() == b"hello"
    connection.close()


def test_factory_with_asyncio_and_own_ssl_options(tls_server_factory, tls_server_cert):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_server_cert.configure_cert(context)
    first = tls_server_factory(Hello, ssl_options=context)
    second = tls_server_factory(Hello)
    record(first.port, second.port)

    async def get(handle):
        reader, writer = await asyncio.open_connection(
            *handle.address, ssl=handle.client_context(), server_hostname="localhost"
        )
        writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        body = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return body

    async def both():
        return await asyncio.gather(get(first), get(second))

    for body in asyncio.run(both()):
        assert body.endswith(b"hello")


def test_badssl_blocking(badssl_server):
    record(badssl_server.port("good"), badssl_server.port("expired"))
    context = ssl.create_default_context(cafile=badssl_server.ca_file)
    with socket.create_connection((badssl_server.host, badssl_server.port("good")), 10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version()
    assert badssl_server.expect("expired") == "expired"
    with socket.create_connection((badssl_server.host, badssl_server.port("expired")), 10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            context.wrap_socket(sock, server_hostname="localhost")
    assert caught.value.verify_code == 10


def test_badssl_asyncio(badssl_server):
    assert badssl_server.expect("wrong-host") == "hostname_mismatch"

    async def main():
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await asyncio.open_connection(
                badssl_server.host, badssl_server.port("wrong-host"),
                ssl=badssl_server.client_context(), server_hostname="localhost",
            )
        return caught.value.verify_code

    assert asyncio.run(main()) == 62
"""
)

INNER_FAILING = (
    INNER_HEADER
    + """

def test_fails_with_a_connection_open(tls_echo_server):
    record(tls_echo_server.port)
    context = tls_echo_server.client_context()
    sock = socket.create_connection(tls_echo_server.address, timeout=10)
    tls = context.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"left open")
    pytest.fail("on purpose, with a client connection still open")


def test_fails_in_a_factory_server(tls_server_factory):
    server = tls_server_factory(Hello)
    record(server.port)
    raise RuntimeError("on purpose")


def test_fails_with_badssl(badssl_server):
    record(badssl_server.port("good"))
    assert badssl_server.expect("good") == "expired", "on purpose"
"""
)


def socket_fds() -> set[str]:
    """The sockets this process has open, by inode."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def held_server_sockets(ports: set[int]) -> list[str]:
    """Sockets some process still holds on one of `ports`: listening or accepted ones.

    From /proc/net/tcp*: an entry with a non-zero inode belongs to an open
    descriptor; the kernel's own leftovers (TIME_WAIT, orphans) have inode 0.
    """
    held = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) in ports and inode != "0":
                    held.append(f"{local} state {state} inode {inode}")
    return held


@pytest.fixture
def inner(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.Pytester]:
    """The temporary project; afterwards, check that its run left no server behind."""
    ports_file = tmp_path / "ports"
    ports_file.touch()
    monkeypatch.setenv("SECURETCP_PORTS_FILE", str(ports_file))
    threads_before = set(threading.enumerate())
    yield pytester
    ports = {int(p) for p in ports_file.read_text().split()}
    assert ports, "the inner tests recorded no server port"
    assert [p for p in ports if not refused(p)] == []
    assert held_server_sockets(ports) == []
    new_threads = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert new_threads == []


def test_every_fixture_with_blocking_and_asyncio_clients(inner: pytest.Pytester) -> None:
    sockets_before = socket_fds()
    inner.makepyfile(test_inner=INNER_PASSING)
    result = inner.runpytest("-p", "no:cacheprovider", "-W", "error::ResourceWarning")
    result.assert_outcomes(passed=8)
    assert socket_fds() - sockets_before == set()  # the clients closed theirs too


def test_failing_inner_tests_still_clean_up(inner: pytest.Pytester) -> None:
    # The inner client socket stays open (the failure's traceback holds it); the
    # server's side of that connection must be gone all the same.
    inner.makepyfile(test_inner=INNER_FAILING)
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*on purpose, with a client connection still open*"])


def test_a_project_gets_the_fixtures_from_the_entry_point_alone(
    pytester: pytest.Pytester,
) -> None:
    # A separate interpreter, no conftest, no -p: only the installed pytest11 entry point.
    pytester.makepyfile(
        test_alone="""
        import socket

        def test_echo(tls_echo_server):
            context = tls_echo_server.client_context()
            with socket.create_connection(tls_echo_server.address, timeout=10) as sock:
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(b"x")
                    assert tls.recv(1) == b"x"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def test_importing_the_plugin_starts_nothing() -> None:
    code = (
        "import sys, threading, securetcp.testing; "
        "assert 'securetcp.services.badssl' not in sys.modules, 'badssl imported'; "
        "assert threading.active_count() == 1, threading.enumerate()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    fixtures = {name for name in securetcp.testing.__all__ if name.islower()}
    assert fixtures == FIXTURES
    assert not FIXTURES & {"pki", "no_fd_leak"}  # this suite's own conftest fixtures


# -- without pytest -------------------------------------------------------------------------


def test_tls_test_server_as_a_context_manager(no_fd_leak: None) -> None:
    threads_before = set(threading.enumerate())
    with TLSTestServer(client_auth="required") as server:
        port = server.port
        context = server.client_context()
        with (
            socket.create_connection(server.address, timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            # Without a client certificate, TLS 1.3 refuses on the first read (the
            # write before it may already find the connection closed).
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.sendall(b"x")
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                tls.recv(1)
        assert server.ca_file is not None and os.path.exists(server.ca_file)
        ca_file = server.ca_file
    assert refused(port)
    assert not os.path.exists(ca_file)
    assert set(threading.enumerate()) - threads_before == set()


def test_tls_test_server_with_a_client_certificate(no_fd_leak: None) -> None:
    import trustme

    ca = trustme.CA()
    client = ca.issue_cert("me@example.org", common_name="me")
    with TLSTestServer(ca=ca, client_cert=client, client_auth="required") as server:
        context = server.client_context(client_cert=True)
        with (
            socket.create_connection(server.address, timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    with pytest.raises(ValueError, match="client_auth"):
        TLSTestServer(client_auth="maybe")


def test_badssl_test_server_as_a_context_manager(no_fd_leak: None) -> None:
    threads_before = set(threading.enumerate())
    with BadSSLTestServer(["good", "self-signed"]) as badssl:
        directory = Path(badssl.ca_file).parent
        ports = [badssl.port("good"), badssl.port("self-signed")]
        context = badssl.client_context()
        with (
            socket.create_connection((badssl.host, ports[1]), timeout=10) as sock,
            pytest.raises(ssl.SSLCertVerificationError) as caught,
        ):
            context.wrap_socket(sock, server_hostname=badssl.server_name("self-signed"))
        assert caught.value.verify_code == 18
    assert all(refused(p) for p in ports)
    assert not directory.exists()
    assert set(threading.enumerate()) - threads_before == set()
