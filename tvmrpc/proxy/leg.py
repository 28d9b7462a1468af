"""What every leg does, whatever carries its bytes (TCP or WebSocket).

A leg goes through three phases: *handshake* (decode the connecting side's
key, bounded by a timer), *waiting* (the switchboard holds it; keepalive on),
and *forwarding* (bytes go to the peer untouched, with flow control).

Invariants:
- The handshake answer is written with one write, before any forwarded byte.
- While forwarding, each leg's transport is registered as the streaming
  producer feeding the other leg's transport, so a slow reader pauses the
  fast writer and at most about one read buffer per leg is held.
- When either leg closes, the other is closed after its buffered bytes are
  written; nothing else is affected.
- Bytes received after the handshake and before pairing are held only
  within the switchboard's :class:`~tvmrpc.proxy.limits.EarlyBudget`; a leg
  that would exceed it is closed with a warn line, and the bytes are released
  when it is paired or closes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from ..codec import (
    RPC_CODE_SUCCESS,
    CodecError,
    HandshakeDecoder,
    encode_reply,
    parse_key,
    proxy_matchkey,
)
from .switchboard import ILeg, Switchboard

log = Logger(namespace="tvmrpc.proxy")


@implementer(ILeg)
class LegMixin:
    """The phase logic shared by TCP and WebSocket legs.

    Subclasses provide ``_write(data)`` (one write or message), ``_close()``,
    ``_producer()`` (the byte transport to pause/resume) and ``_on_waiting()``.
    """

    switchboard: Switchboard
    handshake_timeout: float
    key: str | None = None
    peer_name = "?"

    def _leg_init(self, switchboard: Switchboard, handshake_timeout: float) -> None:
        self.switchboard = switchboard
        self.handshake_timeout = handshake_timeout
        self.partner: LegMixin | None = None
        self._decoder: HandshakeDecoder | None = HandshakeDecoder()
        self._early = bytearray()
        self._timer: IDelayedCall | None = None
        self._closed = False

    # -- phases ---------------------------------------------------------------

    def _leg_started(self) -> None:
        self._timer = self.switchboard.clock.callLater(
            self.handshake_timeout, self._handshake_timed_out
        )

    def _leg_data(self, data: bytes) -> None:
        """Bytes from the remote end, whatever the phase."""
        peer = self.partner
        if peer is not None:
            peer._write(data)
            return
        if self._decoder is None:
            self._hold_early(data)
            return
        try:
            done = self._decoder.feed(data)
        except CodecError as exc:
            log.info("bad handshake from {leg}: {error}", leg=self.peer_name, error=exc)
            self._abort()
            return
        if done is None:
            return
        key, rest = done
        self._decoder = None
        self._cancel_timer()
        try:
            parsed = parse_key(key)
        except CodecError as exc:
            log.info("bad handshake key from {leg}: {error}", leg=self.peer_name, error=exc)
            self._abort()
            return
        self.key = key
        if rest and not self._hold_early(rest):
            return
        self._on_waiting()
        self.switchboard.arrive(self, parsed, proxy_matchkey(key))

    def _leg_lost(self) -> None:
        """The remote end closed (or we closed it)."""
        self._closed = True
        self._cancel_timer()
        self.switchboard.leave(self)
        peer, self.partner = self.partner, None
        if peer is not None:
            peer.partner = None
            peer._peer_gone()

    # -- ILeg -----------------------------------------------------------------

    def pair(self, peer: ILeg) -> None:
        """Answer success with the peer's full key; forwarding starts in :meth:`start`."""
        assert isinstance(peer, LegMixin)
        assert peer.key is not None
        self.partner = peer
        self._write(encode_reply(RPC_CODE_SUCCESS, peer.key))

    def start(self) -> None:
        """Both sides have their answer: hand over early bytes and link the flow control."""
        peer = self.partner
        if peer is None:
            return
        consumer = self._producer()
        if getattr(consumer, "producer", None) is not None:
            consumer.unregisterProducer()  # e.g. the HTTP channel a WebSocket came through
        consumer.registerProducer(peer._producer(), True)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.switchboard.early.release(self)
            peer._write(early)
        self._on_forwarding()

    def refuse(self, code: int) -> None:
        self._write(encode_reply(code))
        self._close()

    # -- internals ------------------------------------------------------------

    def _peer_gone(self) -> None:
        """Our peer closed: stop being fed by it and close once our buffer is written."""
        producer = self._producer()
        if getattr(producer, "producer", None) is not None:
            producer.unregisterProducer()
        self._close()

    def _hold_early(self, data: bytes) -> bool:
        """Keep bytes sent before pairing if the budget allows; else close this leg."""
        problem = self.switchboard.early.take(self, len(data))
        if problem is not None:
            log.warn("closing {leg}: {problem}", leg=self.peer_name, problem=problem)
            self._early = bytearray()
            self._abort()
            return False
        self._early += data
        return True

    def _handshake_timed_out(self) -> None:
        self._timer = None
        log.info("handshake from {leg} timed out", leg=self.peer_name)
        self._abort()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _abort(self) -> None:
        self._close()

    # hooks for subclasses
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _producer(self) -> Any:
        raise NotImplementedError

    def _on_waiting(self) -> None:
        """Handshake done: the leg may now wait a long time."""

    def _on_forwarding(self) -> None:
        """Forwarding started: tune the transport for bulk data."""
