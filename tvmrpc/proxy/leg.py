"""One leg of a pairing: a connection's life at the proxy, whatever carries its bytes.

A :class:`Leg` holds an :class:`ILegTransport`, the connection that carries
its bytes: the TCP protocol (:mod:`tvmrpc.proxy.protocol`) or the WebSocket
protocol (:mod:`tvmrpc.proxy.websocket`). The carrier turns its connection's
events into calls on the leg (:meth:`Leg.connected`, :meth:`Leg.received`,
:meth:`Leg.lost`); the leg tells the carrier what to do through the interface.
The switchboard sees the leg as an :class:`~tvmrpc.proxy.switchboard.ILeg`.

The leg's life is an explicit :class:`Phase`::

    NEW → HANDSHAKE → [PROVING →] WAITING → ANSWERED → FORWARDING

and from any of them to CLOSING (we close: bad input, refused, peer gone)
and CLOSED (the connection is lost).

*handshake* decodes the connecting side's key, bounded by a timer;
*proving* (a ``server:`` leg at a proxy with a board secret) waits for the
proof; *waiting* is the switchboard's; *answered* is paired with its answer
given (or held for the splice relay); *forwarding* moves bytes to the peer.
Each event is one method that checks the phase; an event that is impossible
in the current phase raises :class:`LegStateError`.

Forwarding takes one of two paths, chosen once per pairing for both legs:
*splice* when both legs are plain TCP sockets and a splice reactor was given
(:mod:`tvmrpc.proxy.splice`: kernel pipes, no byte in userspace), else
*userspace* (``transport.write`` with producers: WebSocket legs, TLS, no
splice(2) on this platform, ``--no-splice``).

Invariants:
- The handshake answer precedes every forwarded byte, in one write.
- Userspace: each leg's byte transport is registered as the streaming
  producer feeding the other leg's, so a slow reader pauses the fast writer
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
- The handshake timer runs exactly while the leg is in HANDSHAKE or PROVING.
- A leg equals, and hashes as, the carrier it holds (one connection, one
  leg), so whatever is keyed by legs can be looked up by connection.
"""

from __future__ import annotations

