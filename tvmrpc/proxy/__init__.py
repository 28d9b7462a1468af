"""The RPC proxy: pairs clients with servers by key and forwards their bytes.

``pairing`` is the pure table (no sockets, no reactor); ``switchboard``
applies it to connections with timers; ``protocol`` speaks the handshake on
TCP and forwards; ``websocket`` does the same for WebSocket servers;
``registrar`` keeps a tracker informed; ``service`` builds ``twistd tvm-proxy``.
"""
