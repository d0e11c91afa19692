"""Run-time TLS material: a trustme CA and its server certificates.

One ECDSA P-256 CA issues two server certificates for the same names: an
ECDSA P-256 one (every workload but ``handshake-rsa``) and an RSA-2048 one
(``handshake-rsa``). Nothing is ever written into the repository: files go to a temporary
directory that the caller owns.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

HOST = "127.0.0.1"
SERVER_NAME = "localhost"


@dataclass(frozen=True)
class TLSFiles:
    """Paths of the PEM files the servers and clients load."""

    cafile: Path
    certfile: Path
    keyfile: Path


KEY_TYPES = {"ecdsa": trustme.KeyType.ECDSA, "rsa": trustme.KeyType.RSA}


def make_tls_files(directory: Path) -> dict[str, TLSFiles]:
    """Create a CA and one server certificate per :data:`KEY_TYPES` entry in ``directory``.

    The result maps ``"ecdsa"`` / ``"rsa"`` to that certificate's files; all
    share the one CA file, so any client context trusts every server.
    """
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cafile = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    out = {}
    for name, key_type in KEY_TYPES.items():
        cert = ca.issue_cert(SERVER_NAME, HOST, key_type=key_type)
        files = TLSFiles(
            cafile=cafile,
            certfile=directory / f"server-{name}-chain.pem",
            keyfile=directory / f"server-{name}-key.pem",
        )
        cert.private_key_pem.write_to_path(str(files.keyfile))
        with files.certfile.open("wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        out[name] = files
    return out


def client_context(cafile: Path | str) -> ssl.SSLContext:
    """Client context: TLS 1.3 only, verifying the server against the CA."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def load_context() -> ssl.SSLContext:
    """Load-generator context: TLS 1.3 only, no certificate verification.

    The client's handshake costs as much CPU as the server's, and the load
    generator has one core; skipping the two signature verifications (chain and
    CertificateVerify) leaves more of it for driving the server. The server
    still signs and sends its certificate as usual, and the readiness probe
    (``client_context``) verifies it once per server start.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect_tls(
    ctx: ssl.SSLContext, port: int, *, timeout: float = 10.0, nodelay: bool = True
) -> ssl.SSLSocket:
    """Open a blocking TLS connection to the loopback server (handshake done)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(sock, server_hostname=SERVER_NAME)
    except BaseException:
        sock.close()
        raise


def echo_once(ctx: ssl.SSLContext, port: int, *, timeout: float = 5.0) -> None:
    """One full connection: handshake, 1 byte out, the 1-byte echo back, close."""
    with connect_tls(ctx, port, timeout=timeout) as tls:
        tls.sendall(b"x")
        if tls.recv(1) != b"x":
            raise ConnectionError("echo mismatch or early close")
