"""Regression tests for the engine-hardening issue: each defect a review and
real use found, and the safe defaults against hostile peers.

Every test here failed on the engine before the fix it names.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import datetime
import gc
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from servers import (
    HOST,
    EchoServer,
    close_writer,
    open_tls,
    raw_connect,
    serving,
    until,
    without_cycle_collector,
)

from securetcp import (
    IOStream,
    SSLIOStream,
    SSLOptionsError,
    StreamBufferFullError,
    StreamClosedError,
    TCPServer,
    TLSConfig,
    _openssl,
    _tls_groups,
)
from securetcp.iostream import DEFAULT_MAX_BUFFER_SIZE, DEFAULT_MAX_WRITE_BUFFER_SIZE
from securetcp.tls import HYBRID_GROUPS, MOZILLA_GROUPS, profile_groups
from securetcp.tls.files import load_pair

MiB = 1024 * 1024


def read_all_blocking(
    port: int,
    context: ssl.SSLContext | None,
    size: int,
    pause: float = 0.0,
    start: threading.Event | None = None,
) -> bytes:
    """Connect, wait for `start` (if given), then read `size` bytes in 64 KiB
    steps, pausing between them (a steady reader); a blocking client, for a
    thread (Python 3.10's asyncio TLS transport fails when the server closes
    while its reading is paused)."""
    sock = socket.create_connection((HOST, port), timeout=20)
    conn = sock if context is None else context.wrap_socket(sock, server_hostname="localhost")
    data = bytearray()
    with conn:
        if start is not None:
            start.wait(20)
        while len(data) < size:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if pause:
                time.sleep(pause)  # the reader's pace, part of the scenario
        # What comes after the payload: nothing (the server closes).
        data += conn.recv(65536) if len(data) >= size else b""
    return bytes(data)


# -- 1. idle_timeout and long TLS writes -------------------------------------------


async def test_idle_timeout_spares_a_tls_transfer_in_progress(pki: PKI, no_fd_leak: None) -> None:
    """A 16 MiB write to a steady reader outlives an idle_timeout of 1 s.

    The whole buffer used to go to one SSL_write, so bytes_sent did not move
    until it all went out and the idle check cut the transfer (~11.7 MiB)."""
    payload = os.urandom(16 * MiB)
    progress: list[int] = []

    class Sender(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            future = stream.write(payload)
            while not future.done():
                progress.append(stream.bytes_sent)
                await asyncio.wait([future], timeout=0.05)
            await future
            stream.close()

    # 1 s, not less: the reader thread shares this process (and a loaded
    # machine) with the server, and a pause of it is not what is tested.
    server = Sender(pki.ssl_options(), idle_timeout=1.0)
    async with serving(server) as port:
        # ~2 ms per read of at most one 16 KiB record: the transfer takes well
        # over idle_timeout.
        received = await asyncio.wait_for(
            asyncio.to_thread(read_all_blocking, port, pki.client_context(), len(payload), 0.002),
            60,
        )
    assert len(received) == len(payload) and received == payload
    # Progress was visible while the write was in flight.
    assert len(set(progress)) > 3
    assert server.stats.bytes_sent == len(payload)


# -- 2. a client certificate cryptography refuses ----------------------------------


def unparseable_client_cert(pki: PKI, directory: Path) -> tuple[Path, Path]:
    """A client certificate OpenSSL accepts but cryptography cannot parse: its
    subjectAltName holds a 5-byte IP address (valid DER, invalid content)."""
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    bad_san = x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, bytes.fromhex("3007870501020304ff")
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd-client")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(bad_san, critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_file, key_file = directory / "odd.pem", directory / "odd.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_unparseable_client_certificate_is_closed_and_counted(
    pki: PKI, tmp_path: Path, no_fd_leak: None
) -> None:
    cert_file, key_file = unparseable_client_cert(pki, tmp_path)
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    config = TLSConfig(
        pki.cert_file,
        pki.key_file,
        client_auth="required",
        client_ca=pki.ca_file,
        authorize=lambda identity: True,
    )
    server = EchoServer(config)
    async with serving(server) as port:
        context = pki.client_context()
        context.load_cert_chain(cert_file, key_file)
        reader, writer = await open_tls(port, context)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        finally:
            await close_writer(writer)
        await until(lambda: server.stats.active == 0)
        stats = server.stats
    assert stats.failures == {"certificate": 1}
    assert stats.handshakes == 1
    assert server.streams == []  # handle_stream never saw it
    assert loop_errors == []


def live_tls_streams() -> int:
    """How many SSLIOStream objects exist (tracked ones, including any in cycles)."""
    return sum(isinstance(o, SSLIOStream) for o in gc.get_objects())


async def test_a_connection_refused_for_its_certificate_is_freed_at_once(
    pki: PKI, tmp_path: Path, no_fd_leak: None
) -> None:
    # The refusal's ValueError comes from the server's own frames; kept on the
    # stream with its traceback, it would hold the stream (and its OpenSSL
    # connection) in a reference cycle until the cycle collector ran.
    cert_file, key_file = unparseable_client_cert(pki, tmp_path)
    config = TLSConfig(
        pki.cert_file,
        pki.key_file,
        client_auth="required",
        client_ca=pki.ca_file,
        authorize=lambda identity: True,
    )
    server = EchoServer(config)
    context = pki.client_context()
    context.load_cert_chain(cert_file, key_file)
    with without_cycle_collector():
        async with serving(server) as port:
            before = live_tls_streams()
            for _ in range(3):
                reader, writer = await open_tls(port, context)
                try:
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                finally:
                    await close_writer(writer)
            await until(lambda: server.stats.failures == {"certificate": 3})
            await until(
                lambda: live_tls_streams() <= before,
                message="every refused stream freed, none held by a reference cycle",
            )


# -- 3. writes of wide-item buffers --------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_write_of_wide_memoryview_behind_a_blocked_write(
    kind: str, pki: PKI, no_fd_leak: None
) -> None:
    """memoryview(array("I")) queued behind a blocked write: every byte arrives,
    and its future resolves only once they did (lengths were in items)."""
    first = os.urandom(8 * MiB)
    items = array.array("I", os.urandom(12 * MiB))
    expected = first + items.tobytes()
    futures: list[asyncio.Future[None]] = []
    early: list[bool] = []

    class Sender(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            futures.append(stream.write(first))
            futures.append(stream.write(memoryview(items)))
            early.append(futures[-1].done())
            await asyncio.gather(*futures)
            stream.close()

    # (Un-awaited writes beyond the default write limit, on purpose.)
    server = Sender(pki.ssl_options() if kind == "tls" else None, max_write_buffer_size=64 * MiB)
    async with serving(server) as port:
        context = pki.client_context() if kind == "tls" else None
        gate = threading.Event()  # both writes queued before any reading
        task = asyncio.ensure_future(
            asyncio.to_thread(read_all_blocking, port, context, len(expected), 0.0, gate)
        )
        await until(lambda: bool(early), timeout=20)
        gate.set()
        received = await asyncio.wait_for(task, 60)
    assert early == [False]
    assert len(received) == len(expected) and received == expected


def test_write_drops_empty_buffers_and_refuses_non_contiguous() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        stream = IOStream(a)
        try:
            assert stream.write(memoryview(array.array("I"))).done()
            assert stream.write(b"").done()
            with pytest.raises(TypeError):
                stream.write(memoryview(b"abcdef")[::2])
        finally:
            stream.close()
            b.close()

    asyncio.run(main())


# -- 4. a user's SSLContext with its own sni_callback --------------------------------


async def test_user_sni_callback_sees_an_ssl_object(pki: PKI, no_fd_leak: None) -> None:
    """An SSLContext is used as given: its sni_callback gets an SSLObject (with
    server_side and version()), not securetcp's stream, and may switch context."""
    other = TLSConfig(pki.cert_file, pki.key_file).context
    seen: list[tuple[type, bool, str | None]] = []

    def callback(conn: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        seen.append((type(conn), conn.server_side, server_name))
        conn.version()  # what a user's callback may well call
        conn.context = other

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    context.sni_callback = callback
    server = EchoServer(context)
    async with serving(server) as port:
        reader, writer = await open_tls(port, pki.client_context())
        try:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        finally:
            await close_writer(writer)
    assert seen == [(ssl.SSLObject, True, "localhost")]
    assert server.stats.failures == {}


# -- 5. the peer's close noticed with no read pending -------------------------------


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_close_callback_fires_without_a_pending_read(
    kind: str, pki: PKI, no_fd_leak: None
) -> None:
    """A handler waiting on something else learns at once that its peer left."""
    closed = asyncio.Event()
    never = asyncio.Event()

    class Waiter(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            stream.set_close_callback(closed.set)
            await stream.write(b"ready")
            await never.wait()  # e.g. a proxy waiting on its upstream

    server = Waiter(pki.ssl_options() if kind == "tls" else None)
    async with serving(server, close_timeout=0.5) as port:
        if kind == "tls":
            reader, writer = await open_tls(port, pki.client_context())
        else:
            reader, writer = await asyncio.open_connection(HOST, port)
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"ready"
        await close_writer(writer)
        await asyncio.wait_for(closed.wait(), 5)
        await until(lambda: server.stats.active == 0)


# -- 6. an unreadable file in a CA directory ------------------------------------------


def test_unreadable_file_in_ca_directory_fails_construction(pki: PKI, tmp_path: Path) -> None:
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    shutil.copy(pki.ca_file, ca_dir / "good.pem")
    bad = ca_dir / "bad.pem"
    if os.geteuid() == 0:
        # Root reads any file; a read of /proc/self/mem at offset 0 fails (EIO).
        os.symlink("/proc/self/mem", bad)
    else:
        bad.write_bytes(pki.ca_file.read_bytes())
        bad.chmod(0)
    with pytest.raises(SSLOptionsError) as info:
        TLSConfig(pki.cert_file, pki.key_file, client_auth="required", client_ca=ca_dir)
    assert "TLSConfig client_ca" in str(info.value)
    assert str(bad) in str(info.value)


# -- 7. reload: half-way renewals, secrets out of reprs -------------------------------


def test_renewal_caught_half_way_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Certificate and key replaced one after the other, a poll between them:
    no error, the old pair serves, and the new pair once both are there."""
    import trustme

    ca = trustme.CA()
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"

    def write(leaf: trustme.LeafCert, what: str) -> None:
        if what == "cert":
            leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        else:
            leaf.private_key_pem.write_to_path(str(key_file))

    old = ca.issue_cert("localhost")
    write(old, "cert")
    write(old, "key")
    config = TLSConfig(cert_file, key_file, reload_interval=60)
    serving_context = config.context
    new = ca.issue_cert("localhost")
    with caplog.at_level(logging.INFO, logger="securetcp.tls"):
        write(new, "cert")  # the renewer is half-way...
        assert config.poll() is False
        assert config.poll() is False  # (still half-way: settled, checked, refused)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1  # a state that stays broken is logged, once
        caplog.clear()
        write(new, "key")  # ...and done
        assert config.poll() is False  # changed since the last poll: let it settle
        assert config.poll() is True
    assert config.context is not serving_context
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_renewal_in_progress_between_polls_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trustme

    ca = trustme.CA()
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    old = ca.issue_cert("localhost")
    old.cert_chain_pems[0].write_to_path(str(cert_file))
    old.private_key_pem.write_to_path(str(key_file))
    config = TLSConfig(cert_file, key_file, reload_interval=60)
    new = ca.issue_cert("localhost")
    with caplog.at_level(logging.INFO, logger="securetcp.tls"):
        new.cert_chain_pems[0].write_to_path(str(cert_file))
        assert config.poll() is False  # the poll lands between the two writes
        new.private_key_pem.write_to_path(str(key_file))
        assert config.poll() is False
        assert config.poll() is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_key_password_is_not_in_reprs(pki: PKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.key_file.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter2-secret"),
        )
    )
    pair = load_pair(pki.cert_file, encrypted, "hunter2-secret", "certfile", "keyfile")
    config = TLSConfig(pki.cert_file, encrypted, password="hunter2-secret")
    assert "hunter2" not in repr(pair)
    assert "hunter2" not in repr(config)


# -- 8. the ctypes paths: proven before use, observable, GIL kept --------------------


def test_memory_probe_answers_instead_of_crashing() -> None:
    anchor = bytearray(4096)
    address = ctypes.addressof((ctypes.c_char * len(anchor)).from_buffer(anchor))
    assert _openssl.readable(address, 1024)
    assert not _openssl.readable(0)
    assert not _openssl.readable(8)  # the first page is never mapped
    assert not _openssl.readable(address + 1)  # not pointer-aligned


def test_client_hello_parser_is_bounded() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    hello = _client_hello(context)
    assert _tls_groups._supported_groups(hello)  # sanity: a real hello parses
    for cut in (1, 10, 44, 60, len(hello) // 2, len(hello) - 3):
        with pytest.raises(ValueError):
            _tls_groups._supported_groups(hello[:cut])


def _client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_groups_path_is_observable_and_functions_keep_the_gil() -> None:
    assert _tls_groups.groups_backend() in ("native", "ctypes", "fallback")
    lib = _openssl.libssl()
    if lib is None:
        pytest.skip("no ctypes path on this Python")
    assert _tls_groups.groups_backend() in ("native", "ctypes")
    # PyDLL functions hold the GIL (CDLL ones release it on every call).
    assert lib.has_pending._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


# -- 9. post-quantum hybrid groups stay first -----------------------------------------


def test_profile_groups_keep_local_hybrid_groups_first() -> None:
    hybrids = tuple(g for g in HYBRID_GROUPS if _tls_groups.group_available(g))
    assert profile_groups() == hybrids + MOZILLA_GROUPS
    assert not _tls_groups.group_available("NoSuchGroup123")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
async def test_hybrid_group_negotiated_where_openssl_has_it(pki: PKI) -> None:
    if not _tls_groups.group_available("X25519MLKEM768"):
        pytest.skip(f"{ssl.OPENSSL_VERSION} has no X25519MLKEM768 (OpenSSL 3.5+)")
    server = EchoServer(TLSConfig(pki.cert_file, pki.key_file))
    async with serving(server) as port:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"{HOST}:{port}", "-groups", "X25519MLKEM768",
            "-CAfile", str(pki.ca_file), "-brief",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert b"X25519MLKEM768" in out


# -- safe defaults against hostile peers ----------------------------------------------


def test_default_limits_are_a_few_mib() -> None:
    assert 8 * MiB >= DEFAULT_MAX_BUFFER_SIZE
    assert 8 * MiB >= DEFAULT_MAX_WRITE_BUFFER_SIZE


async def test_write_limit_refuses_unbounded_queueing(pki: PKI, no_fd_leak: None) -> None:
    """A handler that writes without awaiting to a client that never reads is
    stopped by the write limit (and the connection counted as rejected)."""
    outcome: list[BaseException] = []

    class Firehose(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            try:
                while True:
                    stream.write(bytes(65536))
                    await asyncio.sleep(0)
            except StreamBufferFullError as e:
                outcome.append(e)
                stream.close(e)

    server = Firehose(pki.ssl_options(), max_write_buffer_size=1 * MiB)
    async with serving(server) as port:
        sock = socket.create_connection((HOST, port), timeout=10)
        # A blocking client that never reads (no asyncio transport to race with).
        tls = await asyncio.to_thread(
            pki.client_context().wrap_socket, sock, server_hostname="localhost"
        )
        try:
            await until(lambda: bool(outcome))
            await until(lambda: server.stats.active == 0)
        finally:
            tls.close()
    assert "max_write_buffer_size" in str(outcome[0])
    assert server.stats.rejected == 1


async def test_concurrent_handshakes_are_capped(pki: PKI, no_fd_leak: None) -> None:
    """Beyond max_concurrent_handshakes accepting pauses; it resumes as slots free."""
    server = EchoServer(pki.ssl_options(), max_concurrent_handshakes=2)
    async with serving(server) as port:
        stalled = [await raw_connect(port) for _ in range(2)]
        try:
            for sock in stalled:
                sock.send(b"\x16\x03\x01")  # a ClientHello that never completes
            await until(lambda: server.stats.accepted == 2)
            third = asyncio.ensure_future(open_tls(port, pki.client_context()))
            await asyncio.wait([third], timeout=0.3)
            assert not third.done() and server.stats.accepted == 2
            stalled[0].close()  # a slot frees: the waiting client is served
            reader, writer = await asyncio.wait_for(third, 10)
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            await close_writer(writer)
        finally:
            for sock in stalled:
                sock.close()
        await until(lambda: server.stats.active == 0)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
async def test_tls_listeners_defer_accept(pki: PKI, no_fd_leak: None) -> None:
    """A connection that never speaks is not handed over: no descriptor, no slot."""
    server = EchoServer(pki.ssl_options(), handshake_timeout=5)
    plain = EchoServer()
    async with serving(server) as port, serving(plain):
        listener = server.sockets[0]
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert plain.sockets[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        silent = await raw_connect(port)
        try:
            reader, writer = await open_tls(port, pki.client_context())
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            await close_writer(writer)
            assert server.stats.accepted == 1  # the silent one is still the kernel's
        finally:
            silent.close()


async def test_idle_and_buffer_limit_closes_count_as_rejected(pki: PKI, no_fd_leak: None) -> None:
    class Liner(TCPServer):
        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            try:
                await stream.read_until(b"\n")
            except (StreamClosedError, StreamBufferFullError):
                pass

    server = Liner(pki.ssl_options(), max_buffer_size=64 * 1024, idle_timeout=0.2)
    async with serving(server) as port:
        flooder = await open_tls(port, pki.client_context())
        idler = await open_tls(port, pki.client_context())
        try:
            flooder[1].write(b"x" * 200_000)  # a line longer than max_buffer_size
            await until(lambda: server.stats.rejected >= 2, timeout=10)
        finally:
            await close_writer(flooder[1])
            await close_writer(idler[1])
    assert server.stats.rejected == 2


# -- profiles: one session ticket per handshake ---------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
async def test_tlsconfig_sends_one_session_ticket(pki: PKI) -> None:
    """One TLS 1.3 ticket per handshake (what browsers use), not OpenSSL's two."""
    server = EchoServer(TLSConfig(pki.cert_file, pki.key_file))
    async with serving(server) as port:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", "-msg",
            "-CAfile", str(pki.ca_file),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"one line\n")  # its echo comes after the tickets
        out = b""
        try:
            while b"\none line" not in out:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), 20)
                assert chunk, out.decode(errors="replace")
                out += chunk
        finally:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert text.count("NewSessionTicket") == 1, text


