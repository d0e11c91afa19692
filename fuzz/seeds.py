"""Seed corpora for the fuzz targets, written at run time (nothing secret is stored).

``python fuzz/seeds.py TARGET DIR`` fills DIR with seeds for TARGET: the
captured ClientHellos of fuzz/corpus/clienthello for ``handshake`` and
``after_handshake`` (plus a fresh one from this Python's ssl), PROXY headers
from `encode_proxy_header` for ``proxyproto``, a few frames for ``framing``.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import sys
from pathlib import Path

CAPTURED = Path(__file__).resolve().parent / "corpus" / "clienthello"


def python_client_hello() -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def proxy_headers() -> list[bytes]:
    try:
        from securetcp.proxyproto import encode_proxy_header
    except ImportError:
        return [b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n"]
    seeds = []
    for version in (1, 2):
        seeds.append(encode_proxy_header(("192.0.2.1", 56324), ("192.0.2.2", 443), version=version))
        seeds.append(encode_proxy_header(("2001:db8::1", 1), ("2001:db8::2", 2), version=version))
        seeds.append(encode_proxy_header(None, None, version=version))
    return seeds


ORDER = ("handshake", "after_handshake", "framing", "proxyproto")  # as targets.SINGLE


def write_seeds(target: str, directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    if target == "all":
        for index, single in enumerate(ORDER):
            part = directory / single
            write_seeds(single, part)
            for path in part.iterdir():
                (directory / f"{single}-{path.name}").write_bytes(
                    bytes([index]) + path.read_bytes()
                )
                path.unlink()
            part.rmdir()
        return len(list(directory.iterdir()))
    seeds: list[bytes]
    if target in ("handshake", "after_handshake"):
        for path in CAPTURED.glob("*.bin"):
            shutil.copy(path, directory / path.name)
        seeds = [python_client_hello()] if target == "handshake" else [b"\x17\x03\x03\x00\x10"]
    elif target == "proxyproto":
        seeds = proxy_headers()
    else:
        seeds = [b"\x00\x03\x01\nline one\nline two\n", b"\x01\x07\x04abcd0123456789"]
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i}.bin").write_bytes(seed)
    return len(list(directory.iterdir()))


if __name__ == "__main__":
    print(write_seeds(sys.argv[1], Path(sys.argv[2])))
