"""What the results were measured on: machine, Python, OpenSSL, packages."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import ssl
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
    }
