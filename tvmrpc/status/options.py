"""The ``--status ENDPOINT`` flag shared by the three daemons' Options (a mixin).

Invariants:
- Importing this module imports neither twisted.web nor prometheus_client.
- ``--status`` is off (None) unless given; a value that is not shaped like an
  endpoint string is refused at option time with a one-line usage error, and
  one that does not parse (or a ``systemd:`` one without socket activation)
  with the same one-line start-up error as ``--listen``.
"""

from __future__ import annotations

from twisted.python import usage

from ..listening import check_endpoint


def endpoint_string(value: str) -> str:
    """Accept ``tcp:PORT[:...]``, ``unix:PATH``, ``systemd:...``: a name, a colon, the rest."""
    if ":" in value and value.split(":", 1)[0].isidentifier():
        return value
    raise ValueError(
        f"--status wants a Twisted endpoint such as tcp:9180:interface=127.0.0.1, got {value!r}"
    )


class StatusOptions(usage.Options):
    """Adds ``--status``; each daemon's Options lists it among its bases."""

    optParameters = [
        [
            "status",
            None,
            None,
            "Serve /metrics (Prometheus), /api/v1/status (JSON) and, on the tracker, a "
            "status page at / on this Twisted endpoint, e.g. tcp:9180:interface=127.0.0.1 "
            "[default: off].",
            endpoint_string,
        ],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        super().parseOptions(options)
        if self["status"]:
            daemon = getattr(self, "daemon_name", "tvmrpc")
            check_endpoint(daemon, "--status", self["status"])
