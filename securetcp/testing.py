"""pytest plugin: a test CA, certificates and running TLS servers for any project.

Installed with securetcp (entry point ``pytest11``).
"""

from __future__ import annotations

import pytest
import trustme

__all__ = ["tls_ca", "tls_client_cert", "tls_server_cert"]


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throw-away certificate authority for the whole test session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate for localhost, 127.0.0.1 and ::1, issued by `tls_ca`."""
    return tls_ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def tls_client_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A client certificate (common name ``securetcp-test-client``) issued by `tls_ca`."""
    return tls_ca.issue_cert("client@example.org", common_name="securetcp-test-client")
