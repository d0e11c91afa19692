"""An offline badssl: TLS servers with deliberately broken certificates and settings.

`SCENARIOS` is the catalogue (name -> `Scenario`, with the outcome a correctly
verifying client must see); `BadSSLServer` serves them all from one PKI
generated at start. ``securetcp badssl`` runs it from the command line, and
the ``badssl_server`` fixture of `securetcp.testing` inside a test suite.
"""

from securetcp.services.badssl.pki import BadSSLPKI
from securetcp.services.badssl.scenarios import (
    CLIENTS,
    EXPECT_VALUES,
    SCENARIOS,
    VERIFY_CODE_OUTCOMES,
    Scenario,
    classify_error,
)
from securetcp.services.badssl.server import BadSSLServer, parse_client_hello_sni

__all__ = [
    "CLIENTS",
    "EXPECT_VALUES",
    "SCENARIOS",
    "VERIFY_CODE_OUTCOMES",
    "BadSSLPKI",
    "BadSSLServer",
    "Scenario",
    "classify_error",
    "parse_client_hello_sni",
]
