"""A short coverage-guided fuzz run (atheris) of every target in fuzz/targets.py.

The ``all`` target (its first byte picks handshake, after_handshake, framing
or proxyproto) runs for a few seconds in one process, from seeds written at
run time (the captured ClientHellos of fuzz/corpus for the handshake
targets), and must end without a finding. scripts/fuzz runs each target
longer, on its own.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
SECONDS = 8

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason=f"atheris is not installed for Python {sys.version.split()[0]} "
    "(scripts/test installs it where a wheel exists: pip install 'securetcp[fuzz]')",
)


def test_fuzz_every_target_briefly(tmp_path: Path) -> None:
    target = "all"
    corpus = tmp_path / "corpus"
    subprocess.run(
        [sys.executable, str(FUZZ / "seeds.py"), target, str(corpus)], check=True, timeout=60
    )
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "run.py"),
            target,
            str(corpus),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    runs = re.search(r"Done (\d+) runs", log)
    assert runs, log[-2000:]
    assert int(runs.group(1)) >= 200, f"only {runs.group(1)} inputs in {SECONDS} s"
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
