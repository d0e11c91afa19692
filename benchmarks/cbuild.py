"""Build the C programs (the reference server, the load generator) when their source changes.

Binaries go to ``benchmarks/build/`` (untracked). Each is linked against the
TLS library its source names in :data:`LIBS` (OpenSSL unless listed). Without
a C compiler or the library's headers, :func:`binary` raises
:class:`BuildError`, which the harness reports as that row's failure reason
(or, for the load generator, falls back on); the run goes on.
"""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

from benchmarks.procs import ServerFailed

BUILD_DIR = Path(__file__).resolve().parent / "build"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
OPENSSL_LIBS = ("-lssl", "-lcrypto")
# Sources that are not OpenSSL programs: their libraries and Debian package.
LIBS = {"handshake_gnutls.c": (("-lgnutls",), "libgnutls28-dev")}
COMPILE_TIMEOUT = 120.0


class BuildError(ServerFailed):
    """The C server could not be built (no compiler, no headers, or an error)."""


def binary(source: Path) -> Path:
    """The executable built from ``source``, rebuilt if the source is newer.

    The outcome is remembered for the rest of the run, so a failed build is
    tried (and explained) once, not once per measurement.
    """
    result = _build(source)
    if isinstance(result, str):
        raise BuildError(result)
    return result


@functools.cache
def _build(source: Path) -> Path | str:
    target = BUILD_DIR / source.stem
    # This file holds the flags, so a change here rebuilds too.
    newest = max(source.stat().st_mtime, Path(__file__).stat().st_mtime)
    if not (target.exists() and target.stat().st_mtime >= newest):
        error = _compile(source, target)
        if error:
            return f"cannot build {source.name}: {error}"
    if source.name not in LIBS:
        _check_openssl(target)
    return target


def _compile(source: Path, target: Path) -> str | None:
    """Compile ``source`` to ``target``; the reason on failure, else None."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} not found; install gcc)"
    BUILD_DIR.mkdir(exist_ok=True)
    partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
    libs, package = LIBS.get(source.name, (OPENSSL_LIBS, "libssl-dev"))
    cmd = [cc, *CFLAGS, "-o", str(partial), str(source), *libs]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        if "No such file" in done.stderr and (".h" in done.stderr):
            return f"headers not found (install {package})"
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return f"{cc} exited with status {done.returncode}: {tail}"
    partial.replace(target)  # atomic: a half-written binary is never run
    return None


def _check_openssl(target: Path) -> None:
    """Warn if the binary runs on another OpenSSL than Python's ssl module.

    The row is meant as the floor of *the same* OpenSSL; a different library
    version would make it a different comparison (but still a useful one).
    """
    try:
        out = subprocess.run(
            [str(target), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return  # the measurement will report why it cannot start
    if out != ssl.OPENSSL_VERSION:
        print(
            f"bench: warning: {target.name} uses {out!r}, Python uses {ssl.OPENSSL_VERSION!r}",
            file=sys.stderr,
        )
