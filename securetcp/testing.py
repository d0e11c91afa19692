"""pytest plugin: a test CA, certificates and running TLS servers for any project.

Installed with securetcp (entry point ``pytest11``), so any project that
installs securetcp gets these fixtures:

``tls_ca``, ``tls_server_cert``, ``tls_client_cert`` (session)
    a throw-away trustme CA, a server certificate for localhost/127.0.0.1/::1
    and a client certificate, made once per test session.
``tls_ca_file`` (session)
    the CA certificate as a PEM file, for clients that want a path.
``tls_echo_server``
    a running securetcp TLS echo server (a `TLSTestServer`).
``tls_server_factory``
    ``tls_server_factory(server_class, **tcpserver_keywords)`` starts any
    `TCPServer` subclass the same way and returns its `TLSTestServer`.
``badssl_server`` (session)
    every `securetcp.services.badssl` scenario running (a `BadSSLTestServer`).

Servers run on their own event loop in a background thread, so blocking
clients (``ssl``, ``urllib``, ``http.client``, ``requests``) and asyncio
clients both work; when the fixture ends, even after a failed test, every
server, connection, thread and temporary file it made is gone. Without pytest,
``with TLSTestServer() as server:`` and ``with BadSSLTestServer() as badssl:``
do the same. Importing this module starts nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trustme

if TYPE_CHECKING:
    from securetcp.services.badssl import BadSSLServer
    from securetcp.tcpserver import TCPServer

__all__ = [
    "BadSSLTestServer",
    "TLSTestServer",
    "badssl_server",
    "tls_ca",
    "tls_ca_file",
    "tls_client_cert",
    "tls_echo_server",
    "tls_server_cert",
    "tls_server_factory",
]

T = TypeVar("T")

#: Seconds a background server gets to start or to close before the test fails.
STARTUP_TIMEOUT = 30.0


class _LoopThread:
    """An asyncio event loop running in a daemon thread until `stop()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            # Joins the resolver threads (getaddrinfo) the servers' clients may have used.
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = STARTUP_TIMEOUT) -> T:
        """Run `coroutine` on the loop and wait (at most `timeout` s) for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"background server did not answer within {timeout} s") from None

    def stop(self) -> None:
        """Stop the loop and wait for the thread to end."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(STARTUP_TIMEOUT)


def _write_ca(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _default_server_context(
    server_cert: trustme.LeafCert, ca: trustme.CA, client_auth: str
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    if client_auth != "none":
        context.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
        ca.configure_trust(context)
    return context


class TLSTestServer:
    """A securetcp server running in a background thread, for tests and scripts.

    ::

        with TLSTestServer() as server:              # a TLS echo server
            context = server.client_context()
            with socket.create_connection(server.address) as sock:
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    ...

    `server_class` is any `TCPServer` subclass (default: the echo service),
    built with ``server_class(ssl_options=..., **tcpserver_keywords)``.
    Without `ssl_options` it gets a certificate for localhost, 127.0.0.1 and
    ::1 from `ca` (a new trustme CA when None), and asks for a client
    certificate from that CA (`client_auth`: "optional", "required" or "none").
    `ca_file` is then that CA as a PEM file; with your own `ssl_options`, pass
    `ca_file` yourself if `client_context()` should use it.
    """

    def __init__(
        self,
        server_class: type[TCPServer] | None = None,
        *,
        ssl_options: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: trustme.CA | None = None,
        server_cert: trustme.LeafCert | None = None,
        client_cert: trustme.LeafCert | None = None,
        ca_file: str | Path | None = None,
        client_auth: str = "optional",
        **tcpserver_keywords: Any,
    ) -> None:
        if server_class is None:
            from securetcp.services.echo import EchoServer

            server_class = EchoServer
        if client_auth not in ("none", "optional", "required"):
            raise ValueError("client_auth must be 'none', 'optional' or 'required'")
        self.ca: trustme.CA | None = ca
        """The CA that issued the server certificate (None with your own `ssl_options`
        and no `ca`)."""
        self._directory = Path(tempfile.mkdtemp(prefix="securetcp-test-"))
        try:
            if ssl_options is None:
                self.ca = ca = ca or trustme.CA()
                server_cert = server_cert or ca.issue_cert("localhost", "127.0.0.1", "::1")
                ssl_options = _default_server_context(server_cert, ca, client_auth)
                if ca_file is None:
                    ca_file = _write_ca(ca, self._directory)
            elif ca is not None and ca_file is None:
                ca_file = _write_ca(ca, self._directory)
            self.ca_file: str | None = None if ca_file is None else str(ca_file)
            """The CA certificate file that `client_context()` trusts."""
            self.client_cert = client_cert
            self.host = host
            self.server: TCPServer = server_class(ssl_options=ssl_options, **tcpserver_keywords)
            """The running server (its `stats`, `sockets`...)."""
        except BaseException:
            shutil.rmtree(self._directory, ignore_errors=True)
            raise
        self._requested_port = port
        self._thread: _LoopThread | None = None
        self.port = 0
        """The port the server listens on (once started)."""

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, as `socket.create_connection` takes it."""
        return (self.host, self.port)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background event loop the server runs on."""
        if self._thread is None:
            raise RuntimeError("the server is not running")
        return self._thread.loop

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A verifying client context that trusts the server (optionally presenting
        the client certificate given to the constructor)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if client_cert:
            if self.client_cert is None:
                raise ValueError("no client_cert was given to this TLSTestServer")
            self.client_cert.configure_cert(context)
        return context

    def start(self) -> TLSTestServer:
        """Start the background loop and the server (once); returns self."""
        if self._thread is not None:
            return self
        self._thread = _LoopThread(f"securetcp-test-server-{id(self):x}")
        try:
            self._thread.call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> None:
        self.server.listen(self._requested_port, self.host)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the server and its connections, stop the thread, remove temp files."""
        thread, self._thread = self._thread, None
        try:
            if thread is not None:
                try:
                    # Handlers get a moment to finish; then their connections are closed.
                    thread.call(self.server.close(timeout=0.5))
                finally:
                    thread.stop()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> TLSTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class BadSSLTestServer:
    """Every badssl scenario (or those in `only`) running in a background thread.

    ``port(name)`` is where scenario `name` listens on `host`, ``expect(name)``
    the outcome a verifying client must see (see `securetcp.services.badssl`),
    ``server_name(name)`` the host name to verify, ``ca_file`` the CA to trust;
    ``crl_file``, ``client_cert_file`` and ``client_key_file`` are there for
    the revoked and client-certificate scenarios. With `sni_port` (0: any
    free port) every scenario is also served on ``sni_port``, chosen by the
    SNI name ``SCENARIO.badssl.test``. ``badssl`` is the `BadSSLServer` itself.
    """

    def __init__(
        self,
        only: Iterable[str] | None = None,
        *,
        host: str = "127.0.0.1",
        sni_port: int | None = None,
    ) -> None:
        from securetcp.services.badssl import BadSSLServer

        self.badssl: BadSSLServer = BadSSLServer(only, host=host, sni_port=sni_port)
        self.host = host
        self.ca_file = str(self.badssl.ca_file)
        self.crl_file = str(self.badssl.crl_file)
        self.client_cert_file = str(self.badssl.client_cert_file)
        self.client_key_file = str(self.badssl.client_key_file)
        self._thread: _LoopThread | None = None

    def port(self, name: str) -> int:
        """The port scenario `name` listens on."""
        return self.badssl.port(name)

    def expect(self, name: str, client: str = "python") -> str:
        """The outcome `client` ("python", "openssl", "gnutls", "curl") must see on `name`."""
        return self.badssl.expect(name, client)

    def server_name(self, name: str) -> str:
        """The host name a client verifies (and sends as SNI) for scenario `name`."""
        return self.badssl.server_name(name)

    @property
    def sni_port(self) -> int | None:
        """The port serving every scenario by SNI name (with ``sni_port=`` given), else None."""
        return self.badssl.bound_sni_port

    def client_context(self) -> ssl.SSLContext:
        """``ssl.create_default_context`` trusting the harness CA: what scenarios expect."""
        return ssl.create_default_context(cafile=self.ca_file)

    def start(self) -> BadSSLTestServer:
        """Start every scenario in the background; returns self."""
        if self._thread is None:
            self._thread = _LoopThread("securetcp-badssl")
            try:
                self._thread.call(self.badssl.start())
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Close every scenario server, stop the thread, remove the PKI files."""
        thread, self._thread = self._thread, None
        if thread is None:
            thread = _LoopThread("securetcp-badssl")  # never started: close() removes the files
        try:
            thread.call(self.badssl.close())
        finally:
            thread.stop()

    def __enter__(self) -> BadSSLTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throw-away certificate authority for the whole test session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate for localhost, 127.0.0.1 and ::1, issued by `tls_ca`."""
    return tls_ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def tls_client_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A client certificate (common name ``securetcp-test-client``) issued by `tls_ca`."""
    return tls_ca.issue_cert("client@example.org", common_name="securetcp-test-client")


@pytest.fixture(scope="session")
def tls_ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tls_ca`'s certificate as a PEM file (a path string)."""
    return str(_write_ca(tls_ca, tmp_path_factory.mktemp("securetcp-ca")))


