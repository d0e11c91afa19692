"""Real-TLS test helpers: trustme PKIs in tmp_path, a threaded TLS server, clients.

Everything here uses real sockets on 127.0.0.1 and bounded timeouts.
"""

from __future__ import annotations

import datetime
import queue
import socket
import ssl
import subprocess
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from cryptography import x509

TIMEOUT = 5.0
OPENSSL = "/usr/bin/openssl"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class PKI:
    """A trustme CA that writes certificates and keys into a directory."""

    def __init__(self, directory: Path, name: str = "ca", **ca_kwargs: Any) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(**ca_kwargs)
        self.ca_file = self.dir / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def pair(self, name: str, *identities: str, **kwargs: Any) -> tuple[Path, Path]:
        """Issue a leaf for ``identities``; write name.pem (chain) and name.key."""
        leaf = self.ca.issue_cert(*(identities or ("localhost",)), **kwargs)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def client_context(
        self,
        cert: tuple[Path, Path] | None = None,
        *,
        maximum: ssl.TLSVersion | None = None,
        minimum: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client context trusting this CA, optionally presenting ``cert``."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.maximum_version = maximum
        return context


def leaf_of(der: bytes | None) -> x509.Certificate:
    assert der is not None
    return x509.load_der_x509_certificate(der)


@dataclass
class ServerResult:
    """What the server side saw of one connection."""

    error: BaseException | None = None
    version: str | None = None
    alpn: str | None = None
    peer_der: bytes | None = None


class TLSServerThread:
    """A blocking TLS server in a thread; sends b"hello" after each handshake.

    ``server.context`` is read for every connection, so it may be a callable
    returning the current context (as a ServerTLS would give).
    """

    def __init__(self, context: ssl.SSLContext | Any) -> None:
        self._context = context
        self.results: queue.Queue[ServerResult] = queue.Queue()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current_context(self) -> ssl.SSLContext:
        context = self._context
        return context if isinstance(context, ssl.SSLContext) else context.context

    def __enter__(self) -> TLSServerThread:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._sock.close()
        assert not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            self.results.put(self._serve(conn))

    def _serve(self, conn: socket.socket) -> ServerResult:
        try:
            with self.current_context().wrap_socket(conn, server_side=True) as tls:
                result = ServerResult(
                    version=tls.version(),
                    alpn=tls.selected_alpn_protocol(),
                    peer_der=tls.getpeercert(binary_form=True),
                )
                tls.sendall(b"hello")
                return result
        except (OSError, ssl.SSLError) as exc:
            return ServerResult(error=exc)
        finally:
            conn.close()

    def result(self) -> ServerResult:
        return self.results.get(timeout=TIMEOUT)


@dataclass
class ClientResult:
    version: str | None
    cipher: tuple[str, str, int] | None
    alpn: str | None
    peer_der: bytes | None
    data: bytes
    session: ssl.SSLSession | None


def connect(
    port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> ClientResult:
    """Handshake with the server, read its greeting; SSLError on failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:  # noqa: SIM117
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            data = tls.recv(5)
            return ClientResult(
                version=tls.version(),
                cipher=tls.cipher(),
                alpn=tls.selected_alpn_protocol(),
                peer_der=tls.getpeercert(binary_form=True),
                data=data,
                session=tls.session,
            )


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``openssl s_client`` against the server (no verification)."""
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
