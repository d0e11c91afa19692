"""Shared fixtures: a trustme PKI written to tmp_path, and coroutine tests.

`PKI` and `make_pki` live in tests/certbuilder.py (every certificate the
tests use is built there) and are re-exported here for the tests that
import them from conftest.

A test written as ``async def`` runs in a fresh event loop under
``asyncio.run`` (no plugin needed), bounded by `ASYNC_TEST_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Iterator

import pytest
from certbuilder import PKI, make_pki

__all__ = ["ASYNC_TEST_TIMEOUT", "PKI", "make_pki", "no_fd_leak", "open_fds", "pki"]

ASYNC_TEST_TIMEOUT = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with asyncio.run, bounded in time."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = inspect.signature(pyfuncitem.obj).parameters
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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A session-wide test PKI (keys generated at run time, in a temp dir)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
