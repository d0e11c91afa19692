"""What the results were measured on: machine, Python, OpenSSL, packages."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import ssl
import subprocess
from pathlib import Path

PACKAGES = ("securetcp", "tornado", "uvloop", "trustme", "cryptography")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter to the results."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or "unknown".

    On a shared machine this says how much else was running alongside.
    """
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def git_commit() -> str:
    """The short commit of the checkout being measured ("+dirty" if modified), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def collect() -> dict[str, object]:
    """Everything the report header and the JSON ``meta`` show."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "packages": package_versions(),
        "commit": git_commit(),
        "loadavg_start": load_average(),
    }
