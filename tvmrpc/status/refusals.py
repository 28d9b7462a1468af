"""Connections and registrations a daemon refused, by reason, for ``/metrics``.

Counted where the refusal happens (the listening gate in
:mod:`tvmrpc.listening`, board authentication at the tracker and the proxy,
TLS handshakes an ``mtls:`` port refused in :mod:`tvmrpc.mtls`)
and exported by every daemon's ``--status`` site as
``tvmrpc_refused_connections_total{reason=...}``.

Invariants:
- Counting is one dict update; importing this module imports nothing else
  of ours and nothing of Prometheus (that loads only when scraped).
- Reasons are a small fixed set chosen by our code, never a peer's text.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class Refusals:
    """Counts per reason (``allow``, ``per-peer cap``, ``board auth``, ``client certificate``)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def collect(self) -> Iterator[Any]:
        """The Prometheus family (a collector for a CollectorRegistry)."""
        from .stats import counter_family

        yield counter_family(
            "tvmrpc_refused_connections",
            "Connections closed at accept (allow list, per-peer cap) and board "
            "registrations refused, by reason.",
            dict(self.counts),
            ["reason"],
        )


#: The process's counts (one daemon per process).
REFUSED = Refusals()
