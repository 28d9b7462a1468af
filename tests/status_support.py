"""Helpers for the status tests: find a daemon's status port, read its JSON and metrics."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Process

STATUS_FLAG = ("--status", "tcp:0:interface=127.0.0.1")
STATUS_AT = r"status at http://127\.0\.0\.1:(\d+)/"


def status_port(daemon: Process, start: int = 0) -> int:
    """The port of ``daemon``'s ``--status`` endpoint, from its log line."""
    port = int(daemon.wait_for(STATUS_AT, start=start).group(1))
    daemon.status_port = port  # type: ignore[attr-defined]
    return port


def get(port: int, path: str) -> tuple[str, bytes]:
    """``(content type, body)`` of an HTTP GET on the status endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.headers["content-type"], response.read()


def status(port: int) -> dict[str, Any]:
    kind, body = get(port, "/api/v1/status")
    assert kind == "application/json"
    return json.loads(body)


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser."""
    _, body = get(port, "/metrics")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
