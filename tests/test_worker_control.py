"""The zygote's control messages (pure) and a real zygote refusing bad commands."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import subprocess_env
from tvmrpc.server.worker import control

# -- commands ----------------------------------------------------------------------


def test_serve_round_trips_with_its_socket_in_the_same_record():
    record, fds = control.encode_command(control.Serve(7, "/tmp/sess-x", 42))
    assert fds == [42]
    assert control.parse_command(record, fds) == control.Serve(7, "/tmp/sess-x", 42)
    record, fds = control.encode_command(control.Check(8))
    assert fds == []
    assert control.parse_command(record, fds) == control.Check(8)


@pytest.mark.parametrize(
    ("record", "fds", "problem"),
    [
        (b'{"cmd": "serve", "id": 1, "dir": "/d"}', [], "serve needs one socket, got 0"),
        (b'{"cmd": "serve", "id": 1, "dir": "/d"}', [5, 6], "serve needs one socket, got 2"),
        (b'{"cmd": "check", "id": 2}', [5], "check carries no socket, got 1"),
        (b'{"cmd": "reboot", "id": 3}', [], "unknown command 'reboot'"),
        (b'{"cmd": "serve", "dir": "/d"}', [5], "field 'id' missing"),
        (b'{"cmd": "serve", "id": true, "dir": "/d"}', [5], "field 'id' has the wrong type"),
        (b'{"cmd": "serve", "id": 4, "dir": 9}', [5], "field 'dir' has the wrong type"),
        (b"[1, 2]", [], "not a JSON object"),
        (b"\xff\xfe{", [5], "not JSON"),
        (b"", [5], "not JSON"),
    ],
)
def test_a_bad_command_is_one_line_naming_it_and_gives_its_sockets_back(record, fds, problem):
    with pytest.raises(control.ControlError) as caught:
        control.parse_command(record, fds)
    text = str(caught.value)
    assert text.startswith(problem)
    assert "\n" not in text
    assert caught.value.fds == fds  # the caller closes them


def test_a_refused_serve_keeps_its_id_so_its_session_can_end():
    with pytest.raises(control.ControlError) as caught:
        control.parse_command(b'{"cmd": "serve", "id": 12, "dir": "/d"}', [])
    assert caught.value.id == 12


def test_a_truncated_record_is_refused():
    record, fds = control.encode_command(control.Serve(1, "/d", 5))
    with pytest.raises(control.ControlError, match="truncated"):
        control.parse_command(record, fds, truncated=True)


@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=3))
def test_any_record_is_a_command_or_a_control_error(record, fds):
    try:
        command = control.parse_command(record, fds)
    except control.ControlError as exc:
        problem = str(exc)
        assert "\n" not in problem
    else:
        assert isinstance(command, (control.Serve, control.Check))


# -- events ------------------------------------------------------------------------

EVENTS = [
    control.Ready(10, 8),
    control.Failed("cannot find libtvm_runtime.so: install apache-tvm"),
    control.Started(1, 11),
    control.Finished(1, 11),
    control.Exited(1, 11, -9),
    control.Refused(None, "unknown command 'x'"),
    control.Refused(3, "serve needs one socket, got 0"),
    control.SpareFailed(12, 4),
    control.Checked(2, False, "health check failed: ..."),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_round_trip_as_one_line(event):
    line = control.encode_event(event)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert control.parse_event(line[:-1]) == event


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"event": "exploded"}', "unknown event 'exploded'"),
        (b'{"event": "started", "id": 1}', "field 'pid' missing"),
        (b'{"event": "exited", "id": 1, "pid": 2, "code": "9"}', "field 'code' has the wrong type"),
        (b'{"event": "checked", "id": 1, "ok": 1, "error": ""}', "field 'ok' has the wrong type"),
        (b"not json", "not JSON"),
    ],
)
def test_a_bad_event_is_one_line_naming_it(line, problem):
    with pytest.raises(control.ControlError, match="^" + problem):
        control.parse_event(line)


@given(st.binary(max_size=300))
def test_any_line_is_an_event_or_a_control_error(line):
    try:
        event = control.parse_event(line)
    except control.ControlError as exc:
        problem = str(exc)
        assert "\n" not in problem
    else:
        assert type(event) in {type(e) for e in EVENTS}


def test_every_event_class_is_parseable():
    assert set(control._EVENTS) == {type(e).name for e in EVENTS}


# -- a real zygote -------------------------------------------------------------------


def _read_event(events: socket.socket, buffer: bytearray, timeout: float = 60.0) -> object:
    while b"\n" not in buffer:
        readable, _, _ = select.select([events], [], [], timeout)
        assert readable, f"no event from the zygote within {timeout}s"
        chunk = events.recv(65536)
        assert chunk, "the zygote closed its events channel"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return control.parse_event(line)


def test_zygote_refuses_bad_commands_closes_their_sockets_and_carries_on():
    """Malformed, unknown and fd-less commands each get one ``refused`` line; a check
    afterwards still passes and the zygote exits when its command channel closes."""
    events, events_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    commands, commands_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-m", "tvmrpc.server.worker"]
    argv += ["--control-fd", str(events_theirs.fileno())]
    argv += ["--command-fd", str(commands_theirs.fileno())]
    proc = subprocess.Popen(
        argv,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(events_theirs.fileno(), commands_theirs.fileno()),
    )
    events_theirs.close()
    commands_theirs.close()
    buffer = bytearray()
    try:
        ready = _read_event(events, buffer)
        assert isinstance(ready, control.Ready)

        # A serve record whose JSON is broken, carrying a socket: refused, socket closed.
        ours, carried = socket.socketpair()
        socket.send_fds(commands, [b'{"cmd": "serve", "id": 5, "dir":'], [carried.fileno()])
        carried.close()
        refused = _read_event(events, buffer)
        assert isinstance(refused, control.Refused)
        assert refused.error.startswith("not JSON")
        ours.settimeout(10)
        assert ours.recv(1) == b""  # the zygote closed its copy: nobody holds the client
        ours.close()

        # A serve without its socket: refused with its id (the daemon ends that session).
        commands.send(json.dumps({"cmd": "serve", "id": 6, "dir": "/nonexistent"}).encode())
        refused = _read_event(events, buffer)
        assert refused == control.Refused(6, refused.error)
        assert refused.error.startswith("serve needs one socket, got 0")

        commands.send(b'{"cmd": "selfdestruct", "id": 7}')
        refused = _read_event(events, buffer)
        assert isinstance(refused, control.Refused)
        assert "unknown command 'selfdestruct'" in refused.error

        # Still serving: a health check passes.
        record, fds = control.encode_command(control.Check(8))
        socket.send_fds(commands, [record], fds)
        checked = _read_event(events, buffer)
        assert checked == control.Checked(8, True, "")
    finally:
        commands.close()  # the daemon goes away: the zygote exits
        code = proc.wait(timeout=30)
        output = proc.stdout.read().decode() if proc.stdout else ""
        events.close()
    print(output)
    assert code == 0
    lines = [line for line in output.splitlines() if line.startswith("zygote: refused")]
    assert len(lines) == 3  # one line each, no traceback
    assert "Traceback" not in output


# -- the zygote -> spare hand-off ---------------------------------------------------


def test_spare_receives_directory_and_socket_in_one_record():
    from tvmrpc.server.worker.session import hand_over, receive_session

    zygote, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, session = socket.socketpair()
    with zygote, spare, client, session:
        hand_over(zygote, "/tmp/sess-1", session.fileno())
        handed = receive_session(spare)
        assert handed is not None
        root, fd = handed
        assert root == "/tmp/sess-1"
        with socket.socket(fileno=fd) as sock:
            sock.sendall(b"y")
            assert client.recv(1) == b"y"
        zygote.close()
        assert receive_session(spare) is None  # the zygote went away before a session


@pytest.mark.parametrize(
    ("record", "with_fd"),
    [(b'{"dir": "/tmp/s"}', False), (b'{"dir": 5}', True), (b"{", True), (b"[]", True)],
)
def test_spare_refuses_an_unusable_hand_off_and_closes_its_socket(record, with_fd):
    from tvmrpc.server.worker.session import receive_session

    zygote, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, session = socket.socketpair()
    with zygote, spare, client:
        socket.send_fds(zygote, [record], [session.fileno()] if with_fd else [])
        session.close()
        with pytest.raises(ValueError, match="unusable hand-off record"):
            receive_session(spare)
        client.settimeout(10)
        assert client.recv(1) == b""  # no copy of the client's socket is left open


@pytest.mark.parametrize("kind", ["stream", "missing"])
def test_zygote_without_its_command_channel_says_so_in_one_line(kind):
    """A daemon from another tvmrpc version (no SOCK_SEQPACKET command channel)."""
    events, events_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wrong, wrong_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = wrong_theirs.fileno() if kind == "stream" else 1000
    passed = (events_theirs.fileno(), wrong_theirs.fileno())
    argv = [sys.executable, "-m", "tvmrpc.server.worker"]
    argv += ["--control-fd", str(events_theirs.fileno()), "--command-fd", str(fd)]
    with events, wrong, events_theirs, wrong_theirs:
        proc = subprocess.run(argv, env=subprocess_env(), pass_fds=passed, capture_output=True)
        events_theirs.close()
        failed = _read_event(events, bytearray())
    assert proc.returncode == 2
    assert isinstance(failed, control.Failed)
    assert failed.error.startswith(f"no command channel at fd {fd} (")
    assert failed.error.endswith("run both from one install")
    assert b"Traceback" not in proc.stderr
