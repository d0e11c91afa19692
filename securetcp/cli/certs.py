"""`securetcp certs init|show|check`: development certificates, inspection and checks."""

from __future__ import annotations

import argparse
from typing import Any

from securetcp.certcheck import CheckReport, check_certificate
from securetcp.certs import (
    chain_order_problems,
    describe_certificate,
    load_pem_certificates,
    write_dev_certs,
)
from securetcp.cli._common import (
    CheckFailed,
    CommandError,
    add_cert_options,
    add_json_option,
    add_subcommands,
    print_json,
)

__all__ = ["register"]

EXAMPLES = """\
examples:
  securetcp certs init                                  # dev CA + server/client certs in certs/
  securetcp certs show certs/server.pem                 # what the file holds
  securetcp certs check --cert certs/server.pem --key certs/server.key --ca certs/ca.pem \\
      --hostname localhost                              # fit to serve? exit 1 if not
"""

SHOW_EXAMPLES = """\
examples:
  securetcp certs show certs/server.pem
  securetcp certs show --cert certs/server.pem --json
"""

CHECK_EXAMPLES = """\
examples:
  securetcp certs check --cert certs/server.pem --key certs/server.key --ca certs/ca.pem
  securetcp certs check --cert certs/server.pem --ca certs/ca.pem --hostname localhost --json
  securetcp certs check --cert certs/client.pem --key certs/client.key --ca certs/ca.pem \\
      --purpose client
  securetcp certs check --cert /etc/ssl/example.org.pem --hostname example.org  # trusts certifi

exit status: 0 every check passed (warnings allowed), 1 a check failed, 2 a file is unusable.
"""


def _init(args: argparse.Namespace) -> int:
    try:
        paths = write_dev_certs(args.dir, overwrite=args.force)
    except FileExistsError as e:
        raise CommandError(f"{e} (run `securetcp certs init --force` to replace them)") from None
    print(f"development certificates in {paths.ca.parent}/ (CA: {paths.ca})")
    return 0


def _names(description: dict[str, Any]) -> str:
    san = description["subject_alt_names"]
    return ", ".join([*san["dns"], *san["ip"], *san["uri"], *san["email"]]) or "-"


def _key(description: dict[str, Any]) -> str:
    key = description["key"]
    if key["curve"]:
        return f"{key['type']} {key['curve']} ({key['bits']} bits)"
    return f"{key['type']} {key['bits']} bits"


def _print_certificate(index: int, total: int, d: dict[str, Any]) -> None:
    print(f"certificate {index} of {total}")
    print(f"  subject:            {d['subject']}")
    print(f"  issuer:             {d['issuer']}{'  (self-signed)' if d['self_signed'] else ''}")
    print(
        f"  valid:              {d['not_before']} .. {d['not_after']} ({d['days_left']} days left)"
    )
    print(f"  key:                {_key(d)}")
    print(f"  signature:          {d['signature_algorithm']}")
    print(f"  names:              {_names(d)}")
    if d["basic_constraints"] is not None:
        bc = d["basic_constraints"]
        pathlen = "" if bc["path_length"] is None else f", pathlen:{bc['path_length']}"
        print(f"  basic constraints:  CA:{'TRUE' if bc['ca'] else 'FALSE'}{pathlen}")
    if d["key_usage"] is not None:
        print(f"  key usage:          {', '.join(d['key_usage']) or '-'}")
    if d["extended_key_usage"] is not None:
        print(f"  extended key usage: {', '.join(d['extended_key_usage']) or '-'}")
    if d["name_constraints"] is not None:
        nc = d["name_constraints"]
        print(f"  name constraints:   permitted {', '.join(nc['permitted']) or '-'}; ", end="")
        print(f"excluded {', '.join(nc['excluded']) or '-'}")
    print(f"  serial:             {d['serial']}")
    print(f"  sha256:             {d['sha256']}")
    print()


