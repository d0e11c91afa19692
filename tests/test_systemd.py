"""sockets_from_systemd: socket activation, with systemd's own activator where
it is installed (``systemd-socket-activate``), and the environment rules."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PKI

from securetcp import sockets_from_systemd

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activator = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing")

# A child that reports what sockets_from_systemd() gave it, as JSON.
REPORT = """
import json, os, socket, sys
from securetcp import sockets_from_systemd
names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else None
socks = sockets_from_systemd(names)
print(json.dumps({
    "sockets": [[s.fileno(), s.getsockname()[1], s.getblocking(), s.get_inheritable()]
                for s in socks],
    "env": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ],
}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def activate(
    count: int, command: Callable[[list[int]], list[str]]
) -> tuple[subprocess.Popen[str], list[int]]:
    """Start ``command(ports)`` (systemd-socket-activate) on `count` free ports, once it
    listens on them all; (process, ports).

    The activator cannot pick a port itself: a port probed free may be taken
    before it binds, and then it is tried again on fresh ports.
    """
    for _ in range(10):
        ports = [free_port() for _ in range(count)]
        proc = subprocess.Popen(
            command(ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in ports]  # "Listening on HOST:PORT as FD."
        if all(line.startswith("Listening on ") for line in lines):
            return proc, ports
        proc.kill()
        _, rest = proc.communicate(timeout=10)
        if "Address already in use" not in "".join(lines) + rest:
            raise AssertionError(f"the activator did not start: {''.join(lines)}{rest}")
    raise AssertionError("no free ports for the activator after 10 attempts")


def connect_when_listening(port: int, proc: subprocess.Popen[str]) -> socket.socket:
    """Connect once the activator listens (it starts the program on this connection)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling for the port with a deadline


def run_activated(*args: str, names: list[str]) -> tuple[list[int], dict[str, object]]:
    """The activated REPORT child's report, on fresh ports, one per name; (ports, report)."""
    assert ACTIVATE is not None

    def command(ports: list[int]) -> list[str]:
        assert ACTIVATE is not None
        words = [ACTIVATE]
        for port in ports:
            words += ["-l", f"127.0.0.1:{port}"]
        return [*words, f"--fdname={':'.join(names)}", sys.executable, "-c", REPORT, *args]

    proc, ports = activate(len(names), command)
    try:
        with connect_when_listening(ports[0], proc):
            out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 0 or out, err
    return ports, json.loads(out.splitlines()[-1])


def test_not_socket_activated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert sockets_from_systemd() == []


def test_variables_for_another_process_are_ignored_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "web")
    assert sockets_from_systemd() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(
    ("pid", "fds", "message"),
    [("abc", "1", "LISTEN_PID='abc'"), ("self", "two", "LISTEN_FDS='two'")],
)
def test_malformed_variables_are_named(
    monkeypatch: pytest.MonkeyPatch, pid: str, fds: str, message: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    monkeypatch.setenv("LISTEN_FDS", fds)
    with pytest.raises(ValueError, match=message):
        sockets_from_systemd()


@needs_activator
def test_activated_sockets_are_non_blocking_close_on_exec_and_named() -> None:
    ports, report = run_activated(names=["web", "admin"])
    assert report["env"] == []  # children do not inherit them
    assert report["sockets"] == [[3, ports[0], False, False], [4, ports[1], False, False]]
    ports, only_admin = run_activated("admin", names=["web", "admin"])
    assert only_admin["sockets"] == [[4, ports[1], False, False]]


@needs_activator
def test_echo_systemd_serves_tls_on_the_activated_socket(pki: PKI, tmp_path: Path) -> None:
    """`securetcp echo --systemd` on a socket systemd's activator made."""
    assert ACTIVATE is not None

    def command(ports: list[int]) -> list[str]:
        assert ACTIVATE is not None
        return [
            ACTIVATE, "-l", f"127.0.0.1:{ports[0]}", sys.executable, "-m", "securetcp", "echo",
            "--systemd", "--cert", str(pki.cert_file), "--key", str(pki.key_file),
            "--client-auth", "none",
        ]  # fmt: skip

    proc, (port,) = activate(1, command)
    try:
        # The activator accepts nothing itself: the first connection starts the server.
        with connect_when_listening(port, proc) as raw:
            raw.settimeout(20)
            with pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"activated\n")
                assert tls.recv(100) == b"activated\n"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    except (OSError, ssl.SSLError):
        proc.kill()
        print(*proc.communicate(timeout=10))
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=20)
