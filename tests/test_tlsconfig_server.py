"""TLSConfig end to end through TCPServer: profiles, mutual TLS, SNI, ALPN, reload.

Each test starts a real TCPServer inside its own event loop on 127.0.0.1
and talks to it with blocking stdlib TLS clients run in worker threads
(``asyncio.to_thread``), so the server keeps running while a client waits.
Certificates come from tests/certbuilder.py (cryptography), written to
tmp_path; nothing about ``ssl`` is mocked. Conditions are awaited through
the server's queue of handled connections or polled with a deadline
(tests/servers.py: the EchoServer and `until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certbuilder import CertBuilder, Issued
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from servers import HOST, EchoServer, until

from securetcp.certs import PeerIdentity
from securetcp.tls import TLSConfig

TIMEOUT = 5.0
PING = b"ping"
SPIFFE_ID = "spiffe://example.org/svc"


# -- the server -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(config: TLSConfig) -> AsyncIterator[EchoServer]:
    """An EchoServer (tests/servers.py) accepting on 127.0.0.1 in the running loop;
    ``next_handled()`` gives the TLS facts of each connection that reached
    ``handle_stream``, ``handled.empty()`` says none did."""
    server = EchoServer(config, handshake_timeout=TIMEOUT)
    server.listen(0, HOST)  # accepts at once: a loop is running
    try:
        yield server
    finally:
        await server.close(timeout=TIMEOUT)


# -- certificates and clients ------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> CertBuilder:
    return CertBuilder(tmp_path / "pki")


@pytest.fixture
def server_cert(ca: CertBuilder) -> Issued:
    return ca.issue(
        "server", common_name="localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )


def client_context(
    ca: CertBuilder,
    cert: Issued | None = None,
    *,
    maximum: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A client context trusting ``ca``, optionally presenting ``cert``."""
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    if cert is not None:
        context.load_cert_chain(*cert.pair)
    if maximum is not None:
        context.maximum_version = maximum
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def legacy_client_context(ca: CertBuilder) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (and really sends its hello)."""
    context = client_context(ca)
    with warnings.catch_warnings():  # deprecated versions: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@dataclass
class Reply:
    """What a client saw of one exchange."""

    version: str | None
    alpn: str | None
    peer: x509.Certificate
    session: ssl.SSLSession | None
    session_reused: bool
    echoed: bytes


def _recv_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _exchange(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None,
    session: ssl.SSLSession | None,
) -> Reply:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:  # noqa: SIM117
        with context.wrap_socket(raw, server_hostname=server_hostname, session=session) as tls:
            tls.sendall(PING)
            echoed = _recv_exactly(tls, len(PING))
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return Reply(
                version=tls.version(),
                alpn=tls.selected_alpn_protocol(),
                peer=x509.load_der_x509_certificate(der),
                session=tls.session,
                session_reused=bool(tls.session_reused),
                echoed=echoed,
            )


async def exchange(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    session: ssl.SSLSession | None = None,
) -> Reply:
    """Handshake, send PING and read the echo, in a worker thread."""
    return await asyncio.to_thread(_exchange, port, context, server_hostname, session)


async def served(
    port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> Reply:
    reply = await exchange(port, context, server_hostname)
    assert reply.echoed == PING
    return reply


async def refused(
    port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> None:
    """The server must not serve this client (an error, or the stream just ends)."""
    try:
        reply = await exchange(port, context, server_hostname)
    except (ssl.SSLError, OSError):
        return
    assert reply.echoed != PING, "the connection was served"


class OpenConnection:
    """A TLS connection kept open across awaits (blocking calls in a thread)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> OpenConnection:
        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            try:
                return context.wrap_socket(raw, server_hostname="localhost")
            except BaseException:
                raw.close()
                raise

        return cls(await asyncio.to_thread(connect))

    async def roundtrip(self, data: bytes) -> bytes:
        def run() -> bytes:
            self.tls.sendall(data)
            return _recv_exactly(self.tls, len(data))

        return await asyncio.to_thread(run)

    @property
    def peer_serial(self) -> int:
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def close(self) -> None:
        self.tls.close()


# -- profiles ----------------------------------------------------------------------