def _show(args: argparse.Namespace) -> int:
    path = args.cert or args.file
    if path is None:
        raise CommandError("certs show: give a certificate file (FILE or --cert FILE)")
    chain = load_pem_certificates(path)
    descriptions = [describe_certificate(cert) for cert in chain]
    problems = chain_order_problems(chain)
    if args.json:
        print_json(
            {
                "file": path,
                "certificates": descriptions,
                "chain": {"in_order": not problems, "problems": problems},
            }
        )
        return 0
    for i, description in enumerate(descriptions, start=1):
        _print_certificate(i, len(descriptions), description)
    if len(chain) > 1:
        if problems:
            for problem in problems:
                print(f"chain: {problem}")
        else:
            print("chain: in order, each certificate issued by the next")
    return 0


_STATUS = {"ok": "ok", "warning": "WARNING", "failed": "FAILED", "skipped": "skipped"}


def _print_report(report: CheckReport) -> None:
    print(f"{report.cert_file} (trusting {report.ca})")
    for finding in report.findings:
        print(f"  {_STATUS[finding.status]:<8} {finding.check:<13} {finding.message}")
    failed = len(report.failures)
    print(f"result: {'ok' if not failed else f'{failed} check(s) failed'}")


def _check(args: argparse.Namespace) -> int:
    if args.cert is None:
        raise CommandError("certs check: --cert FILE is required")
    report = check_certificate(
        args.cert, args.key, ca=args.ca, hostname=args.hostname, purpose=args.purpose
    )
    if args.json:
        print_json(report.to_json())
    else:
        _print_report(report)
    failures = report.failures
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise CheckFailed(f"{report.cert_file}: {failures[0].message}{more}")
    return 0


def register(commands: Any) -> None:
    """Add `certs init`, `certs show` and `certs check` to the command line."""
    certs = commands.add_parser(
        "certs",
        help="development certificates, inspection and checks",
        description="Write development certificates, show what a PEM file holds, check it.",
        epilog=EXAMPLES,
    )
    actions = add_subcommands(certs, "certs_command", "ACTION")
    init = actions.add_parser(
        "init",
        help="write a dev CA, server and client certificate",
        description="Write ca.pem, server.pem/.key and client.pem/.key from a throw-away CA.",
        epilog="examples:\n  securetcp certs init\n  securetcp certs init --dir /tmp/pki --force\n",
    )
    init.add_argument("--dir", default="certs", help="directory to write to (default: certs)")
    init.add_argument("--force", action="store_true", help="replace existing certificates")
    init.set_defaults(func=_init)

    show = actions.add_parser(
        "show",
        help="print what a PEM certificate file holds",
        description="Every certificate of a PEM file: names, validity, key, extensions; "
        "and whether the chain is in order.",
        epilog=SHOW_EXAMPLES,
    )
    show.add_argument("file", nargs="?", help="PEM file (or --cert FILE)")
    show.add_argument("--cert", "--certfile", dest="cert", metavar="FILE", help="PEM file")
    add_json_option(show, "the certificates")
    show.set_defaults(func=_show)

    check = actions.add_parser(
        "check",
        help="check a certificate file is fit to serve (exit 1 if not)",
        description="Check that the key matches, the chain is complete, in order and "
        "verifies to the CA (certifi by default), every certificate is valid (warning "
        "under 30 days left), the hostname is covered, and keys and signatures are "
        "strong enough.",
        epilog=CHECK_EXAMPLES,
    )
    add_cert_options(check, cert_help="certificate chain to check (PEM, leaf first)")
    check.add_argument(
        "--ca", metavar="FILE", help="trusted CA file or directory (default: certifi)"
    )
    check.add_argument("--hostname", metavar="NAME", help="DNS name or IP address to cover")
    check.add_argument(
        "--purpose",
        choices=("server", "client"),
        default="server",
        help="TLS server or client certificate (default: server)",
    )
    add_json_option(check, "the report")
    check.set_defaults(func=_check)
