"""The three start-up modes of TCPServer, end to end, each in its own subprocess.

The subprocess prints its port, serves TLS (a greeting naming its task id,
then an echo), and must exit cleanly on SIGTERM or SIGINT: `run()` closes
the server gracefully, and in the forking modes the parent forwards the
signal to its children and exits 0 once they have.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PKI

SERVER_SCRIPT = r"""
import logging
import os
import sys

from securetcp.netutil import bind_sockets
from securetcp.process import fork_processes, task_id
from securetcp.services.echo import EchoServer

logging.basicConfig(level=logging.INFO, stream=sys.stderr)


class GreetingServer(EchoServer):
    async def handle_stream(self, stream, address):
        await stream.write(f"hello from task {task_id()} pid {os.getpid()}\n".encode())
        await super().handle_stream(stream, address)


mode, certfile, keyfile = sys.argv[1:4]
server = GreetingServer({"certfile": certfile, "keyfile": keyfile})
if mode == "listen":
    server.listen(0, "127.0.0.1")
    print(server.sockets[0].getsockname()[1], flush=True)
elif mode == "start":
    server.bind(0, "127.0.0.1")
    print(server.sockets[0].getsockname()[1], flush=True)
    server.start(2)
elif mode == "fork":
    sockets = bind_sockets(0, "127.0.0.1")
    print(sockets[0].getsockname()[1], flush=True)
    fork_processes(2)
    server.add_sockets(sockets)
else:
    raise SystemExit(f"unknown mode {mode}")
server.run()
# One write(2) per line: the children share the pipe.
os.write(1, f"task {task_id()} exited cleanly\n".encode())
"""

DEADLINE = 15.0


@contextlib.contextmanager
def server_process(
    tmp_path: Path, pki: PKI, mode: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(pki.cert_file), str(pki.key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group to clean up, children included
    )
    try:
        yield proc, read_port(proc)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=DEADLINE)


def read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + DEADLINE
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
        if not ready:
            raise AssertionError("the server did not print its port in time")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            _, err = proc.communicate(timeout=DEADLINE)
            raise AssertionError(f"the server exited early: {err.decode(errors='replace')}")
        line += chunk
    return int(line)


def greet_and_echo(port: int, pki: PKI, payload: bytes) -> str:
    """Connect with TLS, read the greeting, check an echo; return the greeting."""
    context = pki.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # noqa: SIM117
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            greeting = b""
            while not greeting.endswith(b"\n"):
                chunk = tls.recv(1024)
                assert chunk, "connection closed before the greeting"
                greeting += chunk
            tls.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload):
                chunk = tls.recv(65536)
                assert chunk, "connection closed during the echo"
                echoed += chunk
            assert echoed == payload
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    return greeting.decode().strip()


def stop_and_check(proc: subprocess.Popen[bytes], sig: signal.Signals, tasks: list[str]) -> None:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=DEADLINE)
    stderr = err.decode(errors="replace")
    assert proc.returncode == 0, f"exit status {proc.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = out.decode().splitlines()
    for task in tasks:
        assert f"task {task} exited cleanly" in lines, (lines, stderr)


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])


@SIGNALS
def test_listen_and_run(tmp_path: Path, pki: PKI, sig: signal.Signals) -> None:
    with server_process(tmp_path, pki, "listen") as (proc, port):
        greeting = greet_and_echo(port, pki, os.urandom(100_000))
        assert greeting.startswith("hello from task None pid ")
        assert greeting.endswith(f"pid {proc.pid}")
        stop_and_check(proc, sig, ["None"])


def serve_until_both_children_seen(port: int, pki: PKI, parent_pid: int) -> set[str]:
    """Connect until both forked children have served a connection."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + DEADLINE
    attempts = 0
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only saw {seen} after {attempts} connections"
        attempts += 1
        greeting = greet_and_echo(port, pki, f"attempt {attempts}".encode())
        words = greeting.split()
        task, pid = words[3], words[5]
        assert int(pid) != parent_pid
        assert seen.setdefault(task, pid) == pid  # one pid per task id
    assert set(seen) == {"0", "1"}
    return set(seen)


@SIGNALS
def test_bind_start_run(tmp_path: Path, pki: PKI, sig: signal.Signals) -> None:
    with server_process(tmp_path, pki, "start") as (proc, port):
        tasks = serve_until_both_children_seen(port, pki, proc.pid)
        stop_and_check(proc, sig, sorted(tasks))


@SIGNALS
def test_bind_sockets_fork_processes_add_sockets(
    tmp_path: Path, pki: PKI, sig: signal.Signals
) -> None:
    with server_process(tmp_path, pki, "fork") as (proc, port):
        tasks = serve_until_both_children_seen(port, pki, proc.pid)
        stop_and_check(proc, sig, sorted(tasks))


def test_run_with_an_open_connection_closes_on_sigterm(tmp_path: Path, pki: PKI) -> None:
    """A connection that is done sending is closed, not waited on forever."""
    with server_process(tmp_path, pki, "listen") as (proc, port):
        context = pki.client_context()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # noqa: SIM117
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(1024).startswith(b"hello from task None")
                tls.settimeout(DEADLINE)
                proc.send_signal(signal.SIGTERM)
                # The client closes its side on its own time; then the server ends.
                tls.sendall(b"last words")
                assert tls.recv(1024) == b"last words"
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert b"task None exited cleanly" in out
