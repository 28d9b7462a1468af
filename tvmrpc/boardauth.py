"""Board registration proofs: a shared secret, a fresh nonce, an HMAC.

The accepting side (tracker, proxy) sends a nonce chosen for the connection;
the registering side (server, proxy) answers with
``HMAC-SHA256(secret, "tvmrpc-board-v1\\0" + label + "\\0" + nonce + "\\0" + key)``
in hex. Frames and labels are documented in docs/security.md.

Invariants:
- Pure apart from :func:`read_secret` (reads one file) and :func:`new_nonce`
  (reads the OS's random source); the secret never appears in a frame, a
  message or a repr.
- A proof is bound to one nonce, one label and one key: it verifies for
  nothing else, and it is compared in constant time.
- :func:`read_secret` raises :class:`BoardSecretError` with a one-line message
  for a missing, unreadable, empty or too short file.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: Tracker request codes stock does not know (a stock tracker closes on them).
BOARD_CHALLENGE = 100
BOARD_AUTH = 101

#: Labels: which daemon kind accepts the proof (so one cannot be replayed at the other).
LABEL_TRACKER = "tracker"
LABEL_PROXY = "proxy"

#: Shortest secret accepted (characters).
MIN_SECRET_CHARS = 16
#: Nonce length in hex digits (128 bits).
NONCE_HEX = 32
PROOF_HEX = 64
_DOMAIN = b"tvmrpc-board-v1\0"


class BoardSecretError(ValueError):
    """The secret file cannot be used."""


def read_secret(path: str, flag: str = "--board-secret-file") -> bytes:
    """The secret in ``path`` (one line, surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as handle:
            secret = handle.read(64 * 1024).strip()
    except OSError as exc:
        raise BoardSecretError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise BoardSecretError(
            f"{flag} {path}: the secret must be at least {MIN_SECRET_CHARS} characters "
            "(make one with: openssl rand -hex 32 > FILE)"
        )
    return secret


def new_nonce() -> str:
    """A fresh nonce (hex) for one connection."""
    return secrets.token_hex(NONCE_HEX // 2)


def proof(secret: bytes, label: str, nonce: str, key: str) -> str:
    """The registering side's answer (64 hex digits)."""
    message = _DOMAIN + b"\0".join((label.encode(), nonce.encode(), key.encode()))
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, label: str, nonce: str | None, key: str, answer: object) -> bool:
    """Whether ``answer`` proves the secret for this nonce, label and key."""
    if nonce is None or not isinstance(answer, str) or len(answer) != PROOF_HEX:
        return False
    return hmac.compare_digest(proof(secret, label, nonce, key), answer)
