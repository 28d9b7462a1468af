"""tvmrpc: a Twisted implementation of Apache TVM's RPC tracker, proxy and server."""

__version__ = "0.1.0"
