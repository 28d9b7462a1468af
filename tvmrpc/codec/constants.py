"""Wire constants shared by every tvmrpc component (stock TVM values)."""

from __future__ import annotations

import enum

#: Magic that opens an RPC data-plane handshake (server and proxy ports).
RPC_MAGIC = 0xFF271
#: Magic that opens a tracker (control-plane) connection.
TRACKER_MAGIC = 0x2F271

#: Handshake reply: the peer accepted the key.
RPC_CODE_SUCCESS = RPC_MAGIC + 0
#: Handshake reply (proxy only): another peer already waits with this key.
RPC_CODE_DUPLICATE = RPC_MAGIC + 1
#: Handshake reply: no peer matches this key.
RPC_CODE_MISMATCH = RPC_MAGIC + 2

#: Largest tracker *request* frame accepted by default (stock rejects frames over 1 MiB).
MAX_FRAME_BYTES = 1 << 20
#: Largest tracker *reply* frame a client accepts. Stock's client has no limit
#: (a SUMMARY grows with the tracker's state), so this is only a sanity bound
#: against a peer that is not a tracker: 256 MiB is far above any real state.
MAX_REPLY_FRAME_BYTES = 256 << 20
#: Largest handshake key accepted by default; real keys are tens of bytes.
MAX_KEY_BYTES = 4096


class TrackerCode(enum.IntEnum):
    """Tracker request and reply codes."""

    FAIL = -1
    SUCCESS = 0
    PING = 1
    STOP = 2
    PUT = 3
    REQUEST = 4
    UPDATE_INFO = 5
    SUMMARY = 6
    GET_PENDING_MATCHKEYS = 7
