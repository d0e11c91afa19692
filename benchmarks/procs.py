"""Server processes: start, wait until they echo, measure, and always stop them.

CPU time and memory come from /proc (no psutil). A server started with
``fork_processes`` is a process tree; its CPU time is summed over the tree.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")

_LIVE: set[ServerProcess] = set()


class ServerFailed(RuntimeError):
    """The server did not start, died, or stopped answering."""


def raise_nofile_limit(wanted: int = 65536) -> None:
    """Raise this process's RLIMIT_NOFILE soft limit (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants (by scanning /proc for parents)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and Private (clean + dirty) of one process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0])
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "private": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    }


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a log file, joined with " | "."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class ServerProcess:
    """One benchmark server (a process group of its own), as a context manager."""

    def __init__(self, argv: list[str], *, log_path: Path, cpus: set[int] | None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)
        if self.cpus is not None:
            # If it died at once, wait_ready reports it.
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(self.proc.pid, self.cpus)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The main process id."""
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the server printed (for failure reports)."""
        return log_tail(self.log_path, lines)

    def check_alive(self) -> None:
        """Raise ServerFailed if the main process has exited."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise ServerFailed(f"server exited with status {code}: {self.log_tail()}")

    def wait_ready(self, probe: Callable[[], None], timeout: float) -> None:
        """Poll ``probe`` (a full TLS echo) until it succeeds, with a deadline."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                probe()
                return
            except OSError as e:  # ssl.SSLError and socket.timeout are OSErrors
                last = e
            time.sleep(0.05)
        raise ServerFailed(f"server not ready after {timeout:.0f}s ({last}): {self.log_tail()}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's whole process tree so far."""
        total = 0.0
        for pid in descendants(self.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
                total += proc_cpu_seconds(pid)
        return total

    def process_count(self) -> int:
        """Number of live processes in the server's tree."""
        return len(descendants(self.pid))

    def memory_kib(self) -> dict[str, int]:
        """Memory of the main server process (see :func:`memory_kib`)."""
        return memory_kib(self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``timeout``; reap."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # SIGKILL also catches forked children left after the leader exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        _LIVE.discard(self)


def stop_all() -> None:
    """Stop every server still running (for atexit and signal handlers)."""
    for server in list(_LIVE):
        server.stop(timeout=2.0)
