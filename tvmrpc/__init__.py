"""tvmrpc: a Twisted implementation of Apache TVM's RPC tracker, proxy and server."""

__version__ = "0.1.0"

# Read systemd's LISTEN_* variables before anything imports Twisted's endpoints
# (which consumes them); see tvmrpc/systemd/activation.py. Stdlib only.
from .systemd import activation as _activation  # noqa: F401
