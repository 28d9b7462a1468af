"""The codec's one error type."""


class CodecError(ValueError):
    """Bytes on the wire that do not form a valid frame or handshake.

    The connection that sent them cannot be resynchronised and must be closed.
    """
