"""Pre-forking: run a server in several processes that share listening sockets.

Modelled on ``tornado.process``.  The usual sequence is ``bind_sockets()``, then
:func:`fork_processes`, then start an event loop in each child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["cpu_count", "fork_processes", "task_id"]

log = logging.getLogger("securetcp.process")

_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_task_id: int | None = None


def cpu_count() -> int:
    """Return the number of CPUs this process may run on (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0)) or 1
        except OSError:
            pass
    return os.cpu_count() or 1


def task_id() -> int | None:
    """Return the task id of this child of :func:`fork_processes`, else None."""
    return _task_id


def fork_processes(num_processes: int | None, max_restarts: int | None = 100) -> int:
    """Fork ``num_processes`` children and return the task id in each of them.

    ``None`` or a value <= 0 means one child per CPU (:func:`cpu_count`).  Each
    child returns its task id, an int in ``range(num_processes)`` that
    :func:`task_id` also returns from then on.  Children start with the default
    SIGTERM and SIGINT handlers, a freshly seeded :mod:`random`, and, on Linux,
    die with SIGTERM if the parent dies (even by SIGKILL).

    The parent never returns.  It restarts a child that exits abnormally
    (killed by a signal or a non-zero exit status) with the same task id; after
    more than ``max_restarts`` restarts in total (``None``: 100) it raises
    ``RuntimeError``; any exception leaving the parent first sends SIGTERM to
    the remaining children.  Once every child has exited normally it calls
    ``sys.exit(0)``.

    SIGTERM and SIGINT sent to the parent are forwarded to all children and stop
    the restarts; signals received again are forwarded again.  The parent then
    waits for the children and exits with status 0 if each of them exited with
    status 0 or was killed by a forwarded signal, else with status 1.

    Must be called from the main thread before any event loop is started:
    ``RuntimeError`` if an asyncio event loop is running in this thread.
    """
    if sys.platform == "win32":
        raise RuntimeError("fork_processes() is not available on Windows")
    if _task_id is not None:
        raise RuntimeError("fork_processes() called in a child it created")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("fork_processes() must be called before an event loop is started")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("fork_processes() must be called from the main thread")
    if num_processes is None or num_processes <= 0:
        num_processes = cpu_count()
    if max_restarts is None:
        max_restarts = 100
    log.info("Starting %d processes", num_processes)
    return _Supervisor(num_processes, max_restarts).run()


class _Supervisor:
    """The parent side of fork_processes()."""

    def __init__(self, num_processes: int, max_restarts: int) -> None:
        self.num_processes = num_processes
        self.max_restarts = max_restarts
        self.parent_pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> task id
        self.stop_signals: set[int] = set()  # signals forwarded so far
        self.failed = False  # a child exited abnormally despite a stop signal
        # Load prctl() here: dlopen() in a child forked from a threaded parent
        # could deadlock on the loader lock.
        self.set_pdeathsig = _pdeathsig_setter()

    def run(self) -> int:
        saved = {sig: signal.signal(sig, self._forward) for sig in _FORWARDED_SIGNALS}
        try:
            for i in range(self.num_processes):
                if self.stop_signals:  # told to stop while starting up
                    break
                if self._start_child(i):
                    return i
            return self._supervise()
        except Exception:
            if os.getpid() == self.parent_pid:
                self._kill_children(signal.SIGTERM)  # don't leave them unsupervised
            raise
        finally:
            if os.getpid() == self.parent_pid:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

    def _supervise(self) -> int:
        restarts = 0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # someone else reaped them
                break
            i = self.children.pop(pid, None)
            if i is None:
                continue
            if self._exited_cleanly(i, pid, status) or self.stop_signals:
                continue
            restarts += 1
            if restarts > self.max_restarts:
                raise RuntimeError("Too many child restarts, giving up")
            if self._start_child(i):
                return i
        sys.exit(1 if self.failed else 0)

    def _exited_cleanly(self, i: int, pid: int, status: int) -> bool:
        """Log how child ``i`` ended; True for status 0 or a forwarded signal."""
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig in self.stop_signals:
                log.info("child %d (pid %d) stopped by signal %d", i, pid, sig)
                return True
            log.warning("child %d (pid %d) killed by signal %d", i, pid, sig)
        elif os.WEXITSTATUS(status) != 0:
            log.warning("child %d (pid %d) exited with status %d", i, pid, os.WEXITSTATUS(status))
        else:
            log.info("child %d (pid %d) exited normally", i, pid)
            return True
        if self.stop_signals:
            self.failed = True
        return False

    def _start_child(self, i: int) -> bool:
        """Fork child ``i``; True in the child, False in the parent."""
        # Output buffered now would otherwise be written by both processes.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        # Block the forwarded signals across fork() so that the parent's handler
        # never runs in the child, and the parent's handler sees the new pid.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._init_child(i)
                return True
            self.children[pid] = i
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _init_child(self, i: int) -> None:
        global _task_id
        _task_id = i
        for sig in _FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.set_pdeathsig(signal.SIGTERM)
        if os.getppid() != self.parent_pid:
            # The parent died before PR_SET_PDEATHSIG took effect: do what it
            # would have done (delivered once the signal mask is restored).
            os.kill(os.getpid(), signal.SIGTERM)
        random.seed()

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signals.add(signum)
        self._kill_children(signum)

    def _kill_children(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _pdeathsig_setter() -> Callable[[int], None]:
    """Return a function that asks Linux to send us a signal when the parent dies."""
    if not sys.platform.startswith("linux"):
        return lambda sig: None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda sig: None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def set_pdeathsig(sig: int) -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))

    return set_pdeathsig
