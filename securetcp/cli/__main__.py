"""`python -m securetcp.cli` (kept for the tests and scripts that use it)."""

import sys

from securetcp.cli import main

sys.exit(main())