@pytest.fixture
def tls_server_factory(
    tls_ca: trustme.CA,
    tls_server_cert: trustme.LeafCert,
    tls_client_cert: trustme.LeafCert,
    tls_ca_file: str,
) -> Iterator[Callable[..., TLSTestServer]]:
    """``start(server_class, **tcpserver_keywords) -> TLSTestServer``; all closed at the end.

    TLS comes from `tls_server_cert` (client certificates from `tls_ca`
    optional) unless ``ssl_options`` is given.
    """
    started: list[TLSTestServer] = []

    def start(server_class: type[TCPServer], **tcpserver_keywords: Any) -> TLSTestServer:
        server = TLSTestServer(
            server_class,
            ca=tls_ca,
            server_cert=tls_server_cert,
            client_cert=tls_client_cert,
            ca_file=tls_ca_file,
            **tcpserver_keywords,
        )
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        errors = []
        for server in reversed(started):
            try:
                server.stop()
            except Exception as e:  # stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def tls_echo_server(
    tls_server_factory: Callable[..., TLSTestServer],
) -> TLSTestServer:
    """A running securetcp TLS echo server: ``host``, ``port``, ``address``, ``ca_file``,
    ``server`` and ``client_context(client_cert=False)``."""
    from securetcp.services.echo import EchoServer

    return tls_server_factory(EchoServer)


@pytest.fixture(scope="session")
def badssl_server() -> Iterator[BadSSLTestServer]:
    """Every badssl scenario running: ``port(name)``, ``expect(name)``, ``ca_file``, ``host``."""
    with BadSSLTestServer() as server:
        yield server
