"""How a server behind a proxy learns its client's real address (an opt-in key option).

Our server connects to a proxy as ``server:K -tvmrpc-peer``. Our proxy,
pairing it, answers with the client's key plus ``-tvmrpc-peer=HOST:PORT``
(the client's address as the proxy sees it); the server's session record
then names the real client. Stock peers never send the option and receive
keys unchanged; a stock proxy forwards the option to the client (whose key
parsing ignores it) and our server falls back to naming the proxy.

Invariants:
- :func:`tell` changes a key only when the receiving leg asked with
  :data:`ASK`; :func:`told` never raises.
"""

from __future__ import annotations

ASK = "-tvmrpc-peer"
_TOLD = ASK + "="


def tell(peer_key: str, own_key: str | None, peer_address: str) -> str:
    """``peer_key`` plus the peer's address if ``own_key`` carries :data:`ASK`."""
    if own_key is None or ASK not in own_key.split()[1:]:
        return peer_key
    return f"{peer_key} {_TOLD}{peer_address.replace(' ', '_')}"


def told(key: str) -> str | None:
    """The address a proxy added to ``key`` with :func:`tell`, if any."""
    for option in key.split()[1:]:
        if option.startswith(_TOLD):
            return option[len(_TOLD) :] or None
    return None
