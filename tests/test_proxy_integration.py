"""securetcp's proxy and PROXY protocol against real peers: HAProxy, stunnel, openssl.

- HAProxy (``mode tcp``, ``send-proxy-v2``) in front of securetcp: the server
  sees the client's real address;
- ``securetcp proxy --send-proxy v2`` in front of HAProxy (``accept-proxy``):
  HAProxy logs the original client address;
- ``securetcp proxy`` terminating TLS for ``openssl s_client`` and a Python
  client, and re-originating TLS to ``securetcp echo`` and to stunnel (with
  mutual TLS);
- faults: upstream down, an upstream that never answers the TLS handshake,
  resets on either side; the proxy process keeps serving and its descriptor
  count comes back to where it was.

Every process gets dynamic ports, bounded timeouts, and is killed at the end.
A peer's tests skip (with the reason) only when its binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI
from servers import HOST, ROOT, EchoServer, close_writer, open_tls, until, whole_lines

from securetcp.iostream import IOStream, StreamClosedError
from securetcp.tcpserver import TCPServer

HAPROXY = shutil.which("haproxy")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
OPENSSL = shutil.which("openssl")

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
needs_stunnel = pytest.mark.skipif(STUNNEL is None, reason="stunnel4 is not installed")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
needs_proxy_protocol = pytest.mark.skipif(
    "proxy_protocol" not in inspect.signature(TCPServer.__init__).parameters,
    reason="TCPServer(proxy_protocol=...) is not implemented yet",
)

START_TIMEOUT = 15.0
#: How `securetcp echo` and `securetcp proxy` announce their sockets.
ANNOUNCED = re.compile(r" on 127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------- processes


def free_port() -> int:
    """A loopback port that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Process:
    """A peer process with its output in files; killed (and reaped) at the end."""

    def __init__(self, argv: list[str], directory: Path, name: str) -> None:
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=directory, env=env
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    async def wait_listening(self, port: int) -> None:
        """Poll until `port` accepts connections; fail if the process exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"not listening on {port}:\n{self.output()}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    async def announced_port(self) -> int:
        """The port a securetcp command says it listens on (started with port 0)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self.out.read_text(errors="replace")
            # Whole lines only: the port of a line still being written may be cut short.
            match = ANNOUNCED.search(whole_lines(text))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no listening address announced:\n{self.output()}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def process(argv: list[str], directory: Path, name: str) -> Iterator[Process]:
    peer = Process(argv, directory, name)
    try:
        yield peer
    finally:
        peer.stop()


def securetcp(*args: str) -> list[str]:
    return [sys.executable, "-m", "securetcp", *args]


def haproxy_config(
    path: Path, listen: int, server: int, *, accept_proxy: bool = False, send_proxy: bool = False
) -> Path:
    path.write_text(
        f"""
global
    nbthread 1
    log stdout format raw local0

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend front
    bind {HOST}:{listen}{" accept-proxy" if accept_proxy else ""}
    log-format "client=%ci:%cp frontend=%fi:%fp"
    default_backend back

backend back
    server upstream {HOST}:{server}{" send-proxy-v2" if send_proxy else ""}
"""
    )
    return path


@contextlib.asynccontextmanager
async def running(server: TCPServer, port: int = 0) -> AsyncIterator[int]:
    server.listen(port, HOST)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await server.close(timeout=2.0)


async def exchange(port: int, payload: bytes, context: ssl.SSLContext | None = None) -> bytes:
    if context is None:
        reader, writer = await asyncio.open_connection(HOST, port)
    else:
        reader, writer = await open_tls(port, context)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        await close_writer(writer)


def pki_dir(pki: PKI) -> str:
    """The PKI's directory: ca.pem, server.pem/.key, client.pem/.key, as `certs init` writes."""
    return str(pki.ca_file.parent)


# -------------------------------------------------------- HAProxy in front


class AddressEcho(EchoServer):
    """The test echo server (it records each connection's address)."""


