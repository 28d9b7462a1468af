"""``--board-secret-file`` and ``--allow-board-from``: the flags of board authentication.

Mixed into the tracker's, the proxy's and the server's Options.

Invariants:
- After parsing, ``options["board-secret"]`` is the secret (bytes) or None,
  and ``options["allow-board-from"]`` a list of networks (empty by default).
- ``options["board-auth"]`` is true when board registration needs a proof:
  with a secret, or when a ``--listen`` is ``mtls:`` (client certificates are
  then the board's identity; every other port needs the secret's proof or an
  ``--allow-board-from`` network, like a registration without a certificate).
- A bad file or network is a one-line usage error naming the flag
  (:func:`check_board_flags`, called from each daemon's ``postOptions``).
"""

from __future__ import annotations

from twisted.python import usage

from . import boardtls
from .boardauth import BoardSecretError, read_secret
from .listening import parse_network


class BoardSecretOptions(usage.Options):
    """``--board-secret-file FILE`` (registering and accepting sides)."""

    optParameters = [
        [
            "board-secret-file",
            None,
            None,
            "File holding the lab's board secret: boards prove it (HMAC over a fresh "
            "nonce) to register; see docs/security.md (default: no proof).",
        ],
    ]


def check_board_flags(options: usage.Options) -> None:
    """Read the secret file named by the flags (call from ``postOptions``)."""
    options["board-secret"] = None
    if options["board-secret-file"]:
        try:
            options["board-secret"] = read_secret(options["board-secret-file"])
        except BoardSecretError as exc:
            raise usage.UsageError(str(exc)) from None
    listens = options.get("listens") or []
    certificates = any(str(listen).startswith(boardtls.PREFIX) for listen in listens)
    options["board-auth"] = options["board-secret"] is not None or certificates
    if options.get("allow-board-from") and not options["board-auth"]:
        raise usage.UsageError(
            "--allow-board-from needs --board-secret-file or a --listen mtls: endpoint: "
            "without them every board may register"
        )


class BoardAdmissionOptions(BoardSecretOptions):
    """Adds ``--allow-board-from CIDR`` (accepting side)."""

    def opt_allow_board_from(self, value: str) -> None:
        """Let boards (stock servers) from this network register without the secret
        (repeatable; only with --board-secret-file)."""
        self.setdefault("allow-board-from", []).append(parse_network(value, "--allow-board-from"))

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.setdefault("allow-board-from", [])
        super().parseOptions(options)
