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
import struct

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


# -- the proxy's frames (docs/security.md) ----------------------------------------

#: Key option of a ``server:`` handshake asking our proxy for a board challenge.
PROXY_OPTION = "-tvmrpc-auth"
#: Proxy -> server: ``int32 RPC_CODE_CHALLENGE, int32 length, nonce`` (stock never sends it).
RPC_CODE_CHALLENGE = 0xFF271 + 0x100
_INT32 = struct.Struct("<i")


class FrameError(ValueError):
    """A challenge or proof frame that breaks the rules."""


def encode_challenge(nonce: str) -> bytes:
    data = nonce.encode()
    return _INT32.pack(RPC_CODE_CHALLENGE) + _INT32.pack(len(data)) + data


def encode_proof(answer: str) -> bytes:
    data = answer.encode()
    return _INT32.pack(len(data)) + data


class _Sized:
    """``[int32 code]`` (if ``code``), ``int32 length`` (1..``limit``), then that many bytes."""

    def __init__(self, code: int | None, limit: int, what: str) -> None:
        self._buffer = bytearray()
        self._code = code
        self._limit = limit
        self._what = what

    def feed(self, data: bytes) -> tuple[str, bytes] | None:
        buf = self._buffer
        buf += data
        head = 0
        if self._code is not None:
            if len(buf) < 4:
                return None
            (code,) = _INT32.unpack_from(buf, 0)
            if code != self._code:
                raise FrameError(f"expected a {self._what}, got code {code:#x}")
            head = 4
        if len(buf) < head + 4:
            return None
        (length,) = _INT32.unpack_from(buf, head)
        if not 0 < length <= self._limit:
            raise FrameError(f"{self._what} length {length} outside 1..{self._limit}")
        end = head + 4 + length
        if len(buf) < end:
            return None
        try:
            text = bytes(buf[head + 4 : end]).decode("ascii")
        except UnicodeDecodeError:
            raise FrameError(f"{self._what} is not ASCII") from None
        rest = bytes(buf[end:])
        buf.clear()
        return text, rest


def proof_decoder() -> _Sized:
    """The proxy's decoder for a server's proof frame."""
    return _Sized(None, PROOF_HEX, "board proof")


def challenge_decoder() -> _Sized:
    """The registering server's decoder for the proxy's challenge frame."""
    return _Sized(RPC_CODE_CHALLENGE, 256, "board challenge")


#: Seconds a registering server waits for our proxy's challenge before it
#: concludes the proxy is stock (or has no secret).
CHALLENGE_TIMEOUT = 10.0
#: The challenge frame's exact size (code, length, nonce): read no byte past it.
CHALLENGE_BYTES = 8 + NONCE_HEX


class ProxyAnswerer:
    """The registering server's side of the proxy exchange (pure).

    Feed it what the proxy sends after the ``server:`` handshake; once the
    challenge is complete :meth:`feed` returns the proof frame to write.
    Anything else (a stock proxy pairing us, or answering no-match) raises
    :class:`FrameError` with a message saying so.
    """

    def __init__(self, secret: bytes, matchkey: str) -> None:
        self._secret = secret
        self._matchkey = matchkey
        self._decoder = challenge_decoder()

    def feed(self, data: bytes) -> bytes | None:
        try:
            done = self._decoder.feed(data)
        except FrameError as exc:
            raise FrameError(
                f"the proxy did not send a board challenge ({exc}): {STOCK_PROXY_HINT}"
            ) from None
        if done is None:
            return None
        nonce, rest = done
        if rest:
            raise FrameError("the proxy sent bytes after its board challenge")
        return encode_proof(proof(self._secret, LABEL_PROXY, nonce, self._matchkey))


#: What to do when a proxy does not challenge us.
STOCK_PROXY_HINT = (
    "it is a stock proxy or one without --board-secret-file; give the proxy "
    "--board-secret-file, or drop --board-secret-file here"
)