@needs_haproxy
@needs_proxy_protocol
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-passthrough"])
async def test_haproxy_send_proxy_v2_to_securetcp(tmp_path: Path, pki: PKI, tls: bool) -> None:
    server = AddressEcho(
        ssl_options=pki.ssl_options() if tls else None,
        proxy_protocol=True,  # type: ignore[call-arg]
    )
    async with running(server) as server_port:
        front = free_port()
        config = haproxy_config(tmp_path / "haproxy.cfg", front, server_port, send_proxy=True)
        with process([str(HAPROXY), "-db", "-f", str(config)], tmp_path, "haproxy") as haproxy:
            await haproxy.wait_listening(front)
            context = pki.client_context() if tls else None
            if context is None:
                reader, writer = await asyncio.open_connection(HOST, front)
            else:
                reader, writer = await open_tls(front, context)
            try:
                client = writer.get_extra_info("sockname")
                writer.write(b"through haproxy")
                got = await asyncio.wait_for(reader.readexactly(15), 10)
                assert got == b"through haproxy"
            finally:
                await close_writer(writer)
    # Not HAProxy's address: the client's own, from the PROXY header.
    assert server.addresses[-1][:2] == (client[0], client[1])


@needs_haproxy
@needs_proxy_protocol
async def test_haproxy_in_front_of_securetcp_echo_command(tmp_path: Path, pki: PKI) -> None:
    echo_argv = securetcp("-v", "echo", "--port", "0", "--certs", pki_dir(pki), "--proxy-protocol")
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(process(echo_argv, tmp_path, "echo"))
        echo_port, front = await echo.announced_port(), free_port()
        config = haproxy_config(tmp_path / "haproxy.cfg", front, echo_port, send_proxy=True)
        haproxy = stack.enter_context(
            process([str(HAPROXY), "-db", "-f", str(config)], tmp_path, "haproxy")
        )
        await haproxy.wait_listening(front)
        reader, writer = await open_tls(front, pki.client_context())
        try:
            client_port = writer.get_extra_info("sockname")[1]
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readexactly(6), 10) == b"hello\n"
        finally:
            await close_writer(writer)
        # The echo server logs (at debug level) who connected: the client's port.
        await until(
            lambda: str(client_port) in echo.output(), timeout=10.0, message="the client's address"
        )


# ----------------------------------------------------- securetcp in front


@needs_haproxy
async def test_securetcp_proxy_send_proxy_v2_to_haproxy_accept_proxy(
    tmp_path: Path, pki: PKI
) -> None:
    upstream = EchoServer()
    async with running(upstream) as echo_port:
        haproxy_port = free_port()
        config = haproxy_config(
            tmp_path / "haproxy.cfg", haproxy_port, echo_port, accept_proxy=True
        )
        proxy_argv = securetcp(
            "proxy",
            "--listen",
            "0",
            "--upstream",
            f"{HOST}:{haproxy_port}",
            "--send-proxy",
            "v2",
            "--certs",
            pki_dir(pki),
        )
        with (
            process([str(HAPROXY), "-db", "-f", str(config)], tmp_path, "haproxy") as haproxy,
            process(proxy_argv, tmp_path, "proxy") as proxy,
        ):
            await haproxy.wait_listening(haproxy_port)
            proxy_port = await proxy.announced_port()
            reader, writer = await open_tls(proxy_port, pki.client_context())
            try:
                client_port = writer.get_extra_info("sockname")[1]
                writer.write(b"via both")
                assert await asyncio.wait_for(reader.readexactly(8), 10) == b"via both"
            finally:
                await close_writer(writer)
            # HAProxy logs the connection once it ends, with the address from the header.
            await until(
                lambda: (
                    f"client={HOST}:{client_port} frontend={HOST}:{proxy_port}" in haproxy.output()
                ),
                timeout=10.0,
                message="HAProxy's log line",
            )