# -- a refused client sees the alert, not a reset -------------------------------------


async def test_refused_tls13_client_reads_the_alert_not_a_reset(pki: PKI, no_fd_leak: None) -> None:
    """TLS 1.3: the client's handshake ends before the server refuses its
    (missing) certificate, so the client has sent data the server never
    reads. Closing with it unread sends a reset that overtakes the alert."""
    config = TLSConfig(pki.cert_file, pki.key_file, client_auth="required", client_ca=pki.ca_file)
    server = EchoServer(config)

    refused = threading.Event()

    def client(port: int) -> BaseException | None:
        sock = socket.create_connection((HOST, port), timeout=10)
        with pki.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")  # sent before the refusal
            refused.wait(10)
            try:
                tls.sendall(b"more\r\n")  # what a client writes next
                tls.recv(100)
            except (OSError, ssl.SSLError) as e:
                return e
        return None

    async with serving(server) as port:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, client, port)
        await until(lambda: server.stats.failures.get("certificate", 0) == 1)
        refused.set()
        error = await asyncio.wait_for(future, 20)
        assert isinstance(error, ssl.SSLError), repr(error)
        assert "CERTIFICATE_REQUIRED" in str(error)
        await until(lambda: server.stats.active == 0)


# -- half-close: the answer after the client's end of stream --------------------------


