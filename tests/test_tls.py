"""Tests for dict ssl_options, ssl_options_to_context and make_server_tls."""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from certbuilder import PKI, encrypt_key, leaf_of, utcnow
from cryptography.hazmat.primitives import serialization
from servers import EchoServer, ServerThread, tls_connect

from securetcp.tls import (
    SSL_OPTIONS_KEYS,
    ServerTLS,
    SSLOptionsError,
    TLSConfig,
    make_server_tls,
    ssl_options_to_context,
)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest.fixture
def pair(pki: PKI) -> tuple[Path, Path]:
    return pki.pair("server", "localhost")


def options(pair: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    return {"certfile": str(pair[0]), "keyfile": str(pair[1]), **extra}


def error_of(ssl_options: Any) -> str:
    with pytest.raises(SSLOptionsError) as info:
        make_server_tls(ssl_options)
    return str(info.value)


# -- validation errors ---------------------------------------------------------


def test_unknown_key_lists_valid_keys(pair: tuple[Path, Path]) -> None:
    message = error_of(options(pair, cert_file="x"))
    assert "'cert_file'" in message
    for key in SSL_OPTIONS_KEYS:
        assert key in message


def test_missing_certfile() -> None:
    assert "'certfile' is required" in error_of({"keyfile": "server.key"})


def test_certfile_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "missing.pem"
    message = error_of({"certfile": str(path)})
    assert "ssl_options['certfile']" in message
    assert str(path) in message and "does not exist" in message


def test_certfile_is_a_directory(tmp_path: Path) -> None:
    message = error_of({"certfile": str(tmp_path)})
    assert "ssl_options['certfile']" in message and "is a directory" in message


def test_certfile_without_pem_certificate(pair: tuple[Path, Path]) -> None:
    message = error_of({"certfile": str(pair[1]), "keyfile": str(pair[1])})
    assert "ssl_options['certfile']" in message and "no PEM certificate" in message
    assert str(pair[1]) in message


def test_keyfile_missing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    message = error_of(options(pair, keyfile=str(tmp_path / "nope.key")))
    assert "ssl_options['keyfile']" in message and "does not exist" in message


def test_key_in_certfile_missing(pair: tuple[Path, Path]) -> None:
    message = error_of({"certfile": str(pair[0])})
    assert "ssl_options['certfile']" in message and "no PEM private key" in message


def test_key_does_not_match(pki: PKI, pair: tuple[Path, Path]) -> None:
    _, other_key = pki.pair("other")
    message = error_of(options(pair, keyfile=str(other_key)))
    assert "ssl_options['keyfile']" in message and "does not match" in message
    assert str(other_key) in message and str(pair[0]) in message


def test_key_needs_a_password(pair: tuple[Path, Path], tmp_path: Path) -> None:
    encrypted = encrypt_key(
        pair[1],
        b"pw",
        out=tmp_path / "enc.key",
        key_format=serialization.PrivateFormat.TraditionalOpenSSL,
    )
    message = error_of(options(pair, keyfile=str(encrypted)))
    assert "ssl_options['keyfile']" in message and "needs a password" in message


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        ({"not_before": -20, "not_after": -10}, "expired on"),
        ({"not_before": 10, "not_after": 20}, "not valid until"),
    ],
)
def test_certificate_out_of_validity(pki: PKI, shift: dict[str, int], expected: str) -> None:
    now = utcnow()
    dates = {k: now + datetime.timedelta(days=v) for k, v in shift.items()}
    bad = pki.pair("dated", "localhost", **dates)
    message = error_of(options(bad))
    assert "ssl_options['certfile']" in message and expected in message
    assert str(bad[0]) in message


@pytest.mark.parametrize("value", [7, "required", True, None])
def test_bad_cert_reqs(pair: tuple[Path, Path], pki: PKI, value: object) -> None:
    message = error_of(options(pair, cert_reqs=value, ca_certs=str(pki.ca_file)))
    assert "ssl_options['cert_reqs']" in message and "CERT_REQUIRED" in message


def test_cert_reqs_needs_ca_certs(pair: tuple[Path, Path]) -> None:
    message = error_of(options(pair, cert_reqs=ssl.CERT_REQUIRED))
    assert "ssl_options['ca_certs']" in message


