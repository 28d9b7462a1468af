"""RPC session packets that tvmrpc itself writes (the runtime writes the rest).

A session packet is ``[uint64 length][payload]``; the payload starts with an
int32 RPC code. We only ever write the exception packet that ends a session
with an error (the stock session timeout does this).
"""

from __future__ import annotations

import struct

#: RPC code of an exception return (``RPCCode::kException``).
RPC_CODE_EXCEPTION = 5
#: Type index of a raw C string in tvm-ffi based runtimes (apache-tvm 0.2x).
RAW_STR_TYPE_INDEX_FFI = 8
#: ``kTVMStr`` in the runtimes before tvm-ffi.
RAW_STR_TYPE_INDEX_LEGACY = 11


def exception_packet(message: str, str_type_index: int = RAW_STR_TYPE_INDEX_FFI) -> bytes:
    """Encode a session packet that raises ``message`` on the peer."""
    data = message.encode("utf-8")
    payload = struct.pack("<iiiQ", RPC_CODE_EXCEPTION, 1, str_type_index, len(data)) + data
    return struct.pack("<Q", len(payload)) + payload


def session_timeout_message(timeout: float) -> str:
    """The stock message for an expired session (clients match its prefix)."""
    return (
        f"RPCSessionTimeoutError: Your {timeout}s session has expired, "
        'try to increase the "session_timeout" value.'
    )
