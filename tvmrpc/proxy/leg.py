"""What every leg does, whatever carries its bytes (TCP or WebSocket).

A leg goes through three phases: *handshake* (decode the connecting side's
key, bounded by a timer), *waiting* (the switchboard holds it; keepalive on),
and *forwarding* (bytes go to the peer untouched, with flow control).

Forwarding takes one of two paths, chosen once per pairing for both legs:
*splice* when both legs are plain TCP sockets and the factory allows it
(:mod:`tvmrpc.proxy.splice`: kernel pipes, no byte in userspace), else
*userspace* (``transport.write`` with producers: WebSocket legs, TLS, no
splice(2) on this platform, ``--no-splice``).

Invariants:
- The handshake answer precedes every forwarded byte, in one write.
- Userspace: each leg's transport is registered as the streaming producer
  feeding the other leg's transport, so a slow reader pauses the fast writer
  and at most about one read buffer per leg is held.
- Splice: both transports are paused and never written; the relay delivers
  each answer and the other side's early bytes first, then spliced bytes;
  when it is done both transports are closed. If the relay cannot be set up
  (no descriptors left), the pairing falls back to userspace.
- When either leg closes, the other is closed after its buffered bytes are
  written; nothing else is affected.
- Bytes received after the handshake and before pairing are held only
  within the switchboard's :class:`~tvmrpc.proxy.limits.EarlyBudget`; a leg
  that would exceed it is closed with a warn line, and the bytes are released
  when it is paired or closes.
- With a board secret on the switchboard, a ``server:`` leg from outside
  ``allow_board_from`` must carry ``-tvmrpc-auth`` and answer the challenge
  (a fresh nonce per leg) with a valid proof before the handshake timeout;
  otherwise it is answered MISMATCH, closed, logged at warn with the peer (at
  most once a minute per proxy, with the count held back) and counted, and
  never reaches the switchboard. A ``server:`` leg that asks for no challenge
  (or one the proxy, without a secret, cannot give) is admitted instead by a
  client certificate verified at an ``mtls:`` port (:mod:`tvmrpc.boardtls`).
  Client legs need nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from .. import boardauth, boardtls
from ..codec import (
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    CodecError,
    HandshakeDecoder,
    encode_reply,
    parse_key,
    proxy_matchkey,
)
from ..listening import address_in
from ..status.peeraddr import tell
from ..status.refusals import REFUSED
from . import handover
from .splice import SpliceRelay
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
    #: The remote IP address, for --allow-board-from (None: not a TCP leg).
    peer_host: str | None = None

    def _leg_init(self, switchboard: Switchboard, handshake_timeout: float) -> None:
        self.switchboard = switchboard
        self.handshake_timeout = handshake_timeout
        self.partner: LegMixin | None = None
        self._decoder: HandshakeDecoder | None = HandshakeDecoder()
        self._early = bytearray()
        self._timer: IDelayedCall | None = None
        self._closed = False
        #: Bytes this leg received and forwarded to its peer in userspace (tvmrpc.status).
        self.forwarded = 0
        self._relay_first = False
        #: Splice path: the handshake answer waiting for the relay, and the relay.
        self._splicing = False
        self._answer = b""
        self._relay: SpliceRelay | None = None
        #: Board authentication (a server leg at a proxy with a secret): nonce and decoder.
        self._nonce: str | None = None
        self._proof: Any = None
        self._parsed: Any = None

    # -- phases ---------------------------------------------------------------

    def _leg_started(self) -> None:
        self._timer = self.switchboard.clock.callLater(
            self.handshake_timeout, self._handshake_timed_out
        )

    def _leg_data(self, data: bytes) -> None:
        """Bytes from the remote end, whatever the phase."""
        peer = self.partner
        if peer is not None:
            self.forwarded += len(data)
            peer._write(data)
            return
        if self._proof is not None:
            self._proof_data(data)
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
        try:
            parsed = parse_key(key)
        except CodecError as exc:
            self._cancel_timer()
            log.info("bad handshake key from {leg}: {error}", leg=self.peer_name, error=exc)
            self._abort()
            return
        self.key = key
        if parsed.role == "server" and self._needs_proof():
            asks = boardauth.PROXY_OPTION in parsed.options
            if not (asks and self.switchboard.board_secret is not None):
                # No exchange to run: a client certificate (mtls:) admits it, or nothing.
                who = f"registration {key.split(' ', 1)[0][:80]} from {self.peer_name}"
                if boardtls.admitted(getattr(self, "transport", None), who):
                    self._cancel_timer()
                    self._arrive(parsed, rest)
                    return
                why = "it sent no board proof (a stock server?)"
                if asks:
                    why = "this proxy has no --board-secret-file: it admits boards by certificate"
                self._refuse_board(why)
                return
            self._parsed = parsed
            self._nonce = boardauth.new_nonce()
            self._proof = boardauth.proof_decoder()
            self._write(boardauth.encode_challenge(self._nonce))
            if rest:
                self._proof_data(rest)
            return
        self._cancel_timer()
        self._arrive(parsed, rest)

    def _arrive(self, parsed: Any, rest: bytes) -> None:
        assert self.key is not None
        if rest and not self._hold_early(rest):
            return
        self._on_waiting()
        self.switchboard.arrive(self, parsed, proxy_matchkey(self.key))

    def _needs_proof(self) -> bool:
        board = self.switchboard
        auth = board.board_auth
        if not (board.board_secret is not None if auth is None else auth):
            return False
        host = self.peer_host
        return host is None or not address_in(host, board.allow_board_from)

    def _proof_data(self, data: bytes) -> None:
        """Bytes of a server leg that owes us its board proof."""
        try:
            done = self._proof.feed(data)
        except boardauth.FrameError as exc:
            self._refuse_board(str(exc))
            return
        if done is None:
            return
        answer, rest = done
        self._proof = None
        self._cancel_timer()
        assert self.key is not None
        secret = self.switchboard.board_secret
        matchkey = proxy_matchkey(self.key)
        if not boardauth.verify(secret, boardauth.LABEL_PROXY, self._nonce, matchkey, answer):
            self._refuse_board(
                "bad board proof (a wrong --board-secret-file, or a replayed exchange)"
            )
            return
        self._arrive(self._parsed, rest)

    def _refuse_board(self, why: str) -> None:
        """A server leg that did not prove the secret: never reaches the switchboard."""
        self._cancel_timer()
        self._proof = None
        REFUSED.add("board auth")
        board = self.switchboard
        held = board.board_refusals.event(board.clock.seconds())
        if held is not None:
            log.warn(
                "refused registration {key} from {leg}: {why}; boards need "
                "--board-secret-file (or a network in --allow-board-from, or a client "
                "certificate at an mtls: port){more}",
                key=(self.key or "?")[:80],
                leg=self.peer_name,
                why=why,
                more=f" ({held} more refused since the last report)" if held else "",
            )
        self.refuse(RPC_CODE_MISMATCH)

    def _leg_lost(self) -> None:
        """The remote end closed (or we closed it)."""
        self._closed = True
        self._cancel_timer()
        relay = self._relay
        if relay is not None:
            relay.stop()  # the socket is going: stop moving bytes through it
        self.switchboard.leave(self)
        peer, self.partner = self.partner, None
        if peer is not None:
            peer.partner = None
            self.switchboard.observer.unpaired(self, peer)
            peer._peer_gone()

    # -- ILeg -----------------------------------------------------------------

    @property
    def forwarded_bytes(self) -> int:
        """Bytes received from this leg's remote end and forwarded to its peer, either way."""
        relay = self._relay
        if relay is None:
            return self.forwarded
        a_to_b, b_to_a = relay.moved
        return self.forwarded + (a_to_b if self._relay_first else b_to_a)

    @property
    def forwarding(self) -> str:
        """``splice`` or ``userspace``: how this leg's bytes are forwarded once paired."""
        return "splice" if self._relay is not None else "userspace"

    def pair(self, peer: ILeg) -> None:
        """Answer success with the peer's full key; forwarding starts in :meth:`start`."""
        assert isinstance(peer, LegMixin)
        assert peer.key is not None
        self.partner = peer
        # A server that asked (tvmrpc.status.peeraddr) also learns the client's address.
        answer = encode_reply(RPC_CODE_SUCCESS, tell(peer.key, self.key, peer.peer_name))
        self._splicing = self._splice_socket() is not None and peer._splice_socket() is not None
        if self._splicing:
            self._answer = answer  # the relay sends it, before any spliced byte
        else:
            self._write(answer)

    def start(self) -> None:
        """Both sides have their answer: hand over early bytes and link the flow control."""
        peer = self.partner
        if peer is None:
            return
        if self._splicing:
            if self._relay is None and not self._start_relay(peer):
                self._write(self._answer)  # fall back: userspace for both
                peer._write(peer._answer)
                self._splicing = peer._splicing = False
            if self._splicing:
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

    def _start_relay(self, peer: LegMixin) -> bool:
        """Hand both sockets to a splice relay; False if it cannot be set up."""
        mine, theirs = self._splice_socket(), peer._splice_socket()
        assert mine is not None
        assert theirs is not None
        try:
            relay = SpliceRelay(
                self._splice_reactor(),
                mine,
                theirs,
                prefix_to_a=self._answer + bytes(peer._early),
                prefix_to_b=peer._answer + bytes(self._early),
                on_done=lambda: self._relay_done(peer),
                names=(self.peer_name, peer.peer_name),
            )
        except OSError as exc:
            log.warn(
                "cannot splice {a} and {b} ({error}); forwarding in userspace",
                a=self.peer_name,
                b=peer.peer_name,
                error=exc,
            )
            return False
        for leg in (self, peer):
            handover.take(leg._producer())
            leg._relay = relay
            leg._relay_first = leg is self
            leg._answer, leg._early = b"", bytearray()
            self.switchboard.early.release(leg)
        relay.start()
        return True

    def _relay_done(self, peer: LegMixin) -> None:
        """The relay moved its last byte: close both sockets (their bytes are queued)."""
        self._close()
        peer._close()

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
        if self._proof is not None:
            self._refuse_board("no board proof within the handshake timeout")
            return
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

    def _splice_socket(self) -> Any:
        """The socket to splice, or None to forward in userspace."""
        return None

    def _splice_reactor(self) -> Any:
        """The reactor (IReactorFDSet) that drives a splice relay."""
        raise NotImplementedError

    def _on_waiting(self) -> None:
        """Handshake done: the leg may now wait a long time."""

    def _on_forwarding(self) -> None:
        """Forwarding started: tune the transport for bulk data."""