async def s_client(port: int, ca: Path, line: bytes) -> bytes:
    """Send `line` through `openssl s_client` and return the first line it prints back."""
    proc = await asyncio.create_subprocess_exec(
        str(OPENSSL),
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        "-CAfile",
        str(ca),
        "-servername",
        "localhost",
        "-verify_return_error",
        "-quiet",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(line)
        await proc.stdin.drain()
        return await asyncio.wait_for(proc.stdout.readline(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@needs_openssl
async def test_proxy_terminates_tls_for_openssl_and_python_clients(
    tmp_path: Path, pki: PKI
) -> None:
    upstream = EchoServer()
    async with running(upstream) as echo_port:
        argv = securetcp(
            "proxy", "--listen", "0", "--upstream", f"{HOST}:{echo_port}",
            "--certs", pki_dir(pki),
        )  # fmt: skip
        with process(argv, tmp_path, "proxy") as proxy:
            port = await proxy.announced_port()
            assert await s_client(port, pki.ca_file, b"from openssl\n") == b"from openssl\n"
            payload = os.urandom(200_000)
            assert await exchange(port, payload, pki.client_context()) == payload
    assert all(type(stream) is IOStream for stream in upstream.streams)


async def test_proxy_reoriginates_tls_to_securetcp_echo(tmp_path: Path, pki: PKI) -> None:
    echo_argv = securetcp("echo", "--port", "0", "--certs", pki_dir(pki))
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(process(echo_argv, tmp_path, "echo"))
        echo_port = await echo.announced_port()
        proxy_argv = securetcp(
            "proxy", "--plain", "--listen", "0",
            "--upstream", f"{HOST}:{echo_port}", "--upstream-ca", str(pki.ca_file),
            "--upstream-server-name", "localhost",
        )  # fmt: skip
        proxy = stack.enter_context(process(proxy_argv, tmp_path, "proxy"))
        port = await proxy.announced_port()
        payload = os.urandom(300_000)
        assert await exchange(port, payload) == payload


class PlainEcho(TCPServer):
    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            while True:
                await stream.write(await stream.read_bytes(65536, partial=True))
        except StreamClosedError:
            pass


def stunnel_config(tmp_path: Path, pki: PKI, accept: int, connect: int) -> Path:
    path = tmp_path / "stunnel.conf"
    path.write_text(
        f"""
foreground = yes
pid =
debug = notice
output = {tmp_path / "stunnel.log"}

[echo]
accept = {HOST}:{accept}
connect = {HOST}:{connect}
cert = {pki.cert_file}
key = {pki.key_file}
CAfile = {pki.ca_file}
verifyChain = yes
requireCert = yes
"""
    )
    return path


@needs_stunnel
async def test_proxy_reoriginates_mutual_tls_to_stunnel(tmp_path: Path, pki: PKI) -> None:
    upstream = PlainEcho()
    async with running(upstream) as echo_port:
        stunnel_port = free_port()
        config = stunnel_config(tmp_path, pki, stunnel_port, echo_port)
        proxy_argv = securetcp(
            "proxy", "--listen", "0", "--certs", pki_dir(pki),
            "--upstream", f"{HOST}:{stunnel_port}", "--upstream-ca", str(pki.ca_file),
            "--upstream-cert", str(pki.client_cert_file),
            "--upstream-key", str(pki.client_key_file),
            "--upstream-server-name", "localhost",
        )  # fmt: skip
        with (
            process([str(STUNNEL), str(config)], tmp_path, "stunnel") as stunnel,
            process(proxy_argv, tmp_path, "proxy") as proxy,
        ):
            await stunnel.wait_listening(stunnel_port)
            port = await proxy.announced_port()
            payload = os.urandom(500_000)
            assert await exchange(port, payload, pki.client_context()) == payload


@needs_stunnel
async def test_stunnel_refusing_our_missing_client_cert_closes_the_client(
    tmp_path: Path, pki: PKI
) -> None:
    upstream = PlainEcho()
    async with running(upstream) as echo_port:
        stunnel_port = free_port()
        config = stunnel_config(tmp_path, pki, stunnel_port, echo_port)
        proxy_argv = securetcp(
            "proxy", "--plain", "--listen", "0",
            "--upstream", f"{HOST}:{stunnel_port}", "--upstream-ca", str(pki.ca_file),
            "--upstream-server-name", "localhost",
        )  # fmt: skip
        with (
            process([str(STUNNEL), str(config)], tmp_path, "stunnel") as stunnel,
            process(proxy_argv, tmp_path, "proxy") as proxy,
        ):
            await stunnel.wait_listening(stunnel_port)
            port = await proxy.announced_port()
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(b"no certificate")
                assert await closed(reader)
            finally:
                await close_writer(writer)
            await until(
                lambda: "upstream" in proxy.output(), timeout=10.0, message="the logged failure"
            )
    assert upstream_never_reached(upstream)


def upstream_never_reached(server: TCPServer) -> bool:
    return server.stats.accepted == 0


# ------------------------------------------------------------------- faults


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closes (EOF or reset) without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(1), 10)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""


class Faulty(TCPServer):
    """Echoes; a chunk starting with b"reset" makes it reset the connection."""

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                if data.startswith(b"reset"):
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    stream.close()
                    return
                await stream.write(data)
        except StreamClosedError:
            pass


async def test_faults_leave_the_proxy_serving_without_leaks(tmp_path: Path, pki: PKI) -> None:
    upstream = Faulty()
    async with running(upstream) as echo_port:
        argv = securetcp(
            "proxy", "--listen", "0", "--upstream", f"{HOST}:{echo_port}",
            "--certs", pki_dir(pki),
        )  # fmt: skip
        with process(argv, tmp_path, "proxy") as proxy:
            port = await proxy.announced_port()
            assert await exchange(port, b"warm", pki.client_context()) == b"warm"
            await until(
                lambda: upstream.stats.active == 0, timeout=10.0, message="the warm-up closed"
            )
            # The upstream has closed, but the proxy may not have handled that yet
            # (under load): counting now could take the warm-up's two descriptors
            # into the baseline. A connection echoed through the proxy is the
            # barrier: its echo takes several turns of the proxy's loop, the
            # first of which already saw the upstream's end. It holds two
            # descriptors (the client's and the upstream's).
            reader, writer = await open_tls(port, pki.client_context())
            writer.write(b"barrier")
            assert await asyncio.wait_for(reader.readexactly(7), 10) == b"barrier"
            baseline = proxy.fd_count() - 2
            await close_writer(writer)

            # The upstream resets mid-transfer: the client is reset too.
            reader, writer = await open_tls(port, pki.client_context())
            try:
                writer.write(b"first")
                assert await asyncio.wait_for(reader.readexactly(5), 10) == b"first"
                writer.write(b"reset please")
                assert await closed(reader)
            finally:
                await close_writer(writer)

            # The client resets mid-transfer (no close_notify, TCP RST). The
            # engine reads a TLS connection cut without close_notify as an
            # end of stream, so this is passed on as one, not counted.
            for _ in range(5):
                reader, writer = await open_tls(port, pki.client_context())
                writer.write(b"x" * 100_000)
                await asyncio.wait_for(reader.readexactly(1000), 10)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                await close_writer(writer)

            # Others are still served, and every descriptor came back.
            assert await exchange(port, b"still here", pki.client_context()) == b"still here"
            await until(
                lambda: upstream.stats.active == 0,
                timeout=10.0,
                message="upstream connections closed",
            )
            await until(
                lambda: proxy.fd_count() == baseline,
                timeout=10.0,
                message="the proxy's descriptors",
            )
    assert "upstream connection broke" in proxy.output()


async def test_upstream_down_or_silent_closes_clients_at_once(tmp_path: Path, pki: PKI) -> None:
    down_port = free_port()
    with socket.socket() as silent:  # accepts into its backlog, never speaks TLS
        silent.bind((HOST, 0))
        silent.listen(16)
        silent_port = silent.getsockname()[1]
        down_argv = securetcp(
            "proxy", "--listen", "0", "--upstream", f"{HOST}:{down_port}",
            "--certs", pki_dir(pki),
        )  # fmt: skip
        silent_argv = securetcp(
            "proxy", "--plain", "--listen", "0",
            "--upstream", f"{HOST}:{silent_port}", "--upstream-ca", str(pki.ca_file),
            "--upstream-server-name", "localhost", "--connect-timeout", "0.5",
        )  # fmt: skip
        with (
            process(down_argv, tmp_path, "down") as down,
            process(silent_argv, tmp_path, "silent") as quiet,
        ):
            port, silent_proxy = await down.announced_port(), await quiet.announced_port()
            # Serving (the loop's own descriptors exist) before the baseline is taken.
            await down.wait_listening(port)
            await quiet.wait_listening(silent_proxy)
            # wait_listening's probes must be gone before the baseline: the TLS
            # proxy's failed handshake (a plain client that left) is logged when
            # it closes, and the plain proxy's probe waits out its upstream.
            await until(
                lambda: "failed (eof)" in down.output(), timeout=10.0, message="the probe's end"
            )
            await until(
                lambda: "timed out" in quiet.output(), timeout=10.0, message="the probe's timeout"
            )
            baseline = (down.fd_count(), quiet.fd_count())
            for _ in range(3):
                reader, writer = await open_tls(port, pki.client_context())
                try:
                    assert await closed(reader)
                finally:
                    await close_writer(writer)
                reader, writer = await asyncio.open_connection(HOST, silent_proxy)
                try:
                    writer.write(b"anyone?")
                    assert await closed(reader)
                finally:
                    await close_writer(writer)
            await until(
                lambda: len(re.findall("connection refused", down.output())) == 3,
                timeout=10.0,
                message="three refused connections logged",
            )
            await until(
                lambda: len(re.findall("timed out", quiet.output())) == 1 + 3,
                timeout=10.0,
                message="three timeouts logged",
            )
            await until(
                lambda: (down.fd_count(), quiet.fd_count()) == baseline,
                timeout=10.0,
                message="descriptors back",
            )