def test_ca_certs_problems(pair: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "ca-missing.pem"
    message = error_of(options(pair, ca_certs=str(missing)))
    assert "ssl_options['ca_certs']" in message and str(missing) in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no PEM certificate" in error_of(options(pair, ca_certs=str(empty)))


def test_bad_ciphers(pair: tuple[Path, Path]) -> None:
    message = error_of(options(pair, ciphers="NOT-A-CIPHER"))
    assert "ssl_options['ciphers']" in message and "NOT-A-CIPHER" in message


def test_bad_ssl_version(pair: tuple[Path, Path]) -> None:
    message = error_of(options(pair, ssl_version=ssl.PROTOCOL_TLS_CLIENT))
    assert "ssl_options['ssl_version']" in message


def test_error_is_a_value_error() -> None:
    assert issubclass(SSLOptionsError, ValueError)


# -- working contexts ----------------------------------------------------------


def test_dict_context_serves_tls(pki: PKI, pair: tuple[Path, Path]) -> None:
    context = ssl_options_to_context(options(pair))
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    with ServerThread(EchoServer(context)) as server:
        result = tls_connect(server.port, pki.client_context())
        assert result.data == b"hello"
        assert (
            leaf_of(result.peer_der).serial_number
            == leaf_of(ssl.PEM_cert_to_DER_cert(pair[0].read_text())).serial_number
        )
        assert server.handled().version == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            tls_connect(server.port, pki.client_context(maximum=ssl.TLSVersion.TLSv1_1))
        server.wait_for_failures({"protocol": 1})


def test_dict_ciphers_are_applied(pki: PKI, pair: tuple[Path, Path]) -> None:
    context = ssl_options_to_context(options(pair, ciphers="ECDHE+AESGCM"))
    with ServerThread(EchoServer(context)) as server:
        client = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
        result = tls_connect(server.port, client)
        assert result.cipher is not None and "GCM" in result.cipher[0]


def test_dict_client_certificates(pki: PKI, pair: tuple[Path, Path]) -> None:
    client_pair = pki.pair("client", "client.example")
    context = ssl_options_to_context(
        options(pair, cert_reqs=ssl.CERT_REQUIRED, ca_certs=str(pki.ca_file))
    )
    assert context.verify_mode == ssl.CERT_REQUIRED
    with ServerThread(EchoServer(context)) as server:
        assert tls_connect(server.port, pki.client_context(client_pair)).data == b"hello"
        identity = server.handled().identity
        assert identity is not None and identity.dns_names == ("client.example",)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(server.port, pki.client_context())
        server.wait_for_failures({"certificate": 1})


def test_dict_ca_certs_directory(pki: PKI, pair: tuple[Path, Path], tmp_path: Path) -> None:
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(pki.ca_file.read_bytes())
    (ca_dir / "README").write_text("not a certificate")
    context = ssl_options_to_context(
        options(pair, cert_reqs=ssl.CERT_OPTIONAL, ca_certs=str(ca_dir))
    )
    assert len(context.get_ca_certs()) == 1


def test_dict_honours_sslkeylogfile(
    pki: PKI, pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    context = ssl_options_to_context(options(pair))
    with ServerThread(EchoServer(context)) as server:
        tls_connect(server.port, pki.client_context())
        server.handled()
    assert "SERVER_TRAFFIC_SECRET_0" in keylog.read_text()


def test_dict_warns_about_expiring_certificate(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    soon = pki.pair("soon", "localhost", not_after=utcnow() + datetime.timedelta(days=5))
    with caplog.at_level(logging.WARNING, logger="securetcp.tls"):
        ssl_options_to_context(options(soon))
    (record,) = [r for r in caplog.records if r.name == "securetcp.tls"]
    assert record.levelno == logging.WARNING
    assert "expires in" in record.getMessage() and str(soon[0]) in record.getMessage()


# -- ssl_options_to_context / make_server_tls ---------------------------------


def test_ssl_context_passes_through() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ssl_options_to_context(context) is context
    tls = make_server_tls(context)
    assert isinstance(tls, ServerTLS)
    assert tls.context is context
    assert tls.authorize is None
    assert tls.reload() is False
    tls.start_reloading()
    tls.stop_reloading()


def test_make_server_tls_none_and_bad_types() -> None:
    assert make_server_tls(None) is None
    with pytest.raises(TypeError):
        make_server_tls(["certfile"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ssl_options_to_context("server.pem")  # type: ignore[arg-type]


def test_make_server_tls_refuses_client_context() -> None:
    message = error_of(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    assert "PROTOCOL_TLS_SERVER" in message


def test_make_server_tls_dict_and_tlsconfig(pair: tuple[Path, Path]) -> None:
    tls = make_server_tls(options(pair))
    assert isinstance(tls, ServerTLS)
    assert tls.context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert tls.reload() is False
    config = TLSConfig(pair[0], pair[1])
    assert make_server_tls(config) is config
    assert ssl_options_to_context(config) is config.context
