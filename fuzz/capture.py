"""Capture the ClientHellos real clients send, as the seed corpus of the fuzzers.

``python fuzz/capture.py [DIR]`` (default fuzz/corpus/clienthello) points
openssl s_client, curl, gnutls-cli and Python's ssl at a raw listener on
127.0.0.1, keeps each client's first flight (the ClientHello records) and
writes one ``<client>.bin`` per client. A ClientHello holds no secret: a
random, the offered suites, groups and extensions, and an ephemeral public key
share. Clients that are not installed are skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "corpus" / "clienthello"


def read_client_hello(conn: socket.socket) -> bytes:
    """The records of one complete ClientHello handshake message (or what came)."""
    conn.settimeout(5.0)
    data = bytearray()
    message = bytearray()
    with contextlib.suppress(OSError):
        while True:
            while len(data) < 5:
                chunk = conn.recv(65536)
                if not chunk:
                    return bytes(data)
                data += chunk
            offset = 0
            message.clear()
            while offset + 5 <= len(data):
                length = struct.unpack("!H", data[offset + 3 : offset + 5])[0]
                if offset + 5 + length > len(data):
                    break
                message += data[offset + 5 : offset + 5 + length]
                offset += 5 + length
                if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
                    return bytes(data[:offset])
            chunk = conn.recv(65536)
            if not chunk:
                return bytes(data)
            data += chunk
    return bytes(data)


def capture(client: Callable[[int], None]) -> bytes:
    """Run `client(port)` against a raw listener; return its first flight."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result: list[bytes] = []

        def serve() -> None:
            listener.settimeout(10.0)
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    result.append(read_client_hello(conn))

        thread = threading.Thread(target=serve)
        thread.start()
        client(port)
        thread.join(15.0)
    return result[0] if result else b""


def command_client(*argv: str) -> Callable[[int], None]:
    """A client that is a command; "{port}" in `argv` becomes the port."""

    def run(port: int) -> None:
        command = [a.replace("{port}", str(port)) for a in argv]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
            )

    return run


def python_client(port: int) -> None:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        contextlib.suppress(OSError, ssl.SSLError),
        context.wrap_socket(sock, server_hostname="localhost"),
    ):
        pass


CLIENTS: dict[str, tuple[str | None, Callable[[int], None]]] = {
    "python-ssl": (None, python_client),
    "openssl-s_client": (
        "openssl",
        command_client(
            "openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", "localhost"
        ),
    ),
    "openssl-tls12": (
        "openssl",
        command_client("openssl", "s_client", "-connect", "127.0.0.1:{port}", "-tls1_2"),
    ),
    "openssl-alpn-h2": (
        "openssl",
        command_client(
            "openssl", "s_client", "-connect", "127.0.0.1:{port}", "-alpn", "h2,http/1.1"
        ),
    ),
    "curl": (
        "curl",
        command_client("curl", "-sk", "--max-time", "5", "https://localhost:{port}/"),
    ),
    "gnutls-cli": (
        "gnutls-cli",
        command_client("gnutls-cli", "--insecure", "-p", "{port}", "localhost"),
    ),
}


def main(directory: Path = DEFAULT_DIR) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (tool, client) in CLIENTS.items():
        if tool is not None and shutil.which(tool) is None:
            print(f"{name}: {tool} not installed, skipped")
            continue
        hello = capture(client)
        if len(hello) < 5 or hello[0] != 0x16:
            print(f"{name}: no ClientHello captured ({len(hello)} bytes)")
            continue
        (directory / f"{name}.bin").write_bytes(hello)
        print(f"{name}: {len(hello)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
