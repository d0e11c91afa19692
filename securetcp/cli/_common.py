"""What every subcommand shares: exit statuses, errors, logging, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, NoReturn

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "CheckFailed",
    "CommandError",
    "Subcommands",
    "add_cert_options",
    "add_json_option",
    "add_logging_options",
    "add_subcommands",
    "configure_logging",
    "logging_parent",
    "one_line_error",
    "print_json",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (and exit status 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` on stderr and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


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


def _logging_arguments(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # With SUPPRESS defaults a subcommand's copy sets a value only when given,
    # so the top-level value (or default) stands otherwise.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="debug logging, and tracebacks on errors",
    )
    group.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default("info"),
        help="log level (default: info)",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="text lines, or one JSON object per line (default: text)",
    )


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """--verbose, --log-level and --log-format on the top-level parser."""
    _logging_arguments(parser, suppress=False)


def logging_parent() -> argparse.ArgumentParser:
    """The logging options for a subcommand's parser (``parents=[...]``).

    They may then be given after the subcommand too
    (``securetcp echo --log-format json``).
    """
    parent = argparse.ArgumentParser(add_help=False)
    _logging_arguments(parent, suppress=True)
    return parent


class Subcommands:
    """``add_subparsers()``'s result, giving every subcommand the logging options."""

    def __init__(self, action: Any) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """As ``add_parser``, with the logging options added (and RawDescription help)."""
        kwargs["parents"] = [*kwargs.get("parents", ()), logging_parent()]
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        return parser


def add_subcommands(parser: argparse.ArgumentParser, dest: str, metavar: str) -> Subcommands:
    """Required subcommands of ``parser``, stored in ``args.<dest>``."""
    return Subcommands(parser.add_subparsers(dest=dest, required=True, metavar=metavar))


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json``: print one JSON object (``what``) on one line instead of text."""
    parser.add_argument(
        "--json", action="store_true", help=f"print {what} as one JSON object on one line"
    )


def add_cert_options(
    parser: argparse.ArgumentParser | Any,
    *,
    prefix: str = "",
    cert_help: str = "certificate chain (PEM)",
    key_help: str = "private key (PEM; default: in the certificate file)",
    required: bool = False,
) -> None:
    """``--cert``/``--key`` (``--certfile``/``--keyfile`` as aliases), optionally prefixed."""
    dash = f"--{prefix}-" if prefix else "--"
    dest = f"{prefix.replace('-', '_')}_" if prefix else ""
    parser.add_argument(
        f"{dash}cert",
        f"{dash}certfile",
        dest=f"{dest}cert",
        metavar="FILE",
        required=required,
        help=cert_help,
    )
    parser.add_argument(
        f"{dash}key", f"{dash}keyfile", dest=f"{dest}key", metavar="FILE", help=key_help
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
