"""JSON log lines for twistd's ``--logger`` flag: ``--logger=tvmrpc.jsonlog.observer``.

One event per line on standard output (the journal under systemd), e.g.::

    {"time": "2026-11-25T17:00:00.123456+00:00", "level": "info",
     "namespace": "tvmrpc.server", "text": "session ended for client:k (worker exit 0, 0.010s)",
     "peer": "client:k", "code": 0, "secs": 0.0101}

Invariants:
- Every line is one JSON object with ``time`` (ISO 8601, UTC), ``level``,
  ``namespace`` and ``text`` (the event formatted as twistd would print it),
  followed by the event's own fields (``peer``, ``key``, ``code``,
  ``seconds``, ...): every key not starting with ``log_``.
- A field that JSON cannot represent is written as its ``repr``; a failure
  adds ``traceback``. Nothing an event carries makes the observer raise.
- A line never contains a raw newline (JSON escapes them), so one event is
  one journal entry and one line in a file.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

RESERVED = ("time", "level", "namespace", "text", "traceback")


def _plain(value: Any) -> Any:
    """``value`` if JSON can carry it as is, else its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object for one log event (pure)."""
    stamp = event.get("log_time")
    when = (
        datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat()
        if isinstance(stamp, (int, float))
        else None
    )
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when,
        "level": getattr(level, "name", None) or ("error" if event.get("isError") else "info"),
        "namespace": event.get("log_namespace") or event.get("system"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in RESERVED or key in ("format", "message", "isError"):
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 - a broken failure must not break logging
            record["traceback"] = repr(failure)
    return record


def event_line(event: dict[str, Any]) -> str:
    """One JSON line (with its newline) for ``event``."""
    try:
        text = json.dumps(event_record(event), ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"text": formatEvent(event), "json_error": str(exc)})
    return text + "\n"


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes :func:`event_line` for every event to ``stream`` and flushes it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self.stream.write(event_line(event))
        self.stream.flush()


def observer() -> JSONLinesObserver:
    """The observer factory twistd's ``--logger`` calls: JSON lines on standard output."""
    return JSONLinesObserver(sys.stdout)
