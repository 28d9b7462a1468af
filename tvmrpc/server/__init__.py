"""The RPC server: handshake, tracker registration, proxy mode and the worker zygote.

The package :mod:`tvmrpc.server.worker` runs on the board under plain
``python3`` and must stay importable without Twisted or numpy, so this
package imports nothing eagerly. The daemon side may import the worker's
pure parts (:mod:`.worker.control`, :mod:`.worker.processes`); the worker
never imports the daemon's.
"""
