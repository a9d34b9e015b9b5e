"""`python -m server` (from a checkout) or `python -m attnserve.server`: the attnserve server."""

import sys

from attnserve.server.app import main

sys.exit(main())
