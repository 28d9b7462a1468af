"""The tracker's admin API: drain and resume boards, over HTTP with a bearer token.

Mounted under the status endpoint as ``/api/v1/admin/`` when the tracker is
given ``--admin-token-file``; without the file the API does not exist.

``POST /api/v1/admin/drain`` and ``POST /api/v1/admin/resume`` take a JSON
body ``{"board": "addr:port"}`` or ``{"key": "K"}`` and answer
``{"ok": true, "action": ..., "board"|"key": ...}``.

Invariants:
- Every request without ``Authorization: Bearer <token>`` matching the file
  (compared in constant time) gets 401 and changes nothing.
- A body that is not one JSON object naming exactly one of ``board``/``key``
  gets 400 with a one-line reason and changes nothing.
- A resume hands freed boards to waiting requests at once (``on_change``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import Request

from ..codec import key_problem
from .boards import BoardRules

log = Logger()

#: Longest request body the admin API reads.
MAX_BODY_BYTES = 4096


class AdminTokenError(ValueError):
    """The token file is missing, unreadable or empty."""


def read_token(path: str | Path) -> str:
    """The bearer token: the file's first line, stripped; raise AdminTokenError if none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminTokenError(f"cannot read --admin-token-file {path}: {exc.strerror}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise AdminTokenError(
            f"--admin-token-file {path} holds no token of at least 16 characters: "
            "write one, e.g. `openssl rand -hex 32 > FILE`"
        )
    return token


def parse_target(body: bytes) -> tuple[str | None, str | None]:
    """``(board, key)`` from a request body, exactly one set; raise ValueError saying why."""
    try:
        value = json.loads(body or b"null")
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(value, dict) or len(value.keys() & {"board", "key"}) != 1:
        raise ValueError('the body must be {"board": "addr:port"} or {"key": "K"}')
    board, key = value.get("board"), value.get("key")
    if board is not None and (not isinstance(board, str) or board.rpartition(":")[0] == ""):
        raise ValueError(f"board must be 'addr:port', got {board!r:.80}")
    if key is not None:
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(problem)
    return board, key


class _Action(resource.Resource):
    isLeaf = True

    def __init__(self, admin: AdminResource, action: str) -> None:
        super().__init__()
        self.admin = admin
        self.action = action

    def render_POST(self, request: Request) -> bytes:
        return self.admin.act(self.action, request)


class AdminResource(resource.Resource):
    """``/api/v1/admin/``: ``drain`` and ``resume`` for one tracker's :class:`BoardRules`."""

    def __init__(self, rules: BoardRules, token: str, on_change: Callable[[], None]) -> None:
        super().__init__()
        self.rules = rules
        self._token = token.encode()
        self.on_change = on_change
        self.putChild(b"drain", _Action(self, "drain"))
        self.putChild(b"resume", _Action(self, "resume"))

    def act(self, action: str, request: Request) -> bytes:
        peer = getattr(request.getClientAddress(), "host", "?")
        if not self._authorized(request):
            log.warn(
                "admin {action} refused from {peer}: bad or no token", action=action, peer=peer
            )
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="tvmrpc"')
            return _json(request, 401, {"ok": False, "error": "bad or missing bearer token"})
        body = request.content.read(MAX_BODY_BYTES + 1) if request.content else b""
        if len(body) > MAX_BODY_BYTES:
            return _json(request, 400, {"ok": False, "error": "body too large"})
        try:
            board, key = parse_target(body)
        except ValueError as exc:
            return _json(request, 400, {"ok": False, "error": str(exc)})
        getattr(self.rules, action)(board=board, key=key)
        target = {"board": board} if board is not None else {"key": key}
        log.info("admin {action} {target} from {peer}", action=action, target=target, peer=peer)
        self.on_change()
        return _json(request, 200, {"ok": True, "action": action, **target})

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)


def _json(request: Request, code: int, value: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(value).encode() + b"\n"
