"""`securetcp probe HOST:PORT`: what `openssl s_client` would tell, readable."""

from __future__ import annotations

import argparse
import os
import ssl
from typing import Any

from securetcp.certs import (
    CertificateFileError,
    key_matches_certificate,
    load_pem_certificates,
    load_pem_private_key,
)
from securetcp.cli._common import (
    CheckFailed,
    CommandError,
    add_cert_options,
    add_json_option,
    print_json,
)
from securetcp.probe import ProbeResult, parse_target, probe

__all__ = ["register"]

EXAMPLES = """\
examples:
  securetcp probe example.org:443
  securetcp probe 127.0.0.1:8443 --servername localhost --ca certs/ca.pem
  securetcp probe 127.0.0.1:8443 --ca certs/ca.pem --cert certs/client.pem --key certs/client.key
  securetcp probe 127.0.0.1:8443 --ca certs/ca.pem --tls1.2 --alpn h2,http/1.1 --json

exit status: 0 the chain and the name verified, 1 it did not (or no TLS connection),
2 a usage error (a malformed HOST:PORT, an unreadable --ca/--cert/--key file).
failure kinds: refused, timeout, resolve, unreachable, not_tls, closed, protocol_version,
handshake_failure, expired, not_yet_valid, hostname_mismatch, self_signed, untrusted,
weak_key, client_certificate_required, client_certificate_rejected.
"""


def _check_files(args: argparse.Namespace) -> None:
    """Unusable local files are a usage error (2) naming the option, not a probe result."""
    try:
        if args.ca is not None and not os.path.isdir(args.ca):
            load_pem_certificates(args.ca)
        if args.cert is not None:
            leaf = load_pem_certificates(args.cert)[0]
            key = load_pem_private_key(args.key or args.cert)
            if not key_matches_certificate(key, leaf):
                raise CommandError(
                    f"--key {args.key or args.cert}: the private key does not match "
                    f"the certificate in {args.cert}"
                )
    except CertificateFileError as e:
        option = "--ca" if args.ca and str(args.ca) in str(e) else "--cert/--key"
        raise CommandError(f"{option}: {e}") from None
    if args.key is not None and args.cert is None:
        raise CommandError("--key needs --cert")


def _print(result: ProbeResult) -> None:
    print(f"probe {result.host}:{result.port} (server name {result.server_name})")
    if result.address is not None:
        print(f"  connected:  {result.address}")
    if result.protocol is not None:
        print(f"  protocol:   {result.protocol}")
        print(f"  cipher:     {result.cipher} ({result.cipher_bits} bits)")
        print(f"  group:      {result.group}")
        print(f"  ALPN:       {result.alpn or '-'}")
        print(f"  ticket:     {'offered' if result.session_ticket else 'none'}")
        if result.client_certificate_requested is not None:
            asked = "yes" if result.client_certificate_requested else "no"
            print(f"  client certificate requested: {asked}")
    if result.chain:
        note = "" if result.chain_complete else " (leaf only: this Python cannot read the rest)"
        print(f"  chain as sent{note}:")
        for i, cert in enumerate(result.to_json()["chain"], start=1):
            print(f"    {i}. {cert['subject']}")
            print(f"       issuer {cert['issuer']}")
            print(
                f"       valid {cert['not_before']} .. {cert['not_after']} "
                f"({cert['days_left']} days left), key {cert['key']['type']} "
                f"{cert['key']['curve'] or cert['key']['bits']}"
            )
    if result.ok:
        print("  verify:     OK")
    elif result.failure is not None:
        print(f"  verify:     FAILED ({result.failure.kind}): {result.failure.message}")


def _alpn(text: str | None) -> list[str]:
    if not text:
        return []
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    for protocol in protocols:
        if len(protocol.encode()) > 255:
            raise CommandError(f"--alpn: protocol name too long: {protocol[:20]}...")
    return protocols


def _run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as e:
        raise CommandError(f"HOST:PORT {e}") from None
    if args.timeout <= 0:
        raise CommandError("--timeout must be a positive number of seconds")
    _check_files(args)
    version = "1.2" if args.tls12 else "1.3" if args.tls13 else None
    try:
        result = probe(
            host,
            port,
            server_name=args.servername,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            alpn=_alpn(args.alpn),
            version=version,
            timeout=args.timeout,
        )
    except (ssl.SSLError, OSError) as e:
        raise CommandError(f"cannot use the --ca/--cert/--key files: {e}") from None
    if args.json:
        print_json(result.to_json())
    else:
        _print(result)
    if not result.ok:
        assert result.failure is not None
        raise CheckFailed(result.failure.message)
    return 0


def register(commands: Any) -> None:
    """Add `probe` to the command line."""
    parser = commands.add_parser(
        "probe",
        help="connect to a TLS server and tell what it offers and whether it verifies",
        description="Connect to HOST:PORT as a verifying TLS client (certifi unless --ca) "
        "and report protocol, cipher, key-exchange group, ALPN, session ticket, the "
        "certificate chain as sent, and whether it verifies (and why not).",
        epilog=EXAMPLES,
    )
    parser.add_argument("target", metavar="HOST:PORT", help="server (port 443 if omitted)")
    parser.add_argument(
        "--servername", metavar="NAME", help="SNI and the name to verify (default: HOST)"
    )
    parser.add_argument(
        "--ca", metavar="FILE", help="trusted CA file or directory (default: certifi)"
    )
    add_cert_options(
        parser,
        cert_help="client certificate chain (PEM), for mutual TLS",
        key_help="client key (PEM; default: in the --cert file)",
    )
    parser.add_argument("--alpn", metavar="P,...", help="ALPN protocols to offer, e.g. h2,http/1.1")
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument("--tls1.2", dest="tls12", action="store_true", help="TLS 1.2 only")
    versions.add_argument("--tls1.3", dest="tls13", action="store_true", help="TLS 1.3 only")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="bound on each connection and handshake (default: 10)",
    )
    add_json_option(parser, "the result")
    parser.set_defaults(func=_run)
