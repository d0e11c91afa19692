"""What every subcommand shares: exit statuses, errors, logging, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CheckFailed",
    "CommandError",
    "add_logging_options",
    "configure_logging",
    "one_line_error",
    "print_json",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A usage or configuration error: one line on stderr, exit status 2."""


class CheckFailed(Exception):
    """A check that failed (a certificate that does not verify...): exit status 1."""


def one_line_error(error: BaseException) -> str:
    """`error` as one line: its message, or its type name when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class JSONLogFormatter(logging.Formatter):
    """One JSON object per log record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """--verbose, --log-level and --log-format, accepted before the subcommand."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors"
    )
    group.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level (default: info)",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (default: text)",
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Send log records to stderr as the logging options say."""
    level = logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JSONLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def print_json(value: Any) -> None:
    """Print `value` as one line of JSON on stdout, flushed (scripts read it at once)."""
    print(json.dumps(value, ensure_ascii=False, sort_keys=False), flush=True)
