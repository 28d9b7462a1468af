"""Seeing the lab: session records, ``/metrics``, ``/api/v1/status`` and the tracker's page.

Each daemon keeps a small *status* object fed by event hooks in its
protocol code (:mod:`tvmrpc.status.hooks` holds the no-op defaults), and
``--status ENDPOINT`` serves it over HTTP (:mod:`tvmrpc.status.web`).

Invariants:
- The daemons import only :mod:`tvmrpc.status.hooks` on their hot path; the
  Prometheus client and twisted.web load only when ``--status`` is given.
- Every history kept here is a fixed-size ring; per-key tables are capped.
"""
