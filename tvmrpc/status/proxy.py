"""The proxy's view: pairings, waiting servers, bytes forwarded, session records.

:class:`ProxyStatus` is the switchboard's observer (see :mod:`.hooks`). A
session is one pairing, from the moment both legs are answered until the
first of them closes.

Invariants:
- Every pairing that ends yields exactly one record: an info event
  (namespace ``tvmrpc.sessions``) and an entry in a ring of :data:`RECENT`.
- Byte counters include live pairings (each leg counts what it forwarded),
  so they only grow.
- Live pairings are kept only while both legs are up; per-key tables are capped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from twisted.logger import Logger

from ..codec import proxy_matchkey, split_matchkey
from .stats import MAX_KEYS, KeyedCounts, clip

log = Logger(namespace="tvmrpc.sessions")

RECENT = 100


class ProxyStatus:
    """Observer of one proxy's switchboard; also serves ``snapshot()`` and ``collect()``."""

    def __init__(self, clock: Any, switchboard: Any) -> None:
        self.clock = clock
        self.switchboard = switchboard
        self.live: dict[Any, dict[str, Any]] = {}  # client leg -> pairing
        self.sessions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.pairings = KeyedCounts()
        self.timeouts = KeyedCounts()
        self.closed_up = 0  # client -> server bytes of ended pairings
        self.closed_down = 0

    def _device_key(self, leg: Any) -> str:
        """The device key of a leg (a client's match key is ``KEY:random`` in tracker mode)."""
        key = leg.key or "client:?"
        matchkey = proxy_matchkey(key)
        if self.switchboard.tracker_mode and key.startswith("client:"):
            return clip(split_matchkey(matchkey))
        return clip(matchkey)

    # -- hooks --------------------------------------------------------------------

    def paired(self, leg: Any, peer: Any) -> None:
        client, server = (leg, peer) if str(leg.key).startswith("client:") else (peer, leg)
        key = self._device_key(client)
        self.pairings.add(key)
        self.live[client] = {
            "key": key,
            "client": client.peer_name,
            "server": server.peer_name,
            "start": self.clock.seconds(),
            "legs": (client, server),
        }

    def unpaired(self, leg: Any, peer: Any) -> None:
        client = leg if leg in self.live else peer
        pairing = self.live.pop(client, None)
        if pairing is None:
            return
        client_leg, server_leg = pairing.pop("legs")
        up, down = client_leg.forwarded_bytes, server_leg.forwarded_bytes
        self.closed_up += up
        self.closed_down += down
        now = self.clock.seconds()
        record = dict(
            pairing,
            seconds=round(now - pairing["start"], 6),
            bytes_to_server=up,
            bytes_to_client=down,
            closed_by="client" if leg is client_leg else "server",
        )
        self.sessions.append(record)
        log.info(
            "session of {client} with {server} on {key}: {seconds:.3f}s, "
            "{bytes_to_server} bytes to the server, {bytes_to_client} bytes to the client, "
            "closed by {closed_by}",
            session=record,
            **record,
        )

    def timed_out(self, leg: Any) -> None:
        role = "client" if str(leg.key).startswith("client:") else "server"
        self.timeouts.add(role)

    # -- reading ----------------------------------------------------------------------

    def waiting_servers(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for leg in self.switchboard.table.waiting("server").values():
            key = self._device_key(leg)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items())[:MAX_KEYS])

    def _live_bytes(self) -> tuple[int, int]:
        up = down = 0
        for pairing in self.live.values():
            client_leg, server_leg = pairing["legs"]
            up += client_leg.forwarded_bytes
            down += server_leg.forwarded_bytes
        return up, down

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/v1/status`` document of a proxy (see docs/observability.md)."""
        now = self.clock.seconds()
        live = []
        for pairing in self.live.values():
            client_leg, server_leg = pairing["legs"]
            entry = {k: v for k, v in pairing.items() if k != "legs"}
            entry.update(
                age=round(now - pairing["start"], 6),
                bytes_to_server=client_leg.forwarded_bytes,
                bytes_to_client=server_leg.forwarded_bytes,
            )
            live.append(entry)
        up, down = self._live_bytes()
        return {
            "version": 1,
            "daemon": "proxy",
            "now": now,
            "waiting_servers": self.waiting_servers(),
            "pairings": live,
            "bytes_to_server": self.closed_up + up,
            "bytes_to_client": self.closed_down + down,
            "sessions": list(reversed(self.sessions)),
        }

    def collect(self) -> Iterator[Any]:
        from .stats import counter_family, gauge_family

        yield counter_family(
            "tvmrpc_proxy_pairings", "Clients paired with a server.", self.pairings.values, ["key"]
        )
        yield gauge_family(
            "tvmrpc_proxy_waiting_servers",
            "Servers waiting for a client.",
            (([key], n) for key, n in self.waiting_servers().items()),
            ["key"],
        )
        up, down = self._live_bytes()
        yield counter_family(
            "tvmrpc_proxy_forwarded_bytes",
            "Bytes forwarded, by direction.",
            {"client_to_server": self.closed_up + up, "server_to_client": self.closed_down + down},
            ["direction"],
        )
        yield counter_family(
            "tvmrpc_proxy_pairing_timeouts",
            "Legs that waited too long for a peer, by role.",
            self.timeouts.values,
            ["role"],
        )
        yield gauge_family(
            "tvmrpc_proxy_active_pairings", "Pairings forwarding now.", [((), len(self.live))]
        )


def status_service(reactor: Any, endpoint: str, status: ProxyStatus) -> Any:
    """The ``--status`` service of a proxy: metrics and JSON."""
    from .web import StatusService, status_site

    return StatusService(reactor, endpoint, status_site(status), "tvm-proxy")
