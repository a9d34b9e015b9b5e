"""`python -m server`: the attnserve gRPC server."""

import sys

from server.app import main

sys.exit(main())
