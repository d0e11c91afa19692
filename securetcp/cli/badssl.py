"""`securetcp badssl`: an offline badssl, every broken-TLS scenario on its own port."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from typing import Any

from securetcp.cli._common import CommandError, print_json

__all__ = ["register"]

EXAMPLES = """\
examples:
  securetcp badssl --base-port 9000 --ca-out /tmp/badssl-ca.pem
  curl --cacert /tmp/badssl-ca.pem https://localhost:9001/      # expired: curl exit 60
  openssl s_client -connect 127.0.0.1:9001 -CAfile /tmp/badssl-ca.pem \\
      -verify_return_error -verify_hostname localhost           # Verify return code: 10
  securetcp badssl --only good,expired,wrong-host --json        # one JSON line for scripts
  securetcp badssl --sni-port 8443 --ca-out ca.pem              # all of them on one port:
  curl --cacert ca.pem --resolve expired.badssl.test:8443:127.0.0.1 \\
      https://expired.badssl.test:8443/

Each scenario answers an HTTP request with one line naming it, and echoes
anything else. `--json` prints {"ca", "crl", "client_cert", "client_key",
"host", "sni_port", "scenarios": [{"name", "port", "server_name", "expect",
"description", "clients", "verify_code", ...}], "unavailable": [...]}.
"""


def _parse_only(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise CommandError("--only needs at least one scenario name")
    return names


def _table(description: dict[str, Any]) -> str:
    rows = [("SCENARIO", "PORT", "HOST NAME", "PYTHON", "OPENSSL", "GNUTLS", "DESCRIPTION")]
    for entry in description["scenarios"]:
        clients = entry["clients"]
        rows.append(
            (
                entry["name"],
                str(entry["port"]),
                entry["server_name"],
                clients["python"],
                clients["openssl"],
                clients["gnutls"],
                entry["description"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _run(args: argparse.Namespace) -> int:
    from securetcp.services.badssl import SCENARIOS, BadSSLServer

    only = _parse_only(args.only)
    unknown = [n for n in only or () if n not in SCENARIOS]
    if unknown:
        raise CommandError(f"unknown scenario {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    for option in ("base_port", "sni_port"):
        port = getattr(args, option)
        if port is not None and not 0 <= port <= 65535:
            raise CommandError(f"--{option.replace('_', '-')} must be a port number (0-65535)")
    if args.base_port and args.base_port + len(SCENARIOS) - 1 > 65535:
        raise CommandError(f"--base-port leaves no room for {len(SCENARIOS)} ports")
    server = BadSSLServer(only, host=args.host, base_port=args.base_port, sni_port=args.sni_port)
    try:
        try:
            server.listen()
        except OSError as e:
            where = "" if args.base_port is None else f" (ports from {args.base_port})"
            raise CommandError(f"cannot listen on {args.host}{where}: {e.strerror or e}") from e
        if args.ca_out:
            try:
                shutil.copyfile(server.ca_file, args.ca_out)
            except OSError as e:
                raise CommandError(f"--ca-out {args.ca_out}: {e.strerror or e}") from e
        description = server.describe()
        if args.ca_out:
            description["ca"] = args.ca_out

        def ready() -> None:  # printed once SIGINT/SIGTERM close gracefully
            if args.json:
                print_json(description)
            else:
                print(_readable(description), flush=True)

        server.run(ready)
    finally:
        asyncio.run(server.close())  # idempotent: removes the temporary PKI directory
    return 0


def _readable(description: dict[str, Any]) -> str:
    host, ca = description["host"], description["ca"]
    lines = [
        f"badssl: {len(description['scenarios'])} scenarios on {host} (Ctrl-C to stop)",
        f"CA to trust: {ca}   CRL: {description['crl']}",
        f"client certificate: {description['client_cert']} {description['client_key']}",
        "",
        _table(description),
    ]
    for entry in description["unavailable"]:
        lines.append(f"unavailable: {entry['name']}: {entry['reason']}")
    if description["scenarios"]:
        first = description["scenarios"][0]
        lines += [
            "",
            "try:",
            f"  curl --cacert {ca} https://{first['server_name']}:{first['port']}/"
            if first["server_name"] == "localhost"
            else f"  curl --cacert {ca} --resolve {first['server_name']}:{first['port']}:{host} "
            f"https://{first['server_name']}:{first['port']}/",
            f"  openssl s_client -connect {host}:{first['port']} -CAfile {ca} "
            f"-verify_return_error -verify_hostname {first['server_name']} "
            f"-servername {first['server_name']}",
        ]
    named = [e for e in description["scenarios"] if "sni_name" in e]
    if description["sni_port"] is not None and named:
        sni, name = description["sni_port"], named[0]["sni_name"]
        lines.append(
            f"  all on one port (SNI): curl --cacert {ca} --resolve {name}:{sni}:{host} "
            f"https://{name}:{sni}/"
        )
    return "\n".join(lines)


def register(commands: Any) -> None:
    """Add `badssl` to the command line."""
    parser = commands.add_parser(
        "badssl",
        help="serve TLS scenarios with broken certificates and settings (an offline badssl)",
        description="Serve every badssl scenario from one PKI generated now, one port each "
        "(and optionally all on one port, chosen by SNI), until SIGINT or SIGTERM.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--base-port",
        type=int,
        default=None,
        metavar="N",
        help="scenario i of the catalogue on port N+i (default: any free ports)",
    )
    parser.add_argument("--ca-out", metavar="FILE", help="also write the CA certificate here")
    parser.add_argument("--only", metavar="NAME,...", help="serve only these scenarios")
    parser.add_argument("--json", action="store_true", help="print one JSON line, then serve")
    parser.add_argument(
        "--sni-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve every scenario on port N, chosen by SNI name SCENARIO.badssl.test",
    )
    parser.set_defaults(func=_run)