def tls_half_close_exchange(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    """A TLS client that sends `payload`, then close_notify, then reads the answer
    until the server's close_notify (an SSLObject over memory BIOs: the stdlib's
    sockets cannot half-close TLS)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection((HOST, port), timeout=10) as sock:

        def flush() -> None:
            data = outgoing.read()
            if data:
                sock.sendall(data)

        def pump() -> bool:
            data = sock.recv(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                pump()
        flush()
        tls.write(payload)
        try:
            tls.unwrap()  # sends close_notify, then wants the server's
        except ssl.SSLWantReadError:
            pass
        flush()
        answer = bytearray()
        while True:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                if not pump():
                    break
            except ssl.SSLZeroReturnError:
                break  # the server's close_notify: the answer is complete
    return bytes(answer)


@pytest.mark.parametrize("size", [65536, 200_000])
@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_half_close_finishes_the_echo(
    kind: str, size: int, pki: PKI, no_fd_leak: None
) -> None:
    """A client that half-closes after its request gets every byte back (the
    echo used to close at the end of stream, losing what it had just read)."""
    payload = os.urandom(size)
    server = EchoServer(pki.ssl_options() if kind == "tls" else None)
    async with serving(server) as port:
        for _ in range(5):
            if kind == "plain":
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(payload)
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
            else:
                answer = await asyncio.wait_for(
                    asyncio.to_thread(tls_half_close_exchange, port, pki.client_context(), payload),
                    20,
                )
            assert len(answer) == size and answer == payload
        await until(lambda: server.stats.active == 0)


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_shutdown_write_then_keep_reading(kind: str, pki: PKI, no_fd_leak: None) -> None:
    """shutdown_write() ends our direction (FIN / close_notify); reading goes on
    until the peer ends too, which closes the stream (cleanly: no error)."""
    heard: list[bytes] = []
    errors: list[BaseException | None] = []

    class Answerer(TCPServer):
        half_close = True

        async def handle_stream(self, stream: IOStream, address: Any) -> None:
            try:
                await stream.write(b"bye\n")
                await stream.shutdown_write()
                with pytest.raises(RuntimeError):
                    stream.write(b"too late")
                try:
                    heard.append(await stream.read_until(b"\n"))
                    await stream.read_bytes(1)
                except StreamClosedError:
                    pass  # the peer's end of stream, after ours: the stream closed
                errors.append(stream.error)
                assert stream.closed()
            finally:
                stream.close()

    server = Answerer(pki.ssl_options() if kind == "tls" else None)
    async with serving(server) as port:
        if kind == "tls":
            # (asyncio's TLS client answers close_notify by closing: no more data.)
            reader, writer = await open_tls(port, pki.client_context())
        else:
            reader, writer = await asyncio.open_connection(HOST, port)
        assert await asyncio.wait_for(reader.read(), 10) == b"bye\n"  # then end of stream
        if kind == "plain":
            writer.write(b"still listening?\n")
            writer.write_eof()
        await until(lambda: bool(errors))
        await close_writer(writer)
        await until(lambda: server.stats.active == 0)
    assert heard == ([b"still listening?\n"] if kind == "plain" else [])
    assert errors == [None]
