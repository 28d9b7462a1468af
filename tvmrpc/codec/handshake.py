"""The RPC handshake on server and proxy ports, and the key grammar.

The connecting side sends ``[int32 RPC_MAGIC][int32 len][key]``; the key is
``client:<matchkey>`` or ``server:<key>``, optionally followed by
space-separated options such as ``-timeout=30``. The answer is an int32 reply
code, followed (on success only) by ``[int32 len][peer key]``.
"""

from __future__ import annotations

import random
import struct

import attrs

from .constants import (
    MAX_KEY_BYTES,
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_MAGIC,
)
from .errors import CodecError

_INT32 = struct.Struct("<i")
_ROLES = ("client", "server")
ROLE_PREFIX_LEN = 7  # len("client:") == len("server:")
REPLY_CODES = (RPC_CODE_SUCCESS, RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH)


@attrs.frozen
class PeerKey:
    """A parsed handshake key: ``<role>:<matchkey> [-opt=value ...]``."""

    role: str
    matchkey: str
    options: tuple[str, ...] = ()

    @property
    def raw(self) -> str:
        """The key string as it travels on the wire."""
        return " ".join((f"{self.role}:{self.matchkey}", *self.options))

    @property
    def timeout(self) -> float | None:
        """The session timeout in seconds from ``-timeout=N``, if any and positive."""
        for opt in self.options:
            if opt.startswith("-timeout="):
                try:
                    value = float(opt[len("-timeout=") :])
                except ValueError:
                    raise CodecError(f"bad session timeout option {opt!r}") from None
                return value if value > 0 else None
        return None


def parse_key(key: str) -> PeerKey:
    """Parse a handshake key; raise :class:`CodecError` if it has no valid role."""
    head, _, rest = key.partition(" ")
    role, sep, matchkey = head.partition(":")
    if not sep or role not in _ROLES:
        raise CodecError(f"handshake key {key[:80]!r} does not start with client: or server:")
    return PeerKey(role=role, matchkey=matchkey, options=tuple(rest.split()))


def encode_handshake(key: str) -> bytes:
    """Encode the connecting side's handshake as one bytes object."""
    data = key.encode("utf-8")
    return _INT32.pack(RPC_MAGIC) + _INT32.pack(len(data)) + data


def encode_reply(code: int, peer_key: str | None = None) -> bytes:
    """Encode a handshake answer; ``peer_key`` is sent only with success."""
    if code == RPC_CODE_SUCCESS:
        if peer_key is None:
            raise ValueError("a success reply carries the peer's key")
        data = peer_key.encode("utf-8")
        return _INT32.pack(code) + _INT32.pack(len(data)) + data
    return _INT32.pack(code)


class HandshakeDecoder:
    """Incremental decoder for the connecting side's handshake.

    ``feed`` returns ``None`` until the handshake is complete, then
    ``(key, rest)`` where ``rest`` holds any bytes that followed it. Any
    invalid input raises :class:`CodecError`.
    """

    __slots__ = ("_buffer", "_max_key_bytes")

    def __init__(self, max_key_bytes: int = MAX_KEY_BYTES) -> None:
        self._buffer = bytearray()
        self._max_key_bytes = max_key_bytes

    def feed(self, data: bytes) -> tuple[str, bytes] | None:
        """Buffer ``data``; return the key and the leftover bytes once complete."""
        buf = self._buffer
        buf += data
        if len(buf) >= 4:
            (magic,) = _INT32.unpack_from(buf, 0)
            if magic != RPC_MAGIC:
                raise CodecError(f"bad RPC magic {magic:#x}")
        return _take_key(buf, self._max_key_bytes, "handshake key")


class ReplyDecoder:
    """Incremental decoder for a handshake answer (the connecting side's view).

    ``feed`` returns ``None`` until complete, then ``(code, peer_key, rest)``;
    ``peer_key`` is ``None`` unless ``code`` is success.
    """

    __slots__ = ("_buffer", "_max_key_bytes")

    def __init__(self, max_key_bytes: int = MAX_KEY_BYTES) -> None:
        self._buffer = bytearray()
        self._max_key_bytes = max_key_bytes

    def feed(self, data: bytes) -> tuple[int, str | None, bytes] | None:
        """Buffer ``data``; return the answer once complete."""
        buf = self._buffer
        buf += data
        if len(buf) < 4:
            return None
        (code,) = _INT32.unpack_from(buf, 0)
        if code not in REPLY_CODES:
            raise CodecError(f"bad handshake reply code {code:#x}")
        if code != RPC_CODE_SUCCESS:
            rest = bytes(buf[4:])
            buf.clear()
            return code, None, rest
        taken = _take_key(buf, self._max_key_bytes, "reply key")
        return None if taken is None else (code, *taken)


def _take_key(buf: bytearray, max_key_bytes: int, what: str) -> tuple[str, bytes] | None:
    """The ``[int32 len][key]`` after a 4-byte magic or code in ``buf``, and the rest.

    ``None`` until complete; then ``buf`` is emptied. Raises :class:`CodecError`
    for a length outside ``1..max_key_bytes`` or a key that is not UTF-8.
    """
    if len(buf) < 8:
        return None
    (length,) = _INT32.unpack_from(buf, 4)
    if length <= 0 or length > max_key_bytes:
        raise CodecError(f"{what} length {length} outside 1..{max_key_bytes}")
    if len(buf) < 8 + length:
        return None
    try:
        key = bytes(buf[8 : 8 + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{what} is not UTF-8") from None
    rest = bytes(buf[8 + length :])
    buf.clear()
    return key, rest


def random_matchkey(key: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """Return a fresh match key ``<key>:<random>`` not in ``taken``."""
    while True:
        matchkey = f"{key}:{random.random()}"
        if matchkey not in taken:
            return matchkey


def split_matchkey(matchkey: str) -> str:
    """Return the device key of a match key: everything before the last ``:``."""
    return matchkey.rsplit(":", 1)[0]


def proxy_matchkey(key: str) -> str:
    """The proxy's match key: drop the role prefix, keep up to the first space."""
    rest = key[ROLE_PREFIX_LEN:]
    return rest.split(" ", 1)[0]
