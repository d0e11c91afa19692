"""Tests for securetcp.process.  Everything that forks runs in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import wait_until

from securetcp.process import cpu_count, fork_processes, task_id

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")

PRELUDE = """
import logging, os, random, signal, sys
from securetcp.process import fork_processes, task_id
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
out = sys.argv[1]

def record(name, text=""):
    # Write then rename, so a reader never sees a partial file.
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)
"""


def run_script(body: str, out: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + body, str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(out: Path, prefix: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.glob(prefix + "*") if not p.name.endswith(".tmp")}


def alive(pid: int) -> bool:
    """True if ``pid`` runs (an unreaped zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Process groups to SIGKILL after the test, whatever happened."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def test_cpu_count_and_task_id() -> None:
    assert task_id() is None
    assert cpu_count() >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cpu_count() == len(os.sched_getaffinity(0))


def test_refuses_with_running_loop() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="event loop"):
            fork_processes(2)

    asyncio.run(main())


def test_children_get_ids_and_parent_exits_zero(tmp_path: Path) -> None:
    body = """
i = fork_processes(3)
assert task_id() == i
record(f"child-{i}", str(os.getpid()))
"""
    result = run_script(body, tmp_path)
    assert result.returncode == 0, result.stderr
    children = records(tmp_path, "child-")
    assert sorted(children) == ["child-0", "child-1", "child-2"]
    assert len(set(children.values())) == 3
    assert "WARNING" not in result.stderr


@pytest.mark.parametrize("num", [None, 0, -1])
def test_default_is_one_child_per_cpu(tmp_path: Path, num: int | None) -> None:
    result = run_script(f"record(f'child-{{fork_processes({num})}}')", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(records(tmp_path, "child-")) == cpu_count()


def test_children_have_different_random_state(tmp_path: Path) -> None:
    body = """
import random
random.seed(42)  # identical state in the parent, which the children inherit
i = fork_processes(3)
record(f"random-{i}", repr(random.getrandbits(128)))
"""
    result = run_script(body, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(set(records(tmp_path, "random-").values())) == 3


def test_crashed_child_is_restarted_with_same_id(tmp_path: Path) -> None:
    body = """
i = fork_processes(2)
marker = os.path.join(out, f"crashed-{i}")
if not os.path.exists(marker):
    record(f"crashed-{i}", str(os.getpid()))
    if i == 0:
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
record(f"done-{i}", str(os.getpid()))
"""
    result = run_script(body, tmp_path)
    assert result.returncode == 0, result.stderr
    crashed = records(tmp_path, "crashed-")
    done = records(tmp_path, "done-")
    assert sorted(done) == ["done-0", "done-1"]
    for i in (0, 1):
        assert crashed[f"crashed-{i}"] != done[f"done-{i}"]  # a new process
    pid0, pid1 = crashed["crashed-0"], crashed["crashed-1"]
    assert f"WARNING securetcp.process child 0 (pid {pid0}) exited with status 3" in result.stderr
    assert f"WARNING securetcp.process child 1 (pid {pid1}) killed by signal 9" in result.stderr


def test_too_many_restarts(tmp_path: Path) -> None:
    body = """
i = fork_processes(1, max_restarts=2)
record(f"run-{os.getpid()}")
os._exit(1)
"""
    result = run_script(body, tmp_path)
    assert result.returncode == 1
    assert "RuntimeError: Too many child restarts, giving up" in result.stderr
    assert len(records(tmp_path, "run-")) == 3  # the first run and two restarts


SERVE_FOREVER = """
mode = sys.argv[2]
i = fork_processes(2)
if mode != "default":
    status = {"exit0": 0, "exit2": 2}[mode]
    signal.signal(signal.SIGTERM, lambda *args: sys.exit(status))
    signal.signal(signal.SIGINT, lambda *args: sys.exit(status))
record(f"pid-{i}", str(os.getpid()))
while True:
    signal.pause()
"""


def start_server(
    out: Path, mode: str, reaper: list[int]
) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + SERVE_FOREVER, str(out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, for the reaper
    )
    reaper.append(proc.pid)
    wait_until(lambda: len(records(out, "pid-")) == 2 or proc.poll() is not None, 10)
    assert proc.poll() is None, proc.communicate(timeout=10)
    return proc, [int(pid) for pid in records(out, "pid-").values()]


@pytest.mark.parametrize(
    ("sig", "mode", "status"),
    [
        (signal.SIGTERM, "default", 0),
        (signal.SIGINT, "default", 0),
        (signal.SIGTERM, "exit0", 0),
        (signal.SIGTERM, "exit2", 1),
    ],
)
def test_signal_is_forwarded_to_children(
    tmp_path: Path, reaper: list[int], sig: int, mode: str, status: int
) -> None:
    proc, pids = start_server(tmp_path, mode, reaper)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == status, err
    assert not any(alive(pid) for pid in pids)
    if status:
        assert "exited with status 2" in err
    else:
        assert "WARNING" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_killed_parent(tmp_path: Path, reaper: list[int]) -> None:
    proc, pids = start_server(tmp_path, "default", reaper)
    proc.kill()
    proc.communicate(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), 10, "the children to exit")
