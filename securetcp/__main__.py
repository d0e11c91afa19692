"""`python -m securetcp`: the `securetcp` command."""

import sys

from securetcp.cli import main

sys.exit(main())
