"""Certificate reloading: watch files, and swap in a new set once it is whole.

Renewal tools (certbot and most others) replace the certificate and the key
one after the other, so a poll can catch a renewal half-way. A changed set of
files is therefore only validated once it has looked the same for two polls
in a row (one ``interval`` without change); a set that then fails to load is
logged once, and the previous certificates keep serving. A manual reload
(``reload()``, SIGHUP) validates at once: the operator says the files are
ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from securetcp.tls.errors import SSLOptionsError

__all__ = ["FileSignature", "Reloader", "file_signature"]

log = logging.getLogger("securetcp.tls")

T = TypeVar("T")

FileSignature = tuple[tuple[str, int, int, int], ...]


def file_signature(paths: Iterable[str]) -> FileSignature:
    """(path, mtime_ns, inode, size) of each path; (path, -1, -1, errno) when missing."""
    result = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            result.append((path, -1, -1, exc.errno or 0))
        else:
            result.append((path, st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(result)


class Reloader(Generic[T]):
    """Polls `files()` every `interval` seconds; `build()` the new state when they
    changed and settled, then hands it to `swap(state)`.

    `build` raises `SSLOptionsError` for a set it cannot use. The poll timer
    belongs to this object: `start()` (inside the running loop) and `stop()`
    are counted, so several servers may share one configuration.
    """

    def __init__(
        self,
        files: Callable[[], list[str]],
        build: Callable[[], T],
        swap: Callable[[T], None],
        interval: float | None,
    ) -> None:
        self._files = files
        self._build = build
        self._swap = swap
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._users = 0
        # What is serving now; a candidate seen once; a set that failed.
        self._current = file_signature(files())
        self._candidate: FileSignature | None = None
        self._failed: FileSignature | None = None

    def mark_loaded(self, signature: FileSignature) -> None:
        """Record `signature` as the files the serving state was built from."""
        self._current = signature

    def check(self, *, manual: bool = False) -> bool:
        """Look at the files now; True if a changed, valid set was swapped in."""
        seen = file_signature(self._files())
        if seen == self._current:
            self._candidate = None
            return False
        if not manual:
            if seen == self._failed:
                return False  # still the broken set: already logged
            if seen != self._candidate:
                self._candidate = seen  # changed since the last poll: let it settle
                return False
        self._candidate = None
        try:
            state = self._build()
        except SSLOptionsError as exc:
            if seen != self._failed or manual:
                log.error("certificate reload failed, still serving the previous one: %s", exc)
            self._failed = seen
            return False
        self._current, self._failed = seen, None
        self._swap(state)
        return True

    @property
    def active(self) -> bool:
        """Whether polling is scheduled."""
        return self._handle is not None

    def start(self) -> None:
        """Start polling in the running loop (no-op without an interval)."""
        if self.interval is None:
            return
        self._users += 1
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop polling once every `start()` has been matched by a `stop()`."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.interval is not None
        self._handle = loop.call_later(self.interval, self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.check()
        except Exception:  # never let a surprise stop the polling
            log.exception("unexpected error while checking certificate files")
        if self._handle is not None:
            self._schedule(loop)
