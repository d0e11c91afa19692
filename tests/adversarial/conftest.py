"""Fixtures of the adversarial suite: a server process under attack and a client context."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import PKI

from .helpers import ALL_KINDS, ServerProcess, target_process, warmed_baseline

HANDSHAKE_TIMEOUT = 2.0
"""The attacked echo server's handshake_timeout (short, so slow attacks end soon)."""


@dataclass
class Target:
    """A running server process and its descriptor count before any attack."""

    server: ServerProcess
    baseline_fds: int


@pytest.fixture(scope="session")
def context(pki: PKI) -> ssl.SSLContext:
    """A well-behaved client's context: it trusts the test CA."""
    return pki.client_context()


@pytest.fixture(scope="module", params=ALL_KINDS)
def echo(
    request: pytest.FixtureRequest,
    pki: PKI,
    context: ssl.SSLContext,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Target]:
    """securetcp's echo service, its TLS proxy in front of a plain echo
    upstream, and the echo service on uvloop, each in its own process,
    handshake_timeout 2 s."""
    tmp = tmp_path_factory.mktemp(request.param)
    with target_process(
        request.param, pki, tmp, "--handshake-timeout", str(HANDSHAKE_TIMEOUT)
    ) as server:
        yield Target(server, warmed_baseline(server, context))
