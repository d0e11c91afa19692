"""The `securetcp` command (also `python -m securetcp`).

Each subcommand lives in its own module of this package and registers its
parser through ``register(commands)``; this module only dispatches and turns
errors into exit statuses: 0 success, 1 a check that failed, 2 a usage or
configuration error. Errors are one line on stderr, never a traceback
(unless ``--verbose``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from collections.abc import Sequence

from securetcp.cli._common import (
    EXIT_USAGE,
    ArgumentParser,
    CheckFailed,
    CommandError,
    add_logging_options,
    add_subcommands,
    configure_logging,
    one_line_error,
)

__all__ = ["main"]

#: The subcommand modules in the order `--help` lists them; any other public
#: module of this package is a subcommand too, listed after these.
COMMANDS = ("echo", "proxy", "certs", "probe", "badssl")

EXAMPLES = """\
examples:
  securetcp certs init                      # development CA and certificates in certs/
  securetcp echo --port 8443                # TLS echo server on those certificates
  securetcp probe example.org:443           # what the server at the other end offers
  securetcp certs check --cert certs/server.pem --key certs/server.key --ca certs/ca.pem
  securetcp --log-format json echo          # logging options go before or after COMMAND

Run `securetcp COMMAND --help` for each command's options and examples.
"""


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in COMMANDS if n in found] + sorted(found - set(COMMANDS))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every subcommand registered."""
    parser = ArgumentParser(
        prog="securetcp",
        description="A TLS-first TCP server toolkit: servers, a TLS proxy and TLS diagnostics.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_logging_options(parser)
    # Every subcommand also accepts the logging options after its name.
    commands = add_subcommands(parser, "command", "COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"securetcp.cli.{name}")
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `securetcp` command; returns its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    configure_logging(args)
    try:
        result: int = args.func(args)
    except CheckFailed as e:
        print(f"securetcp: {e}", file=sys.stderr)
        return 1
    except CommandError as e:
        print(f"securetcp: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()  # then the one line, and the same exit status
        print(f"securetcp: {one_line_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    return result
