"""Cheap counters, histograms and rings, turned into Prometheus families only when scraped.

Pure: no I/O, no reactor. The hot path pays a dict update or a bisect, never
a lock or a label lookup; :func:`counter_family` and :func:`histogram_family`
build ``prometheus_client`` metric families from them at scrape time.

Invariants:
- A :class:`KeyedCounts` holds at most ``max_keys`` label values; further keys
  are counted under :data:`OTHER_KEY`, so hostile keys cannot grow memory.
- A :class:`Histogram`'s bucket counts are cumulative only when exported;
  ``count`` and ``total`` always equal the number and sum of observations.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..codec.keys import MAX_KEY_CHARS

#: Label value that collects every key past the cap.
OTHER_KEY = "_other"
#: Default cap on distinct label values per table.
MAX_KEYS = 1000
#: Longest label value or recorded string kept (the key grammar allows 256 characters).
MAX_TEXT = MAX_KEY_CHARS

#: Seconds buckets for queue waits and hold times (tracker) and sessions (server).
SECONDS_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
)


class KeyedCounts:
    """Numbers per label value, capped at ``max_keys`` values."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.values: dict[str, float] = {}
        self.max_keys = max_keys

    def label(self, key: str) -> str:
        """``key`` (clipped) if it has or may get its own entry, else :data:`OTHER_KEY`."""
        key = clip(key)
        if key in self.values or len(self.values) < self.max_keys:
            return key
        return OTHER_KEY

    def add(self, key: str, amount: float = 1) -> None:
        key = self.label(key)
        self.values[key] = self.values.get(key, 0) + amount


class Histogram:
    """Observation counts per upper bound (non-cumulative), plus count and sum."""

    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, cumulative count), ..., ("+Inf", count)]`` as Prometheus wants."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class KeyedHistograms:
    """One :class:`Histogram` per label value, capped like :class:`KeyedCounts`."""

    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS, max_keys: int = MAX_KEYS):
        self.buckets = tuple(buckets)
        self.max_keys = max_keys
        self.values: dict[str, Histogram] = {}

    def observe(self, key: str, value: float) -> None:
        key = clip(key)
        hist = self.values.get(key)
        if hist is None:
            if len(self.values) >= self.max_keys:
                key = OTHER_KEY
                hist = self.values.get(key)
            if hist is None:
                hist = self.values[key] = Histogram(self.buckets)
        hist.observe(value)


def clip(text: Any, limit: int = MAX_TEXT) -> str:
    """``text`` as a string of at most ``limit`` characters (hostile peers send megabytes)."""
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[:limit]


def finite(value: Any) -> Any:
    """``value`` if it is a finite number, else its string (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _le(bound: float) -> str:
    return repr(float(bound))


def counter_family(name: str, doc: str, counts: Mapping[Any, float], labels: Sequence[str]) -> Any:
    """A CounterMetricFamily from ``{label value (or tuple): count}``."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label, value in sorted(counts.items()):
        values = list(label) if isinstance(label, tuple) else [label]
        family.add_metric(values, value)
    return family


def gauge_family(name: str, doc: str, values: Iterable[tuple[Sequence[str], float]], labels=()):
    """A GaugeMetricFamily from ``[(label values, value), ...]``."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def histogram_family(name: str, doc: str, hists: dict[str, Histogram], label: str | None) -> Any:
    """A HistogramMetricFamily from one histogram per label value (or one, unlabelled)."""
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, doc, labels=[label] if label else [])
    for key, hist in sorted(hists.items()):
        family.add_metric([key] if label else [], hist.cumulative(), hist.total)
    return family
