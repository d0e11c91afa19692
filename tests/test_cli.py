"""The `securetcp` command: the README's main job, checked with a real peer.

`securetcp certs init` writes the development PKI; `securetcp echo` serves TLS
echo on it, and `openssl s_client` (what the README tells newcomers to run)
verifies the server against certs/ca.pem and gets its line back, with and
without a client certificate.
"""

from __future__ import annotations

import select
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from servers import server_process, wait_for_text

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
