"""tvmrpc.jsonlog: the ``--logger`` observer writes one JSON object per event and line."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy
from twisted.python.failure import Failure

from tvmrpc import jsonlog


def _capture() -> tuple[list[dict], Logger]:
    events: list[dict] = []
    return events, Logger(namespace="tvmrpc.server", observer=events.append)


def test_event_fields_become_json_fields_next_to_the_formatted_text():
    events, log = _capture()
    log.info(
        "session ended for {peer} (worker exit {code}, {secs:.3f}s)",
        peer="client:k",
        code=0,
        secs=0.0101,
    )
    record = json.loads(jsonlog.event_line(events[0]))
    assert record["text"] == "session ended for client:k (worker exit 0, 0.010s)"
    assert record["level"] == "info"
    assert record["namespace"] == "tvmrpc.server"
    assert (record["peer"], record["code"], record["secs"]) == ("client:k", 0, 0.0101)
    assert record["time"].endswith("+00:00")
    assert not [key for key in record if key.startswith("log_")]


def test_unserialisable_fields_are_repr_and_failures_carry_a_traceback():
    events, log = _capture()
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.failure("tracker {what} failed", Failure(), what={"PUT", "x"} and object())
    record = jsonlog.event_record(events[0])
    assert record["level"] == "critical"
    assert record["what"].startswith("<object object at")
    assert "ValueError: bad frame" in record["traceback"]
    json.dumps(record)


def test_one_event_is_one_line_even_with_newlines_in_it():
    stream = io.StringIO()
    observer = jsonlog.JSONLinesObserver(stream)
    events, log = _capture()
    log.warn("two\nlines from {peer}", peer="a\nb")
    log.emit(LogLevel.error, "plain")
    for event in events:
        observer(event)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["text"] == "two\nlines from a\nb"
    assert json.loads(lines[1])["level"] == "error"


def test_legacy_log_msg_events_are_written_too():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy.msg("(TCP Port 9190 Closed)")
    finally:
        globalLogPublisher.removeObserver(events.append)
    record = jsonlog.event_record(events[-1])
    assert record["text"] == "(TCP Port 9190 Closed)"
    assert record["level"] == "info"


def test_factory_for_twistd_returns_an_observer_on_stdout(capsys):
    observer = jsonlog.observer()
    events, log = _capture()
    log.info("tvm-tracker listening on {host}:{port}", host="::", port=9190)
    observer(events[0])
    record = json.loads(capsys.readouterr().out)
    assert (record["host"], record["port"]) == ("::", 9190)
