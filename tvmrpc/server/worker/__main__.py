"""``python -m tvmrpc.server.worker``: the zygote's entry point (spawned by the daemon)."""

import sys

from .zygote import main

sys.exit(main())