async def test_intermediate_accepts_tls12_and_tls13(
    ca: CertBuilder, server_cert: Issued, no_fd_leak: None
) -> None:
    async with serving(TLSConfig(*server_cert.pair)) as server:
        for maximum, version in (
            (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
            (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
        ):
            reply = await served(server.port, client_context(ca, maximum=maximum))
            assert reply.version == version
            seen = await server.next_handled()
            assert seen.version == version
            assert seen.cipher is not None and seen.cipher[1] == version
        await refused(server.port, legacy_client_context(ca))
        await until(lambda: server.stats.failures == {"protocol": 1}, message="a protocol failure")
        assert server.stats.handshakes == 2 and server.handled.empty()


async def test_modern_refuses_tls12_client(
    ca: CertBuilder, server_cert: Issued, no_fd_leak: None
) -> None:
    async with serving(TLSConfig(*server_cert.pair, profile="modern")) as server:
        assert (await served(server.port, client_context(ca))).version == "TLSv1.3"
        assert (await server.next_handled()).version == "TLSv1.3"
        await refused(server.port, client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
        await until(lambda: server.stats.failures == {"protocol": 1}, message="a protocol failure")
        assert server.stats.handshakes == 1 and server.handled.empty()


# -- mutual TLS -----------------------------------------------------------------------


@pytest.fixture
def svc_cert(ca: CertBuilder) -> Issued:
    """A client certificate with every kind of identity PeerIdentity reports."""
    return ca.issue(
        "svc",
        common_name="svc-a",
        dns_names=["svc-a.internal"],
        ip_addresses=["10.1.2.3", "fd00::1"],
        uris=[SPIFFE_ID],
        emails=["svc-a@example.org"],
        client=True,
    )


async def test_client_auth_required(
    ca: CertBuilder, server_cert: Issued, svc_cert: Issued, tmp_path: Path, no_fd_leak: None
) -> None:
    stranger_ca = CertBuilder(tmp_path / "stranger", name="stranger")
    stranger = stranger_ca.issue("impostor", common_name="svc-a", client=True)
    config = TLSConfig(*server_cert.pair, client_auth="required", client_ca=ca.ca_file)
    async with serving(config) as server:
        await refused(server.port, client_context(ca))
        await until(lambda: server.stats.failures == {"certificate": 1}, message="no certificate")
        await refused(server.port, client_context(ca, stranger))
        await until(lambda: server.stats.failures == {"certificate": 2}, message="untrusted CA")
        assert server.handled.empty()

        await served(server.port, client_context(ca, svc_cert))
        seen = await server.next_handled()
    identity = seen.identity
    assert identity is not None
    assert identity.common_name == "svc-a"
    assert identity.dns_names == ("svc-a.internal",)
    assert identity.ip_addresses == (
        ipaddress.IPv4Address("10.1.2.3"),
        ipaddress.IPv6Address("fd00::1"),
    )
    assert identity.uris == (SPIFFE_ID,)
    assert identity.emails == ("svc-a@example.org",)
    assert identity.serial == svc_cert.serial
    assert identity.fingerprint_sha256 == svc_cert.cert.fingerprint(hashes.SHA256()).hex()
    assert identity.not_before == svc_cert.cert.not_valid_before_utc
    assert identity.not_after == svc_cert.cert.not_valid_after_utc
    assert seen.peer_certificate is not None
    assert ((("commonName", "svc-a"),)) in seen.peer_certificate["subject"]
    assert server.stats.handshakes == 1


async def test_client_auth_optional(
    ca: CertBuilder, server_cert: Issued, svc_cert: Issued, tmp_path: Path, no_fd_leak: None
) -> None:
    stranger = CertBuilder(tmp_path / "stranger").issue("impostor", common_name="x", client=True)
    config = TLSConfig(*server_cert.pair, client_auth="optional", client_ca=ca.ca_file)
    async with serving(config) as server:
        await served(server.port, client_context(ca))
        anonymous = await server.next_handled()
        assert anonymous.identity is None and anonymous.peer_certificate is None

        await served(server.port, client_context(ca, svc_cert))
        known = await server.next_handled()
        assert known.identity is not None and known.identity.uris == (SPIFFE_ID,)

        # A certificate that is presented is verified, even when optional.
        await refused(server.port, client_context(ca, stranger))
        await until(lambda: server.stats.failures == {"certificate": 1}, message="untrusted CA")
        assert server.handled.empty()


async def test_authorize_rejects_valid_peer(
    ca: CertBuilder, server_cert: Issued, svc_cert: Issued, no_fd_leak: None
) -> None:
    allowed = ca.issue("allowed", common_name="svc-b", uris=["spiffe://example.org/b"], client=True)
    asked: list[PeerIdentity] = []

    def authorize(identity: PeerIdentity) -> bool:
        asked.append(identity)
        return identity.uris == ("spiffe://example.org/b",)

    config = TLSConfig(
        *server_cert.pair, client_auth="optional", client_ca=ca.ca_file, authorize=authorize
    )
    async with serving(config) as server:
        await refused(server.port, client_context(ca, svc_cert))
        await until(lambda: server.stats.rejected == 1, message="the rejection")
        assert server.stats.failures == {"unauthorized": 1}
        assert [identity.common_name for identity in asked] == ["svc-a"]

        # No certificate at all: nobody to authorize, refused without asking.
        await refused(server.port, client_context(ca))
        await until(lambda: server.stats.rejected == 2, message="the second rejection")
        assert server.stats.failures == {"unauthorized": 2}
        assert len(asked) == 1
        assert server.handled.empty()  # handle_stream never ran

        await served(server.port, client_context(ca, allowed))
        seen = await server.next_handled()
        assert seen.identity is not None and seen.identity.common_name == "svc-b"
        assert server.stats.handshakes == 3 and server.stats.rejected == 2


# -- SNI and ALPN --------------------------------------------------------------------


@pytest.fixture
def sni_certs(ca: CertBuilder) -> dict[str, Issued]:
    return {
        "default": ca.issue("default", common_name="localhost", dns_names=["localhost"]),
        "a": ca.issue("a", common_name="a.example", dns_names=["a.example"]),
        "b": ca.issue("b", common_name="b.example", dns_names=["b.example"]),
        "wild": ca.issue("wild", common_name="*.wild.example", dns_names=["*.wild.example"]),
    }


def sni_config(certs: dict[str, Issued], **kwargs: Any) -> TLSConfig:
    return TLSConfig(
        *certs["default"].pair,
        sni={
            "a.example": certs["a"].pair,
            "b.example": certs["b"].pair,
            "*.wild.example": certs["wild"].pair,
        },
        **kwargs,
    )


async def test_sni_selects_certificate(
    ca: CertBuilder, sni_certs: dict[str, Issued], no_fd_leak: None
) -> None:
    cases: list[tuple[str | None, str, bool]] = [  # (name sent, cert expected, verifiable)
        ("a.example", "a", True),
        ("b.example", "b", True),
        ("api.wild.example", "wild", True),
        ("localhost", "default", True),
        ("unknown.example", "default", False),
        (None, "default", False),
    ]
    async with serving(sni_config(sni_certs)) as server:
        for name, expected, verifiable in cases:
            client = client_context(ca)
            client.check_hostname = verifiable  # the client checks the name it asked for
            reply = await served(server.port, client, server_hostname=name)
            assert reply.peer.serial_number == sni_certs[expected].serial, name
            assert (await server.next_handled()).server_name == name
        assert server.stats.failures == {}


async def test_sni_strict_refuses_unknown_name(
    ca: CertBuilder, sni_certs: dict[str, Issued], no_fd_leak: None
) -> None:
    async with serving(sni_config(sni_certs, sni_strict=True)) as server:
        client = client_context(ca)
        client.check_hostname = False
        await refused(server.port, client, server_hostname="unknown.example")
        await until(lambda: server.stats.failures == {"sni": 1}, message="an SNI failure")
        assert server.handled.empty()
        reply = await served(server.port, client_context(ca), server_hostname="a.example")
        assert reply.peer.serial_number == sni_certs["a"].serial
        assert (await server.next_handled()).server_name == "a.example"


async def test_client_auth_on_sni_context(
    ca: CertBuilder, sni_certs: dict[str, Issued], svc_cert: Issued, no_fd_leak: None
) -> None:
    """Switching to a host's context keeps client verification as configured."""
    config = sni_config(sni_certs, client_auth="required", client_ca=ca.ca_file)
    async with serving(config) as server:
        await refused(server.port, client_context(ca), server_hostname="a.example")
        await until(lambda: server.stats.failures == {"certificate": 1}, message="no certificate")
        reply = await served(server.port, client_context(ca, svc_cert), "a.example")
        assert reply.peer.serial_number == sni_certs["a"].serial
        seen = await server.next_handled()
        assert seen.server_name == "a.example"
        assert seen.identity is not None and seen.identity.uris == (SPIFFE_ID,)


async def test_alpn(ca: CertBuilder, sni_certs: dict[str, Issued], no_fd_leak: None) -> None:
    cases: list[tuple[str, list[str] | None, str | None]] = [
        ("localhost", ["http/1.1", "h2"], "h2"),  # the server's preference
        ("a.example", ["http/1.1", "h2"], "h2"),  # on an SNI context too
        ("a.example", ["http/1.1"], "http/1.1"),
        ("localhost", None, None),
        ("localhost", ["spdy/3"], None),  # no overlap: served without ALPN
    ]
    async with serving(sni_config(sni_certs, alpn_protocols=["h2", "http/1.1"])) as server:
        for name, offered, expected in cases:
            reply = await served(server.port, client_context(ca, alpn=offered), name)
            assert reply.alpn == expected, (name, offered)
            assert (await server.next_handled()).alpn == expected, (name, offered)


# -- certificate reloading -----------------------------------------------------------


def renew(ca: CertBuilder, current: Issued) -> Issued:
    """Replace ``current``'s files with a new certificate and key (atomic renames)."""
    new = ca.issue("renewed", common_name="localhost", dns_names=["localhost"])
    os.replace(new.key_file, current.key_file)
    os.replace(new.cert_file, current.cert_file)
    return Issued(new.cert, current.cert_file, current.key_file)


async def served_serial(port: int, ca: CertBuilder) -> int:
    return (await served(port, client_context(ca))).peer.serial_number


async def test_reload_polling(
    ca: CertBuilder, server_cert: Issued, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    interval = 0.1
    config = TLSConfig(*server_cert.pair, reload_interval=interval)
    loop = asyncio.get_running_loop()
    async with serving(config) as server:
        kept = await OpenConnection.open(server.port, client_context(ca))
        try:
            assert await kept.roundtrip(b"before") == b"before"
            assert kept.peer_serial == server_cert.serial

            renewed = renew(ca, server_cert)
            deadline = loop.time() + TIMEOUT
            while (serial := await served_serial(server.port, ca)) != renewed.serial:
                assert serial == server_cert.serial
                assert loop.time() < deadline, "the renewed certificate was never served"
            # The connection opened before the renewal carries on.
            assert await kept.roundtrip(b"after") == b"after"
            assert kept.peer_serial == server_cert.serial

            with caplog.at_level(logging.ERROR, logger="securetcp.tls"):
                server_cert.cert_file.write_text("-----BEGIN CERTIFICATE-----\nbroken\n")

                def errors() -> list[logging.LogRecord]:
                    # (ERROR only: "reloaded" is logged at INFO, and whether INFO
                    # records reach caplog depends on what earlier tests set.)
                    return [
                        r
                        for r in caplog.records
                        if r.name == "securetcp.tls" and r.levelno >= logging.ERROR
                    ]

                await until(lambda: bool(errors()), message="the reload error")
                # Over several more polling periods: the renewed certificate
                # keeps being served, and the broken file is not re-reported.
                window_end = loop.time() + 5 * interval
                while loop.time() < window_end:
                    assert await served_serial(server.port, ca) == renewed.serial
                (error,) = errors()
            assert error.levelno == logging.ERROR
            assert str(server_cert.cert_file) in error.getMessage()
            assert await kept.roundtrip(b"still") == b"still"

            # Fixing the file is picked up again.
            fixed = renew(ca, renewed)
            deadline = loop.time() + TIMEOUT
            while await served_serial(server.port, ca) != fixed.serial:
                assert loop.time() < deadline, "the fixed certificate was never served"
        finally:
            kept.close()
    assert not config.reloading  # close() stopped the polling


async def test_reload_by_hand(ca: CertBuilder, server_cert: Issued, no_fd_leak: None) -> None:
    config = TLSConfig(*server_cert.pair)
    async with serving(config) as server:
        assert await served_serial(server.port, ca) == server_cert.serial
        renewed = renew(ca, server_cert)
        # Without reload_interval nothing watches the files.
        assert await served_serial(server.port, ca) == server_cert.serial
        assert config.reload() is True
        assert config.reload() is False
        assert await served_serial(server.port, ca) == renewed.serial


# -- session tickets and key log --------------------------------------------------------


@pytest.mark.parametrize("tickets", [True, False])
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"]
)
async def test_session_tickets(
    ca: CertBuilder, server_cert: Issued, tickets: bool, version: ssl.TLSVersion, no_fd_leak: None
) -> None:
    config = TLSConfig(*server_cert.pair, session_tickets=tickets)
    async with serving(config) as server:
        client = client_context(ca, maximum=version)
        first = await served(server.port, client)
        assert first.version == version.name.replace("_", ".") and not first.session_reused
        assert first.session is not None and first.session.has_ticket is tickets
        second = await exchange(server.port, client, session=first.session)
        assert second.echoed == PING
        # Without tickets there is no resumption at all (no session-ID cache either).
        assert second.session_reused is tickets
        assert server.stats.handshakes == 2


async def test_keylog_file(ca: CertBuilder, server_cert: Issued, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    async with serving(TLSConfig(*server_cert.pair, keylog_file=keylog)) as server:
        await served(server.port, client_context(ca))
        await served(server.port, client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
    labels = [line.split()[0] for line in keylog.read_text().splitlines() if line.strip()]
    assert labels.count("SERVER_TRAFFIC_SECRET_0") == 1  # the TLS 1.3 connection
    assert labels.count("CLIENT_RANDOM") == 1  # the TLS 1.2 one