import enum
import socket
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .. import boardauth, boardtls
from ..codec import (
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    CodecError,
    HandshakeDecoder,
    PeerKey,
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

log = Logger()


class ILegTransport(Interface):
    """The connection that carries one leg's bytes (a TCP or a WebSocket protocol)."""

    peer_name = Attribute("A short description of the remote end, for logs.")
    peer_host = Attribute("The remote IP address (for --allow-board-from), or None.")

    def write(data: bytes) -> None:  # noqa: N805 - zope interface method
        """Send ``data`` to the remote end (one write, or one message)."""

    def close() -> None:
        """Close once the bytes already written are sent."""

    def abort() -> None:
        """Close at once (bad input)."""

    def producer() -> Any:
        """The byte transport (``IPushProducer`` and ``IConsumer``): flow control, the
        splice hand-over and, at an ``mtls:`` port, the client certificate."""

    def on_waiting() -> None:
        """The handshake is done: the connection may now stay idle a long time."""

    def splice_socket() -> socket.socket | None:
        """The TCP socket whose bytes may be spliced as they are, or None."""


def address_text(transport: Any) -> str:
    """``host:port`` of the remote end of ``transport`` (``?`` without one), for logs."""
    peer = transport.getPeer() if transport is not None else "?"
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


class Phase(enum.Enum):
    """Where a leg is in its life (see the module docstring)."""

    NEW = "new"
    HANDSHAKE = "handshake"
    PROVING = "proving"
    WAITING = "waiting"
    ANSWERED = "answered"
    FORWARDING = "forwarding"
    CLOSING = "closing"
    CLOSED = "closed"


_LIVE = frozenset(Phase) - {Phase.CLOSED}

#: The phases in which each event may happen; anything else is a bug.
ALLOWED: dict[str, frozenset[Phase]] = {
    "connected": frozenset({Phase.NEW}),
    # bytes in CLOSING arrive between our close and the connection's end: dropped
    "received": frozenset(
        {Phase.HANDSHAKE, Phase.PROVING, Phase.WAITING, Phase.FORWARDING, Phase.CLOSING}
    ),
    "timed_out": frozenset({Phase.HANDSHAKE, Phase.PROVING}),
    "pair": frozenset({Phase.WAITING}),
    # CLOSING: the pairing ended while it was being set up (a relay that failed at once)
    "start": frozenset({Phase.ANSWERED, Phase.CLOSING}),
    "refuse": frozenset({Phase.HANDSHAKE, Phase.PROVING, Phase.WAITING}),
    "peer_gone": frozenset({Phase.ANSWERED, Phase.FORWARDING, Phase.CLOSING}),
    "lost": _LIVE,
}


class LegStateError(RuntimeError):
    """An event arrived that the leg's phase does not allow (a bug, never bad input)."""


@implementer(ILeg)
@attrs.define(eq=False, repr=False)
class Leg:
    """One connection at the proxy, from its handshake to its close."""

    switchboard: Switchboard
    #: The connection carrying this leg's bytes.
    carrier: ILegTransport
    handshake_timeout: float
    #: The reactor that drives splice relays, or None to forward in userspace.
    splice_reactor: IReactorFDSet | None = None

    phase: Phase = attrs.field(default=Phase.NEW, init=False)
    #: The full handshake key string as received (options included).
    key: str | None = attrs.field(default=None, init=False)
    #: The leg this one is paired with (set from ANSWERED until either closes).
    partner: Leg | None = attrs.field(default=None, init=False)
    #: Bytes this leg received and forwarded to its peer in userspace (tvmrpc.status).
    forwarded: int = attrs.field(default=0, init=False)
    _decoder: HandshakeDecoder = attrs.field(factory=HandshakeDecoder, init=False)
    _early: bytearray = attrs.field(factory=bytearray, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)
    #: Splice path: the answer waiting for the relay, the relay and our side of it.
    _splicing: bool = attrs.field(default=False, init=False)
    _answer: bytes = attrs.field(default=b"", init=False)
    _relay: SpliceRelay | None = attrs.field(default=None, init=False)
    _relay_first: bool = attrs.field(default=False, init=False)
    #: Board authentication (PROVING): the nonce, the proof decoder, the parsed key.
    _nonce: str | None = attrs.field(default=None, init=False)
    _proof: Any = attrs.field(default=None, init=False)
    _parsed: PeerKey | None = attrs.field(default=None, init=False)

    # -- identity -----------------------------------------------------------------
    # One connection, one leg: a leg equals (and hashes as) the connection that
    # carries it, so what the switchboard holds can be looked up by connection.

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.carrier

    def __hash__(self) -> int:
        return hash(self.carrier)

    def __repr__(self) -> str:
        return f"<Leg {self.peer_name} {self.key or '(no key yet)'} {self.phase.value}>"

    # -- ILeg attributes ------------------------------------------------------------

    @property
    def peer_name(self) -> str:
        name: str = self.carrier.peer_name
        return name

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

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (:meth:`lost` was called)."""
        return self.phase is Phase.CLOSED

    def _expect(self, event: str) -> None:
        if self.phase not in ALLOWED[event]:
            raise LegStateError(f"leg {self.peer_name}: {event} while {self.phase.value}")

    # -- events from the carrier ------------------------------------------------------

    def connected(self) -> None:
        """The connection is up: the handshake must arrive within the timeout."""
        self._expect("connected")
        self.phase = Phase.HANDSHAKE
        self._timer = self.switchboard.clock.callLater(self.handshake_timeout, self.timed_out)

    def received(self, data: bytes) -> None:
        """Bytes from the remote end, whatever the phase."""
        phase = self.phase
        if phase is Phase.FORWARDING:  # the hot path of userspace forwarding
            peer = self.partner
            if peer is not None:
                self.forwarded += len(data)
                peer.carrier.write(data)
            return
        self._expect("received")
        if phase is Phase.HANDSHAKE:
            self._handshake_data(data)
        elif phase is Phase.PROVING:
            self._proof_data(data)
        elif phase is Phase.WAITING:
            self._hold_early(data)
        # CLOSING: dropped

    def timed_out(self) -> None:
        """The handshake (or the board proof) did not arrive in time."""
        self._timer = None
        self._expect("timed_out")
        if self.phase is Phase.PROVING:
            self._refuse_board("no board proof within the handshake timeout")
            return
        log.debug("handshake from {leg} timed out", leg=self.peer_name)
        self._abort()

    def lost(self) -> None:
        """The remote end closed (or we closed it): leave, and close the peer."""
        self._expect("lost")
        self.phase = Phase.CLOSED
        self._cancel_timer()
        relay = self._relay
        if relay is not None:
            relay.stop()  # the socket is going: stop moving bytes through it
        self.switchboard.leave(self)
        peer, self.partner = self.partner, None
        if peer is not None:
            peer.partner = None
            self.switchboard.observer.unpaired(self, peer)
            peer.peer_gone()

    # -- events from the switchboard (ILeg) -------------------------------------------

    def pair(self, peer: ILeg) -> None:
        """Answer success with the peer's full key; forwarding starts in :meth:`start`."""
        self._expect("pair")
        if not isinstance(peer, Leg) or peer.key is None:
            raise LegStateError(f"leg {self.peer_name}: paired with {peer!r}, not a leg")
        self.phase = Phase.ANSWERED
        self.partner = peer
        # A server that asked (tvmrpc.status.peeraddr) also learns the client's address.
        answer = encode_reply(RPC_CODE_SUCCESS, tell(peer.key, self.key, peer.peer_name))
        self._splicing = self._splice_socket() is not None and peer._splice_socket() is not None
        if self._splicing:
            self._answer = answer  # the relay sends it, before any spliced byte
        else:
            self.carrier.write(answer)

    def start(self) -> None:
        """Both sides have their answer: hand over early bytes and link the flow control."""
        self._expect("start")
        if self.phase is Phase.CLOSING:
            return
        peer = self.partner
        assert peer is not None  # set by pair(); cleared only when one of us closes
        self.phase = Phase.FORWARDING
        if self._splicing:
            if self._relay is None and not self._start_relay(peer):
                self.carrier.write(self._answer)  # fall back: userspace for both
                peer.carrier.write(peer._answer)
                self._splicing = peer._splicing = False
            if self._splicing:
                return
        consumer = self.carrier.producer()
        if getattr(consumer, "producer", None) is not None:
            consumer.unregisterProducer()  # e.g. the HTTP channel a WebSocket came through
        consumer.registerProducer(peer.carrier.producer(), True)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.switchboard.early.release(self)
            peer.carrier.write(early)

    def refuse(self, code: int) -> None:
        """Answer ``code`` and close."""
        self._expect("refuse")
        self._cancel_timer()
        self.carrier.write(encode_reply(code))
        self._close()

    # -- events from the peer -----------------------------------------------------------

    def peer_gone(self) -> None:
        """Our peer closed: stop being fed by it and close once our buffer is written."""
        self._expect("peer_gone")
        producer = self.carrier.producer()
        if getattr(producer, "producer", None) is not None:
            producer.unregisterProducer()
        self._close()

    # -- handshake ------------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        try:
            done = self._decoder.feed(data)
        except CodecError as exc:
            log.debug("bad handshake from {leg}: {error}", leg=self.peer_name, error=exc)
            self._abort()
            return
        if done is None:
            return
        key, rest = done
        try:
            parsed = parse_key(key)
        except CodecError as exc:
            log.debug("bad handshake key from {leg}: {error}", leg=self.peer_name, error=exc)
            self._abort()
            return
        self.key = key
        if parsed.role == "server" and self._needs_proof():
            asks = boardauth.PROXY_OPTION in parsed.options
            if not (asks and self.switchboard.board_secret is not None):
                # No exchange to run: a client certificate (mtls:) admits it, or nothing.
                who = f"registration {key.split(' ', 1)[0][:80]} from {self.peer_name}"
                if boardtls.admitted(self.carrier.producer(), who):
                    self._arrive(parsed, rest)
                    return
                why = "it sent no board proof (a stock server?)"
                if asks:
                    why = "this proxy has no --board-secret-file: it admits boards by certificate"
                self._refuse_board(why)
                return
            self.phase = Phase.PROVING
            self._parsed = parsed
            self._nonce = boardauth.new_nonce()
            self._proof = boardauth.proof_decoder()
            self.carrier.write(boardauth.encode_challenge(self._nonce))
            if rest:
                self._proof_data(rest)
            return
        self._arrive(parsed, rest)

    def _arrive(self, parsed: PeerKey, rest: bytes) -> None:
        """Handshake (and proof) done: wait at the switchboard."""
        assert self.key is not None
        self._cancel_timer()
        self.phase = Phase.WAITING
        if rest and not self._hold_early(rest):
            return
        self.carrier.on_waiting()
        self.switchboard.arrive(self, parsed, proxy_matchkey(self.key))

    def _needs_proof(self) -> bool:
        board = self.switchboard
        auth = board.board_auth
        if not (board.board_secret is not None if auth is None else auth):
            return False
        host = self.carrier.peer_host
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
        assert self.key is not None
        assert self._parsed is not None
        secret = self.switchboard.board_secret
        assert secret is not None
        matchkey = proxy_matchkey(self.key)
        if not boardauth.verify(secret, boardauth.LABEL_PROXY, self._nonce, matchkey, answer):
            self._refuse_board(
                "bad board proof (a wrong --board-secret-file, or a replayed exchange)"
            )
            return
        self._proof = None
        self._arrive(self._parsed, rest)

    def _refuse_board(self, why: str) -> None:
        """A server leg that did not prove the secret: never reaches the switchboard."""
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

    # -- splice -----------------------------------------------------------------------------

    def _splice_socket(self) -> socket.socket | None:
        if self.splice_reactor is None:
            return None
        return self.carrier.splice_socket()

    def _start_relay(self, peer: Leg) -> bool:
        """Hand both sockets to a splice relay; False if it cannot be set up."""
        mine, theirs = self._splice_socket(), peer._splice_socket()
        assert mine is not None
        assert theirs is not None
        assert self.splice_reactor is not None
        try:
            relay = SpliceRelay(
                self.splice_reactor,
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
            handover.take(leg.carrier.producer())
            leg._relay = relay
            leg._relay_first = leg is self
            leg._answer, leg._early = b"", bytearray()
            self.switchboard.early.release(leg)
        relay.start()
        return True

    def _relay_done(self, peer: Leg) -> None:
        """The relay moved its last byte: close both sockets (their bytes are queued)."""
        self._close()
        peer._close()

    # -- closing ------------------------------------------------------------------------------

    def _close(self) -> None:
        """Close after the buffered bytes (once; a leg already gone stays as it is)."""
        if self.phase not in (Phase.CLOSING, Phase.CLOSED):
            self.phase = Phase.CLOSING
            self._cancel_timer()
            self.carrier.close()

    def _abort(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSING
            self._cancel_timer()
            self.carrier.abort()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
