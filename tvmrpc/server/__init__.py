"""The RPC server: handshake, tracker registration, proxy mode and the worker zygote.

``tvmrpc.server.worker`` must stay importable without Twisted's heavy parts
or numpy (it runs on the board), so this package imports nothing eagerly.
"""
