"""`securetcp certs init|show`: development certificates and what a PEM file holds."""

from __future__ import annotations

import argparse
from typing import Any

from securetcp.certs import load_pem_certificates, peer_identity_from_certificate, write_dev_certs

__all__ = ["register"]


def _init(args: argparse.Namespace) -> int:
    paths = write_dev_certs(args.dir, overwrite=args.force)
    print(f"development certificates in {paths.ca.parent}/ (CA: {paths.ca})")
    return 0


def _show(args: argparse.Namespace) -> int:
    for cert in load_pem_certificates(args.file):
        identity = peer_identity_from_certificate(cert)
        print(f"subject:     {cert.subject.rfc4514_string()}")
        print(f"issuer:      {cert.issuer.rfc4514_string()}")
        valid = f"{identity.not_before:%Y-%m-%d %H:%M} .. {identity.not_after:%Y-%m-%d %H:%M}"
        print(f"valid:       {valid} UTC")
        names = [
            *identity.dns_names,
            *map(str, identity.ip_addresses),
            *identity.uris,
            *identity.emails,
        ]
        print(f"names:       {', '.join(names) or '-'}")
        print(f"serial:      {identity.serial:x}")
        print(f"sha256:      {identity.fingerprint_sha256}")
        print()
    return 0


def register(commands: Any) -> None:
    """Add `certs init` and `certs show` to the command line."""
    certs = commands.add_parser("certs", help="development certificates, inspection and checks")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs_commands.add_parser("init", help="write a dev CA, server and client certificate")
    init.add_argument("--dir", default="certs", help="directory to write to (default: certs)")
    init.add_argument("--force", action="store_true", help="replace existing certificates")
    init.set_defaults(func=_init)
    show = certs_commands.add_parser("show", help="print what a PEM certificate file holds")
    show.add_argument("file")
    show.set_defaults(func=_show)
