"""The ``"tvmrpc"`` field our servers add to UPDATE_INFO, and its tolerant reader.

Our servers send, with every registration after a session::

    {"key": "server:K", "addr": [host, port],
     "tvmrpc": {"version": 1,
                "last_session": {"outcome": "ok", "seconds": 1.25, "bytes_in": 1049000,
                                 "bytes_out": 1049000, "client": "10.0.0.5:51234"},
                "sessions": 42,
                "outcomes": {"ok": 41, "timeout": 0, "crashed": 1, "client_gone": 0}}}

``sessions`` (an integer: sessions ended since the server started) and
``last_session.outcome`` are what the tracker's quarantine rules read
(tvmrpc.tracker.boards); ``outcomes`` splits the count by outcome.

Stock trackers keep unknown fields and ignore them; ours reads them to show
bytes and crashes on its page.

Invariants:
- :func:`build_extension` output stays far below 4 KiB and 4 levels deep
  (the tracker's bound for this field): strings are cut to 200 characters.
- :func:`read_extension` never raises: anything malformed reads as None, and
  only the documented fields with the documented types are returned.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

VERSION = 1
OUTCOMES = ("ok", "timeout", "crashed", "client_gone")
MAX_TEXT = 200


@attrs.frozen
class LastSession:
    """The last session a server ran, as it reported it."""

    outcome: str
    seconds: float
    bytes_in: int | None
    bytes_out: int | None
    client: str | None


@attrs.frozen
class Extension:
    """What a server told the tracker about its sessions."""

    last_session: LastSession | None
    total: int  # sessions ever ended, all outcomes


def build_extension(
    last: LastSession | None, totals: dict[str, int], health: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``"tvmrpc"`` value for UPDATE_INFO; ``health`` is the server's health
    checks so far, ``{"checks": n, "ok": bool}`` (left out before the first)."""
    value: dict[str, Any] = {
        "version": VERSION,
        "sessions": sum(int(totals.get(outcome, 0)) for outcome in OUTCOMES),
        "outcomes": {outcome: int(totals.get(outcome, 0)) for outcome in OUTCOMES},
    }
    if last is not None:
        value["last_session"] = {
            "outcome": last.outcome,
            "seconds": round(last.seconds, 6),
            "bytes_in": last.bytes_in,
            "bytes_out": last.bytes_out,
            "client": None if last.client is None else last.client[:MAX_TEXT],
        }
    checks = _count((health or {}).get("checks"))
    if checks:
        value["health"] = {"checks": checks, "ok": (health or {}).get("ok") is True}
    return value


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def read_extension(info: Any) -> Extension | None:
    """Read the ``"tvmrpc"`` field of an UPDATE_INFO dict (None if absent or malformed)."""
    if not isinstance(info, dict):
        return None
    ext = info.get("tvmrpc")
    if not isinstance(ext, dict):
        return None
    total = _count(ext.get("sessions")) or 0
    last = None
    raw = ext.get("last_session")
    if isinstance(raw, dict) and raw.get("outcome") in OUTCOMES:
        seconds = raw.get("seconds")
        client = raw.get("client")
        last = LastSession(
            outcome=raw["outcome"],
            seconds=float(seconds)
            if isinstance(seconds, int | float) and math.isfinite(seconds)
            else 0.0,
            bytes_in=_count(raw.get("bytes_in")),
            bytes_out=_count(raw.get("bytes_out")),
            client=client[:MAX_TEXT] if isinstance(client, str) else None,
        )
    return Extension(last_session=last, total=total)
