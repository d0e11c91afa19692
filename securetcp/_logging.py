"""Logging helpers shared by the servers: a rate-limited log and address formatting.

A server facing the internet logs per-connection failures; a flood of them must
not flood the log. `RateLimitedLog` lets `burst` lines through per `period`
seconds and sums up the rest in one line when the next period starts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog", "format_address"]


class RateLimitedLog:
    """At most `burst` lines per `period` seconds; the rest are counted and summarised."""

    __slots__ = ("_burst", "_count", "_logger", "_period", "_suppressed", "_window_start")

    def __init__(self, logger: logging.Logger, burst: int = 20, period: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def log(self, level: int, message: str, *args: object) -> None:
        """Log `message % args` at `level`, unless this period's burst is spent."""
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._logger.log(
                    level,
                    "%d more similar messages suppressed in the last %.0f s",
                    self._suppressed,
                    self._period,
                )
            self._window_start, self._count, self._suppressed = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._logger.log(level, message, *args)
        else:
            self._suppressed += 1

    def info(self, message: str, *args: object) -> None:
        """`log` at INFO."""
        self.log(logging.INFO, message, *args)


def format_address(address: Any) -> str:
    """``host:port`` (``[v6]:port``) for a socket address; a unix socket's path or name."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "unix socket"
