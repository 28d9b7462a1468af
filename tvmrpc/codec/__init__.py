"""The wire: constants, tracker frames, the RPC handshake and session packets.

This package imports nothing else of tvmrpc and does no I/O.
"""

from .constants import (
    MAX_FRAME_BYTES,
    MAX_KEY_BYTES,
    MAX_REPLY_FRAME_BYTES,
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_MAGIC,
    TRACKER_MAGIC,
    TrackerCode,
)
from .errors import CodecError
from .frames import NO_FRAME, FrameDecoder, MagicDecoder, decode_int32, encode_frame, encode_int32
from .handshake import (
    HandshakeDecoder,
    PeerKey,
    ReplyDecoder,
    encode_handshake,
    encode_reply,
    parse_key,
    proxy_matchkey,
    random_matchkey,
    split_matchkey,
)
from .keys import MAX_KEY_CHARS, MAX_MATCHKEY_CHARS, BadKeyError, check_key, key_problem
from .session import (
    RAW_STR_TYPE_INDEX_FFI,
    RAW_STR_TYPE_INDEX_LEGACY,
    exception_packet,
    session_timeout_message,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_KEY_CHARS",
    "MAX_MATCHKEY_CHARS",
    "MAX_REPLY_FRAME_BYTES",
    "NO_FRAME",
    "RAW_STR_TYPE_INDEX_FFI",
    "RAW_STR_TYPE_INDEX_LEGACY",
    "RPC_CODE_DUPLICATE",
    "RPC_CODE_MISMATCH",
    "RPC_CODE_SUCCESS",
    "RPC_MAGIC",
    "TRACKER_MAGIC",
    "BadKeyError",
    "CodecError",
    "FrameDecoder",
    "HandshakeDecoder",
    "MagicDecoder",
    "PeerKey",
    "ReplyDecoder",
    "TrackerCode",
    "check_key",
    "decode_int32",
    "encode_frame",
    "encode_handshake",
    "encode_int32",
    "encode_reply",
    "exception_packet",
    "key_problem",
    "parse_key",
    "proxy_matchkey",
    "random_matchkey",
    "session_timeout_message",
    "split_matchkey",
]
