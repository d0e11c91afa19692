"""Shared fixtures: a trustme PKI written to tmp_path, and coroutine tests.

A test written as ``async def`` runs in a fresh event loop under
``asyncio.run`` (no plugin needed), bounded by `ASYNC_TEST_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

ASYNC_TEST_TIMEOUT = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with asyncio.run, bounded in time."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def bounded() -> None:
        await asyncio.wait_for(pyfuncitem.obj(**kwargs), ASYNC_TEST_TIMEOUT)

    asyncio.run(bounded())
    return True


def open_fds() -> set[int]:
    """The file descriptors this process has open now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves file descriptors open."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    details = {}
    for fd in leaked:
        try:
            details[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the listing's own descriptor, already gone
    assert not details, f"file descriptors left open: {details}"


@dataclasses.dataclass
class PKI:
    """A trustme CA with a server and client certificate, also as files."""

    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def client_context(self, *, with_client_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting this CA (optionally presenting the client cert)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return context

    def ssl_options(self, **extra: Any) -> dict[str, Any]:
        """Tornado-style ssl_options for the server certificate."""
        return {"certfile": str(self.cert_file), "keyfile": str(self.key_file), **extra}


def make_pki(directory: Path, **ca_options: Any) -> PKI:
    """Create a CA, a server cert for localhost/127.0.0.1/::1 and a client cert."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(**ca_options)
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client@example.org", common_name="test-client")
    paths = {
        "ca_file": directory / "ca.pem",
        "cert_file": directory / "server.pem",
        "key_file": directory / "server.key",
        "client_cert_file": directory / "client.pem",
        "client_key_file": directory / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca_file"]))
    server.private_key_pem.write_to_path(str(paths["key_file"]))
    with open(paths["cert_file"], "wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    client.private_key_pem.write_to_path(str(paths["client_key_file"]))
    with open(paths["client_cert_file"], "wb") as f:
        for blob in client.cert_chain_pems:
            f.write(blob.bytes())
    return PKI(ca=ca, server=server, client=client, **paths)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A session-wide test PKI (keys generated at run time, in a temp dir)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
