"""Tests for TLSConfig: validation, profiles, groups, client auth, SNI, ALPN, reload."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from certbuilder import PKI, encrypt_key, leaf_of, pem_pair, self_signed, utcnow
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from servers import EchoServer, ServerThread, s_client, tls_connect

from securetcp import _tls_groups
from securetcp.tls import MOZILLA_GROUPS, SSLOptionsError, TLSConfig, make_server_tls

Pair = tuple[Path, Path]


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest.fixture
def pair(pki: PKI) -> Pair:
    return pki.pair("server", "localhost")


def serial_of(der: bytes | None) -> int:
    return leaf_of(der).serial_number


def file_serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(SSLOptionsError) as info:
        TLSConfig(*args, **kwargs)
    return str(info.value)


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"profile": "old"}, "TLSConfig profile: 'old'"),
        ({"client_auth": "yes"}, "TLSConfig client_auth: 'yes'"),
        ({"client_auth": "required"}, "needs client_ca"),
        ({"alpn_protocols": "h2"}, "TLSConfig alpn_protocols"),
        ({"alpn_protocols": ["h2", ""]}, "TLSConfig alpn_protocols"),
        ({"reload_interval": 0}, "TLSConfig reload_interval"),
        ({"reload_interval": "5"}, "TLSConfig reload_interval"),
        ({"authorize": "admin"}, "TLSConfig authorize"),
        ({"sni": {"a.*.example": "x.pem"}}, "one-label wildcard"),
        ({"sni": {"ok.example": ("a", "b", "c")}}, "expected (certfile, keyfile)"),
    ],
)
def test_bad_settings(pair: Pair, kwargs: dict[str, Any], expected: str) -> None:
    assert expected in config_error(*pair, **kwargs)


def test_client_ca_without_client_auth(pair: Pair, pki: PKI) -> None:
    assert "client_auth is 'none'" in config_error(*pair, client_ca=pki.ca_file)


def test_file_errors_name_option_and_path(pair: Pair, pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    message = config_error(missing)
    assert "TLSConfig certfile" in message and str(missing) in message
    message = config_error(pair[0], missing)
    assert "TLSConfig keyfile" in message and str(missing) in message
    message = config_error(pair[0])  # no key inside the certificate file
    assert "TLSConfig certfile" in message and "no PEM private key" in message
    _, other_key = pki.pair("other")
    assert "does not match" in config_error(pair[0], other_key)
    message = config_error(*pair, client_auth="required", client_ca=missing)
    assert "TLSConfig client_ca" in message and str(missing) in message


def test_sni_entry_errors_name_the_host(pair: Pair, tmp_path: Path) -> None:
    missing = tmp_path / "api.pem"
    message = config_error(*pair, sni={"API.example.com": (missing, None)})
    assert "sni['api.example.com']" in message and str(missing) in message


def test_dated_certificates_refused(pki: PKI) -> None:
    day = datetime.timedelta(days=1)
    expired = pki.pair("expired", not_before=utcnow() - 9 * day, not_after=utcnow() - day)
    assert "expired on" in config_error(*expired)
    future = pki.pair("future", not_before=utcnow() + day, not_after=utcnow() + 9 * day)
    assert "not valid until" in config_error(*future)


def test_encrypted_key_password(pair: Pair, pki: PKI, tmp_path: Path) -> None:
    encrypted = encrypt_key(pair[1], b"hunter2", out=tmp_path / "enc.key")
    assert "needs a password" in config_error(pair[0], encrypted)
    assert "wrong password" in config_error(pair[0], encrypted, password="nope")
    config = TLSConfig(pair[0], encrypted, password="hunter2")
    with ServerThread(EchoServer(config)) as server:
        assert tls_connect(server.port, pki.client_context()).data == b"hello"


def test_weak_rsa_key_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    now = utcnow()
    cert = self_signed(
        key,
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=90),
        common_name="weak",
    )
    path = tmp_path / "weak.pem"
    path.write_bytes(pem_pair(cert, key))
    # OpenSSL's security level refuses the key outright: a clear error, not a warning.
    message = config_error(path)
    assert "TLSConfig certfile" in message and "too small" in message


def test_expiring_certificate_warns(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    soon = pki.pair("soon", not_after=utcnow() + datetime.timedelta(days=3))
    with caplog.at_level(logging.WARNING, logger="securetcp.tls"):
        TLSConfig(*soon)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "expires in" in messages[0] and str(soon[0]) in messages[0]


# -- profiles and groups -------------------------------------------------------


def test_intermediate_profile(pki: PKI, pair: Pair) -> None:
    config = TLSConfig(*pair)
    assert not config.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert config.context.options & ssl.OP_NO_COMPRESSION
    with ServerThread(EchoServer(config)) as server:
        tls13 = tls_connect(server.port, pki.client_context())
        assert tls13.version == "TLSv1.3"
        client12 = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
        # The client's first choice wins (no server preference, as Mozilla advises).
        client12.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
        tls12 = tls_connect(server.port, client12)
        assert tls12.version == "TLSv1.2"
        assert tls12.cipher is not None and tls12.cipher[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, pki.client_context(maximum=ssl.TLSVersion.TLSv1_1))
        cbc_only = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
        cbc_only.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384")
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, cbc_only)
    offered = {c["name"] for c in config.context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert offered and all("GCM" in c or "CHACHA20" in c for c in offered)
    assert all(c.startswith("ECDHE-") for c in offered)


def test_modern_profile_is_tls13_only(pki: PKI, pair: Pair) -> None:
    config = TLSConfig(*pair, profile="modern")
    with ServerThread(EchoServer(config)) as server:
        assert tls_connect(server.port, pki.client_context()).version == "TLSv1.3"
        assert server.handled().version == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, pki.client_context(maximum=ssl.TLSVersion.TLSv1_2))
        server.wait_for_failures({"protocol": 1})


def handshake_ok(result: Any) -> bool:
    return "Protocol version:" in result.stderr


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_groups_offered_with_openssl_s_client(tmp_path: Path, version: str) -> None:
    # An RSA certificate, so that in TLS 1.2 only the key exchange depends on the groups.
    pki = PKI(tmp_path, key_type=trustme.KeyType.RSA)
    pair = pki.pair("server", "localhost", key_type=trustme.KeyType.RSA)
    with ServerThread(EchoServer(TLSConfig(*pair))) as server:
        for refused in ("secp521r1", "X448", "ffdhe2048"):
            assert not handshake_ok(s_client(server.port, version, "-groups", refused)), refused
        for group in ("X25519", "prime256v1", "secp384r1"):
            result = s_client(server.port, version, "-groups", group)
            assert handshake_ok(result), result.stderr
            (temp_key,) = [x for x in result.stderr.splitlines() if "Server Temp Key" in x]
            assert group in temp_key


def test_stock_context_would_accept_secp521r1(pair: Pair) -> None:
    """Control: the refusal above comes from TLSConfig, not from this OpenSSL."""
    stock = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stock.load_cert_chain(*pair)
    with ServerThread(EchoServer(stock)) as server:
        assert handshake_ok(s_client(server.port, "-groups", "secp521r1"))


def test_groups_python_client(pki: PKI, pair: Pair) -> None:
    with ServerThread(EchoServer(TLSConfig(*pair, profile="modern"))) as server:
        client = pki.client_context()
        client.set_ecdh_curve("secp521r1")
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, client)
        client = pki.client_context()
        # (Python 3.10's set_ecdh_curve knows only EC curves, not X25519.)
        client.set_ecdh_curve("prime256v1")
        assert tls_connect(server.port, client).data == b"hello"


def test_groups_set_through_this_python() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    assert _tls_groups.set_groups(context, MOZILLA_GROUPS) is True
    assert _tls_groups.groups_backend() in ("native", "ctypes")
    # x25519, secp256r1, secp384r1, read from the ClientHello this context sends.
    assert offered_groups(context) == [0x001D, 0x0017, 0x0018]


def offered_groups(context: ssl.SSLContext) -> list[int]:
    """The supported_groups extension of the ClientHello `context` sends.

    Parsed here, independently of securetcp: record and handshake headers,
    version, random, session id, cipher suites, compression, then extensions.
    """
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    pos = 5 + 4 + 2 + 32
    pos += 1 + hello[pos]  # session id
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        body = hello[pos + 4 : pos + 4 + size]
        if kind == 10:  # supported_groups: a 2-byte length, then 2-byte ids
            return [int.from_bytes(body[i : i + 2], "big") for i in range(2, len(body), 2)]
        pos += 4 + size
    raise AssertionError("no supported_groups extension")


# -- client certificates -------------------------------------------------------


def test_client_auth_required(pki: PKI, pair: Pair, tmp_path: Path) -> None:
    good = pki.pair("client", "client.example", common_name="svc-a")
    stranger = PKI(tmp_path / "other").pair("client", "client.example")
    config = TLSConfig(*pair, client_auth="required", client_ca=pki.ca_file)
    with ServerThread(EchoServer(config)) as server:
        for refused, cert in enumerate((None, stranger), 1):
            with pytest.raises((ssl.SSLError, OSError)):
                tls_connect(server.port, pki.client_context(cert))
            server.wait_for_failures({"certificate": refused})
        assert tls_connect(server.port, pki.client_context(good)).data == b"hello"
        identity = server.handled().identity
        assert identity is not None and identity.common_name == "svc-a"
        assert identity.dns_names == ("client.example",)


def test_client_auth_optional_with_ca_directory(pki: PKI, pair: Pair, tmp_path: Path) -> None:
    ca_dir = tmp_path / "client-cas"
    ca_dir.mkdir()
    (ca_dir / "ours.pem").write_bytes(pki.ca_file.read_bytes())
    good = pki.pair("client", "client.example")
    config = TLSConfig(*pair, client_auth="optional", client_ca=ca_dir)
    assert config.context.verify_mode == ssl.CERT_OPTIONAL
    with ServerThread(EchoServer(config)) as server:
        tls_connect(server.port, pki.client_context())
        assert server.handled().peer_certificate is None
        tls_connect(server.port, pki.client_context(good))
        assert server.handled().peer_certificate is not None


def test_authorize_is_exposed(pair: Pair) -> None:
    def allow(identity: Any) -> bool:
        return True

    config = TLSConfig(*pair, authorize=allow)
    tls = make_server_tls(config)
    assert tls is not None and tls.authorize is allow


# -- SNI and ALPN ---------------------------------------------------------------


@pytest.fixture
def sni_pairs(pki: PKI) -> dict[str, Pair]:
    return {
        "default": pki.pair("default", "default.example"),
        "a": pki.pair("a", "a.example"),
        "b": pki.pair("b", "b.example"),
        "wild": pki.pair("wild", "*.wild.example"),
    }


def sni_config(pairs: dict[str, Pair], **kwargs: Any) -> TLSConfig:
    combined = pairs["b"][0].with_name("b-combined.pem")
    combined.write_bytes(pairs["b"][0].read_bytes() + pairs["b"][1].read_bytes())
    return TLSConfig(
        *pairs["default"],
        sni={"a.example": pairs["a"], "B.Example.": combined, "*.wild.example": pairs["wild"]},
        **kwargs,
    )


def test_sni_picks_certificate(pki: PKI, sni_pairs: dict[str, Pair]) -> None:
    expected = {
        "a.example": "a",
        "b.example": "b",
        "x.wild.example": "wild",
        "unknown.example": "default",
        None: "default",
    }
    with ServerThread(EchoServer(sni_config(sni_pairs))) as server:
        for name, key in expected.items():
            client = pki.client_context()
            client.check_hostname = False
            result = tls_connect(server.port, client, server_hostname=name)
            assert serial_of(result.peer_der) == file_serial(sni_pairs[key][0]), name
            assert server.handled().server_name == name


def test_sni_strict_refuses_unknown_names(pki: PKI, sni_pairs: dict[str, Pair]) -> None:
    with ServerThread(EchoServer(sni_config(sni_pairs, sni_strict=True))) as server:
        with pytest.raises(ssl.SSLError) as info:
            tls_connect(server.port, pki.client_context(), server_hostname="unknown.example")
        assert "UNRECOGNIZED_NAME" in str(info.value.reason)
        # The server counts the refusal as an SNI failure (OpenSSL reports its callback).
        server.wait_for_failures({"sni": 1})
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, pki.client_context(), server_hostname="a.b.wild.example")
        server.wait_for_failures({"sni": 2})
        # The default certificate's own names and no-SNI clients are still served.
        assert tls_connect(server.port, pki.client_context(), "default.example").data == b"hello"
        client = pki.client_context()
        client.check_hostname = False
        assert tls_connect(server.port, client, server_hostname=None).data == b"hello"


def test_alpn_on_default_and_sni_contexts(pki: PKI, sni_pairs: dict[str, Pair]) -> None:
    config = sni_config(sni_pairs, alpn_protocols=["h2", "http/1.1"])
    with ServerThread(EchoServer(config)) as server:
        for name in ("default.example", "a.example"):
            client = pki.client_context()
            client.set_alpn_protocols(["http/1.1", "h2"])
            assert tls_connect(server.port, client, name).alpn == "h2"
            assert server.handled().alpn == "h2"
        client = pki.client_context()
        client.set_alpn_protocols(["http/1.1"])
        assert tls_connect(server.port, client, "a.example").alpn == "http/1.1"


# -- key log and tickets ---------------------------------------------------------


def test_keylog_file(pki: PKI, pair: Pair, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    with ServerThread(EchoServer(TLSConfig(*pair, keylog_file=keylog))) as server:
        tls_connect(server.port, pki.client_context())
        server.handled()
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_text()
    message = config_error(*pair, keylog_file=tmp_path / "no-dir" / "keys.log")
    assert "TLSConfig keylog_file" in message


def test_sslkeylogfile_env(
    pki: PKI, pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "env-keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    with ServerThread(EchoServer(TLSConfig(*pair))) as server:
        tls_connect(server.port, pki.client_context())
        server.handled()
    assert "SERVER_TRAFFIC_SECRET_0" in keylog.read_text()


@pytest.mark.parametrize("tickets", [True, False])
def test_session_tickets(pki: PKI, pair: Pair, tickets: bool) -> None:
    config = TLSConfig(*pair, session_tickets=tickets)
    assert bool(config.context.options & ssl.OP_NO_TICKET) is not tickets
    assert (config.context.num_tickets == 0) is not tickets
    with ServerThread(EchoServer(config)) as server:
        for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            result = tls_connect(server.port, pki.client_context(maximum=maximum))
            assert result.session is not None
            assert result.session.has_ticket is tickets, maximum


# -- reloading -------------------------------------------------------------------


def renew(pki: PKI, pair: Pair, *identities: str) -> int:
    """Write a new certificate and key over ``pair`` (atomic renames); its serial."""
    new_cert, new_key = pki.pair("renewed", *(identities or ("localhost",)))
    os.replace(new_key, pair[1])
    os.replace(new_cert, pair[0])
    return file_serial(pair[0])


def test_reload_by_hand(pki: PKI, pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    config = TLSConfig(*pair)
    old_serial = file_serial(pair[0])
    assert config.reload() is False  # nothing changed
    with ServerThread(EchoServer(config)) as server:
        assert serial_of(tls_connect(server.port, pki.client_context()).peer_der) == old_serial
        new_serial = renew(pki, pair)
        assert config.reload() is True
        assert config.reload() is False
        assert serial_of(tls_connect(server.port, pki.client_context()).peer_der) == new_serial


def test_broken_file_keeps_old_certificate(
    pki: PKI, pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    config = TLSConfig(*pair)
    serving = config.context
    pair[0].write_text("-----BEGIN CERTIFICATE-----\ntruncated")
    with caplog.at_level(logging.INFO, logger="securetcp.tls"):
        assert config.reload() is False
        for _ in range(5):  # what the periodic poll does while the file stays broken
            assert config.poll() is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "TLSConfig certfile" in errors[0].getMessage()
    assert str(pair[0]) in errors[0].getMessage()
    assert config.context is serving
    with ServerThread(EchoServer(config)) as server:
        assert tls_connect(server.port, pki.client_context()).data == b"hello"
    # A mismatched key is a new problem: one new error, still the old certificate.
    new_cert, _ = pki.pair("mismatch")
    os.replace(new_cert, pair[0])
    caplog.clear()
    assert config.poll() is False
    assert config.poll() is False
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert "does not match" in caplog.records[-1].getMessage()
    assert config.context is serving
    renew(pki, pair)
    assert config.reload() is True
    assert config.context is not serving


def test_reload_sni_certificate(pki: PKI, sni_pairs: dict[str, Pair]) -> None:
    config = sni_config(sni_pairs)
    new_serial = renew(pki, sni_pairs["a"], "a.example")
    assert config.reload() is True
    with ServerThread(EchoServer(config)) as server:
        result = tls_connect(server.port, pki.client_context(), "a.example")
        assert serial_of(result.peer_der) == new_serial


class _Waiter(logging.Handler):
    """Sets an asyncio.Event when a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_polling_picks_up_renewal(pki: PKI, pair: Pair) -> None:
    config = TLSConfig(*pair, reload_interval=0.02)
    old = config.context
    logger = logging.getLogger("securetcp.tls")
    reloaded, failed = _Waiter("reloaded"), _Waiter("reload failed")
    logger.addHandler(reloaded)
    logger.addHandler(failed)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        config.start_reloading()
        renew(pki, pair)
        await asyncio.wait_for(reloaded.event.wait(), 5)
        assert config.context is not old
        pair[1].write_text("garbage")
        await asyncio.wait_for(failed.event.wait(), 5)
    finally:
        config.stop_reloading()
        logger.removeHandler(reloaded)
        logger.removeHandler(failed)
        logger.setLevel(old_level)
    assert not config.reloading


async def test_no_polling_without_interval(pair: Pair) -> None:
    config = TLSConfig(*pair)
    config.start_reloading()
    assert not config.reloading
    config.stop_reloading()
