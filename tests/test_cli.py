"""The `securetcp` command: the README's main job, checked with a real peer.

`securetcp certs init` writes the development PKI; `securetcp echo` serves TLS
echo on it, and `openssl s_client` (what the README tells newcomers to run)
verifies the server against certs/ca.pem and gets its line back, with and
without a client certificate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from servers import ROOT, server_process, wait_for_text

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


def securetcp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securetcp.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def s_client(cwd: Path, port: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Type a line into `openssl s_client` as the README says; return once it came back.

    s_client keeps the connection while its input is open, so the line is
    written, the echo awaited (bounded), and only then is its input closed.
    """
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", "certs/ca.pem"]
    command += ["-verify_return_error", "-quiet", *extra]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("hello securetcp\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(command, proc.returncode, line, stderr)


def test_certs_init_writes_a_dev_pki_once(tmp_path: Path) -> None:
    first = securetcp("certs", "init", "--dir", "certs", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert names == ["ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    for key in ("server.key", "client.key"):
        assert stat.S_IMODE((tmp_path / "certs" / key).stat().st_mode) == 0o600
    before = (tmp_path / "certs" / "server.pem").read_bytes()
    again = securetcp("certs", "init", "--dir", "certs", cwd=tmp_path)
    assert again.returncode == 0
    assert (tmp_path / "certs" / "server.pem").read_bytes() == before  # kept, not replaced

    shown = securetcp("certs", "show", "certs/server.pem", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "localhost" in shown.stdout and "127.0.0.1" in shown.stdout and "::1" in shown.stdout


def test_echo_refuses_missing_certificates_clearly(tmp_path: Path) -> None:
    result = securetcp("echo", "--certs", "nowhere", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere/server.pem" in result.stderr and "Traceback" not in result.stderr


@needs_openssl
def test_readme_main_job_with_openssl_s_client(tmp_path: Path) -> None:
    assert securetcp("certs", "init", "--dir", "certs", cwd=tmp_path).returncode == 0
    command = [sys.executable, "-m", "securetcp.cli", "echo", "--port", "0", "--certs", "certs"]
    with server_process(command, tmp_path) as (proc, out, err):
        port = wait_for_text(out, r"127\.0\.0\.1:(\d+)", proc).group(1)
        assert "openssl s_client" in out.read_text()  # it tells newcomers how to connect

        plain = s_client(tmp_path, port)
        assert "hello securetcp" in plain.stdout
        assert "verify return:1" in plain.stderr

        mutual = s_client(tmp_path, port, "-cert", "certs/client.pem", "-key", "certs/client.key")
        assert "hello securetcp" in mutual.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, err.read_text()
    assert "Traceback" not in err.read_text()


# -- one consistent command line ------------------------------------------------


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m securetcp ...` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "securetcp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("securetcp: "), lines[0]
    return lines[0]


def example_commands(help_text: str) -> list[list[str]]:
    """The `securetcp ...` command lines in a help text's examples, as argv lists."""
    text = help_text.split("examples:", 1)[1].replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line.startswith("securetcp "):
            continue  # prose, or another tool (openssl)
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:1] == ["securetcp"]:
                commands.append(words[1:])
    return commands


def subcommands() -> list[list[str]]:
    from securetcp.cli import build_parser

    parser = build_parser()
    names: list[list[str]] = [[]]
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            names.append([name])
            for nested in sub._actions:
                if isinstance(nested, argparse._SubParsersAction):
                    names += [[name, n] for n in nested.choices]
    return names


def test_every_command_has_help_with_examples_that_parse(tmp_path: Path) -> None:
    from securetcp.cli import build_parser

    commands = subcommands()
    assert {"echo", "certs", "probe"} <= {c[0] for c in commands if c}
    assert ["certs", "check"] in commands and ["certs", "show"] in commands
    for command in commands:
        result = run(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        assert "--log-format" in result.stdout, command  # logging options everywhere
        if command in ([], ["echo"], ["certs"], ["certs", "check"], ["probe"], ["certs", "show"]):
            examples = example_commands(result.stdout)
            assert examples, command
            for argv in examples:
                try:
                    build_parser().parse_args(argv)
                except SystemExit as e:
                    raise AssertionError(
                        f"example does not parse: securetcp {shlex.join(argv)}"
                    ) from e


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run(cwd=tmp_path).returncode == 2
    unknown = run("nosuch", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'nosuch'" in unknown.stderr
    bad_port = run("echo", "--port", "http", cwd=tmp_path)
    assert bad_port.returncode == 2
    assert bad_port.stderr == (
        "securetcp echo: argument --port: invalid int value: 'http' (see securetcp echo --help)\n"
    )
    nested = run("certs", "check", "--cert", "x.pem", "--purpose", "both", cwd=tmp_path)
    assert nested.returncode == 2 and len(nested.stderr.splitlines()) == 1
    assert nested.stderr.startswith("securetcp certs check: argument --purpose")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--max-connections", "0"], "--max-connections: expected at least 1"),
        (["--idle-timeout", "-1"], "--idle-timeout"),
        (["--handshake-timeout", "0"], "--handshake-timeout: expected a positive number"),
        (["--processes", "-1"], "--processes"),
        (["--trusted-proxy", "10.0.0.0/8"], "--trusted-proxy only applies with --proxy-protocol"),
        (
            ["--proxy-protocol", "--trusted-proxy", "ten"],
            "--trusted-proxy 'ten': not an IP network",
        ),
        (["--sni", "nonsense"], "--sni 'nonsense': expected NAME=CERT[,KEY]"),
        (["--sni", "other.test=missing.pem"], "missing.pem"),
        (["--reload-interval", "0"], "--reload-interval"),
        (["--client-auth", "none", "--allow-cn", "x"], "--allow-cn/--allow-uri/--allow-dns"),
        (["--systemd"], "--systemd"),
        (["--unix", "/nonexistent-dir/echo.sock"], "--unix /nonexistent-dir/echo.sock"),
        (["--cert", "nope.pem"], "nope.pem"),
    ],
)
def test_echo_configuration_errors_are_one_line(
    dev_certs: Path, args: list[str], phrase: str
) -> None:
    result = run("echo", "--port", "0", *args, cwd=dev_certs)
    assert result.returncode == 2, result.stdout + result.stderr
    assert phrase in one_line_error(result)


@pytest.fixture(scope="module")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with certs/ from `certs init` (made once, in this process)."""
    from securetcp.certs import write_dev_certs

    directory = tmp_path_factory.mktemp("dev")
    write_dev_certs(directory / "certs")
    return directory


def tls_connection(
    port: int,
    ca: Path,
    cert: tuple[Path, Path] | Path | None = None,
    server_name: str = "localhost",
) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    if isinstance(cert, tuple):
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    elif cert is not None:
        context.load_cert_chain(str(cert))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=server_name)


def read_until_closed(conn: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    return data


def test_echo_server_options_end_to_end(tmp_path: Path, pki: Any) -> None:
    """Allow lists, SNI, idle timeout and JSON logs given after the subcommand."""
    other = tmp_path / "other"
    assert securetcp("certs", "init", "--dir", str(other), cwd=tmp_path).returncode == 0
    intruder = tmp_path / "intruder.pem"
    leaf = pki.ca.issue_cert("intruder.example", common_name="intruder")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(intruder))
    command = [sys.executable, "-m", "securetcp", "echo", "--port", "0"]
    command += ["--cert", str(pki.cert_file), "--key", str(pki.key_file)]
    command += ["--client-auth", "required", "--client-ca", str(pki.ca_file)]
    command += ["--allow-cn", "test-client", "--idle-timeout", "1"]
    command += ["--sni", f"other.test={other}/server.pem,{other}/server.key"]
    command += ["--log-format", "json"]
    client = (pki.client_cert_file, pki.client_key_file)
    with server_process(command, tmp_path) as (proc, out, err):
        port = int(wait_for_text(out, r"127\.0\.0\.1:(\d+)", proc).group(1))
        with tls_connection(port, pki.ca_file, client) as allowed:
            allowed.sendall(b"ping\n")
            assert allowed.recv(100) == b"ping\n"
            # Idle for the idle timeout: the server closes the connection.
            assert read_until_closed(allowed) == b""

        with tls_connection(port, pki.ca_file, intruder) as refused:
            assert read_until_closed(refused) == b""  # valid certificate, not on the list

        # The other certificate (for localhost) is served to clients asking for other.test:
        # it verifies against the other CA (the name is not its, so not checked here).
        context = ssl.create_default_context(cafile=str(other / "ca.pem"))
        context.check_hostname = False
        context.load_cert_chain(*map(str, client))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="other.test") as sni:
            sni.sendall(b"sni\n")
            assert sni.recv(100) == b"sni\n"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    records = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("(unauthorized)" in r["message"] for r in records), records


def test_echo_on_a_unix_socket_with_reloads(tmp_path: Path, pki: Any) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.cert_file.read_bytes())
    key.write_bytes(pki.key_file.read_bytes())
    path = tmp_path / "echo.sock"
    command = [sys.executable, "-m", "securetcp", "--log-level", "warning", "echo"]
    command += ["--unix", str(path), "--cert", str(cert), "--key", str(key)]
    command += ["--client-auth", "none", "--reload-interval", "0.1"]
    with server_process(command, tmp_path) as (proc, out, err):
        wait_for_text(out, re.escape(f"unix:{path}"), proc)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        def serial() -> int:
            context = ssl.create_default_context(cafile=str(pki.ca_file))
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(10)
                raw.connect(str(path))
                with context.wrap_socket(raw, server_hostname="localhost") as conn:
                    conn.sendall(b"x")
                    assert conn.recv(1) == b"x"
                    der = conn.getpeercert(binary_form=True)
                    assert der is not None
                    return x509.load_der_x509_certificate(der).serial_number

        first = serial()
        renewed = pki.ca.issue_cert("localhost")
        key.write_bytes(renewed.private_key_pem.bytes())
        cert.write_bytes(renewed.cert_chain_pems[0].bytes())
        new = x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number
        deadline = time.monotonic() + 15
        while serial() != new:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.05)
        assert first != new
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "Traceback" not in err.read_text()


def test_echo_behind_a_proxy_with_metrics(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    assert securetcp("certs", "init", "--dir", "certs", cwd=tmp_path).returncode == 0
    command = [sys.executable, "-m", "securetcp", "echo", "--port", "0", "--client-auth", "none"]
    command += ["--proxy-protocol", "--trusted-proxy", "127.0.0.0/8", "--metrics-port", "0"]
    with server_process(command, tmp_path) as (proc, out, err):
        port = int(wait_for_text(out, r"127\.0\.0\.1:(\d+)", proc).group(1))
        metrics = int(wait_for_text(out, r"metrics on http://127\.0\.0\.1:(\d+)/", proc).group(1))
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8443\r\n")
            with context.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"behind a proxy")
                assert conn.recv(100) == b"behind a proxy"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no PROXY header: dropped, counted
            assert read_until_closed(raw) == b""

        def failures() -> dict[str, float]:
            url = f"http://127.0.0.1:{metrics}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            return {
                s.labels["reason"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "securetcp_handshake_failures_total"
            }

        deadline = time.monotonic() + 10
        while failures() != {"proxy_protocol": 1}:
            assert time.monotonic() < deadline, failures()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "Traceback" not in err.read_text()


def test_reuse_port_shares_a_port_and_a_taken_port_is_one_line(dev_certs: Path) -> None:
    first_dir, second_dir = dev_certs / "first", dev_certs / "second"
    for d in (first_dir, second_dir):
        d.mkdir(exist_ok=True)
        (d / "certs").mkdir(exist_ok=True)
        for f in (dev_certs / "certs").iterdir():
            (d / "certs" / f.name).write_bytes(f.read_bytes())
    # The first server picks the port (a port found free beforehand may be
    # taken by someone else before the server binds it).
    command = [sys.executable, "-m", "securetcp", "echo", "--port", "0", "--reuse-port"]
    with server_process(command, first_dir) as (first, out1, _):
        port = wait_for_text(out1, r"127\.0\.0\.1:(\d+)", first).group(1)
        command[command.index("0")] = port
        taken = run("echo", "--port", port, cwd=second_dir)
        assert taken.returncode == 2
        assert one_line_error(taken).startswith(f"securetcp: cannot listen on 127.0.0.1:{port}: ")
        with server_process(command, second_dir) as (second, out2, _):
            wait_for_text(out2, rf"127\.0\.0\.1:{port}", second)  # both listen on it
            assert first.poll() is None and second.poll() is None
