"""Socket activation: each daemon under systemd-socket-activate serves stock TVM peers.

With and without ``--fdname`` (systemd sets ``LISTEN_FDNAMES`` from
``FileDescriptorName=``; systemd-socket-activate only with ``--fdname``),
by index and by name. The Twisted behaviour our workaround exists for is
pinned here, so the day Twisted changes it this file says so.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys

import pytest
from tvm import rpc
from twisted.internet.endpoints import serverFromString
from twisted.python.systemd import ListenFDs

from tests.support import free_port, running, start_stock_server, subprocess_env
from tests.systemd_support import activated, needs_socket_activate
from tvmrpc.harness import start_proxied_server, twistd_argv
from tvmrpc.systemd import activation

# -- pure ----------------------------------------------------------------------------


def test_parse_index_and_name_forms():
    assert activation.parse_systemd("systemd:domain=INET:index=0") == activation.SystemdSpec(
        socket.AF_INET, index=0
    )
    assert activation.parse_systemd(
        "systemd:domain=INET6:name=tvm-tracker"
    ) == activation.SystemdSpec(socket.AF_INET6, name="tvm-tracker")
    assert activation.parse_systemd(r"systemd:domain=UNIX:name=a\:b").name == "a:b"


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("systemd:domain=INET", "exactly one of index=N or name=NAME"),
        ("systemd:domain=INET:index=0:name=x", "exactly one of index=N or name=NAME"),
        ("systemd:domain=IPX:index=0", "domain= must be INET, INET6 or UNIX"),
        ("systemd:index=0", "domain= must be INET, INET6 or UNIX"),
        ("systemd:domain=INET:index=first", "index= wants a number"),
        ("systemd:domain=INET:index=0:port=9", "unknown option"),
        ("systemd:domain=INET:index", "expected key=value"),
    ],
)
def test_parse_errors_say_what_is_wrong(description, message):
    with pytest.raises(activation.ActivationError, match=message):
        activation.parse_systemd(description)


def test_unnamed_descriptors_are_named_unknown_and_the_environment_is_consumed():
    env = {"LISTEN_PID": "77", "LISTEN_FDS": "2", "PATH": "/bin"}
    inherited = activation.inherited_from(env, 77, unset=True)
    assert inherited == activation.Inherited((3, 4), ("unknown", "unknown"))
    assert env == {"PATH": "/bin"}


def test_partial_names_and_bad_counts():
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a::c:extra"}
    assert activation.inherited_from(env, 7, unset=False).names == ("a", "unknown", "c")
    for count in ("-2", "many"):
        bad = {"LISTEN_PID": "7", "LISTEN_FDS": count, "LISTEN_FDNAMES": "a"}
        assert activation.inherited_from(bad, 7, unset=False) == activation.Inherited()


def test_named_descriptors_and_other_pids():
    env = {"LISTEN_PID": "77", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "tracker:web"}
    assert activation.inherited_from(dict(env), 77, unset=False).names == ("tracker", "web")
    assert activation.inherited_from(dict(env), 78, unset=True) == activation.Inherited()
    kept = dict(env)
    activation.inherited_from(kept, 78, unset=True)
    assert kept == env  # not ours: left for whoever it is for


def test_choose_by_index_and_name_with_clear_errors():
    inherited = activation.Inherited((3, 4), ("tvm-tracker", "unknown"))
    assert activation.choose(activation.SystemdSpec(socket.AF_INET, index=1), inherited) == 4
    assert (
        activation.choose(activation.SystemdSpec(socket.AF_INET, name="tvm-tracker"), inherited)
        == 3
    )
    with pytest.raises(activation.ActivationError, match=r"no inherited socket for index=2: "):
        activation.choose(activation.SystemdSpec(socket.AF_INET, index=2), inherited)
    with pytest.raises(activation.ActivationError, match=r"name=web: passed sockets are 0: fd 3"):
        activation.choose(activation.SystemdSpec(socket.AF_INET, name="web"), inherited)
    with pytest.raises(activation.ActivationError, match="no sockets were passed"):
        activation.choose(activation.SystemdSpec(socket.AF_INET, index=0), activation.Inherited())


def test_unavailable_endpoint_fails_listen_with_the_reason():
    from twisted.internet.task import Clock

    endpoint = activation.server_endpoint(
        Clock(), "systemd:domain=INET:index=0", activation.Inherited()
    )
    failure = []
    endpoint.listen(None).addErrback(failure.append)
    assert failure[0].check(activation.ActivationError)
    assert "use --listen tcp:PORT" in failure[0].getErrorMessage()


def test_check_names_the_socket_or_raises_the_one_line():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        passed = activation.Inherited((sock.fileno(),), ("tvm-tracker",))
        # ListenStream=9190 is a dual-stack INET6 socket whatever domain= says.
        assert activation.check("systemd:domain=INET:name=tvm-tracker", passed) == (
            sock.fileno(),
            socket.AF_INET6,
        )
        with pytest.raises(activation.ActivationError, match=r"^no inherited socket for index=1"):
            activation.check("systemd:domain=INET:index=1", passed)


def test_adopted_socket_family_comes_from_the_socket():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        assert activation.socket_family(sock.fileno()) == socket.AF_INET6
        sock.fileno()  # still ours: socket_family must not close it
        sock.getsockname()


# -- the Twisted behaviour the workaround relies on --------------------------------------


def test_twisted_finds_no_descriptor_without_listen_fdnames():
    """Twisted 26: LISTEN_FDS without LISTEN_FDNAMES yields nothing (and is consumed).

    When this fails, Twisted fixed it and tvmrpc/systemd/activation.py may go.
    """
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert ListenFDs.fromEnvironment(environ=env).inheritedDescriptors() == []
    assert "LISTEN_FDS" not in env
    named = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert ListenFDs.fromEnvironment(environ=named).inheritedDescriptors() == [3]


def test_twisted_systemd_endpoint_raises_index_error_without_descriptors():
    """What ``--listen systemd:domain=INET:index=0`` did before activation.py."""
    from twisted.internet import reactor

    assert activation.Inherited() == activation.INHERITED  # nothing passed to pytest
    with pytest.raises(IndexError):
        serverFromString(reactor, "systemd:domain=INET:index=0")


# -- daemons under systemd-socket-activate ----------------------------------------------

FDNAMES = [None, "tvm-socket"]
IDS = ["no-fdname", "fdname"]


def _selector(fdname: str | None, by_name: bool) -> str:
    if by_name:
        return f"name={fdname or 'unknown'}"
    return "index=0"


@needs_socket_activate
@pytest.mark.stock
@pytest.mark.parametrize("by_name", [False, True], ids=["index", "name"])
@pytest.mark.parametrize("fdname", FDNAMES, ids=IDS)
def test_tracker_serves_a_stock_client_through_the_activated_socket(log_dir, fdname, by_name):
    port = free_port()
    argv = twistd_argv(
        "tvm-tracker", "--listen", f"systemd:domain=INET:{_selector(fdname, by_name)}"
    )
    with running(activated(argv, log_dir / "tracker.log", port, fdname)) as tracker:
        # The first connection makes systemd-socket-activate exec the tracker.
        client = rpc.connect_tracker("127.0.0.1", port)
        assert "Queue Status" in client.text_summary()
        tracker.wait_for(rf"tvm-tracker listening on \S+:{port}")
        # And a stock server registers through the same socket.
        server = start_stock_server(log_dir, "activated", tracker=("127.0.0.1", port))
        with running(server):
            session = client.request("activated", session_timeout=60)
            assert session.get_function("testing.echo")("via systemd") == "via systemd"
            del session
            gc.collect()


@needs_socket_activate
@pytest.mark.stock
@pytest.mark.parametrize("fdname", FDNAMES, ids=IDS)
def test_server_serves_a_stock_client_through_the_activated_socket(log_dir, fdname):
    port = free_port()
    argv = twistd_argv(
        "tvm-server", "--key", "sa", "--listen", f"systemd:domain=INET:{_selector(fdname, True)}"
    )
    with running(activated(argv, log_dir / "server.log", port, fdname)) as server:
        session = rpc.connect("127.0.0.1", port, key="sa", session_timeout=60)
        workpath = session.get_function("tvm.rpc.server.workpath")
        session.upload(bytearray(b"activated"), "f")
        with open(workpath("f"), "rb") as uploaded:
            assert uploaded.read() == b"activated"
        server.wait_for(rf"tvm-server listening on \S+:{port}")
        del session, workpath
        gc.collect()


@needs_socket_activate
@pytest.mark.stock
@pytest.mark.parametrize("fdname", FDNAMES, ids=IDS)
def test_proxy_pairs_stock_server_and_client_through_the_activated_socket(
    log_dir, tmp_path, fdname
):
    """Also the launcher (tvm-proxy) with JSON log lines, as the units run it."""
    port = free_port()
    env = subprocess_env({"TVMRPC_TWISTD_ARGS": "--logger=tvmrpc.jsonlog.observer"})
    argv = [
        sys.executable,
        "-c",
        "from tvmrpc.systemd.launch import proxy; proxy()",
        "--verbose",
        "--listen",
        f"systemd:domain=INET:{_selector(fdname, False)}",
    ]
    with running(activated(argv, log_dir / "proxy.log", port, fdname, env=env)) as proxy:
        stock_server = start_proxied_server(
            log_dir, proxy, "behind", name="stock-server", wait=False
        )
        with running(stock_server):
            proxy.wait_for(r'"text": "\S+ waits as server behind')
            session = rpc.connect("127.0.0.1", port, key="behind", session_timeout=60)
            assert session.get_function("testing.echo")(7) == 7
            del session
            gc.collect()
        records = [json.loads(line) for line in proxy.lines if line.startswith("{")]
        listening = [r for r in records if "listening on" in r["text"]]
        assert listening[0]["namespace"] == "tvmrpc.listening"
        assert listening[0]["name"] == "tvm-proxy"
        assert listening[0]["address"] == f"127.0.0.1:{port}"
        os.kill(proxy.proc.pid, signal.SIGTERM)
        assert proxy.proc.wait(30) == -signal.SIGTERM


@needs_socket_activate
def test_missing_socket_is_a_one_line_error_and_exit_1(log_dir):
    port = free_port()
    argv = twistd_argv("tvm-tracker", "--listen", "systemd:domain=INET:name=elsewhere")
    proc = activated(argv, log_dir / "tracker.log", port, "tvm-tracker")
    with running(proc):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            try:
                closed = sock.recv(1) == b""  # the daemon exits; nobody serves the socket
            except ConnectionResetError:
                closed = True
            assert closed
        assert proc.proc.wait(30) == 1
        proc.wait_for(
            r"no inherited socket for name=elsewhere: passed sockets are 0: fd 3 'tvm-tracker'; "
            r"start the daemon from its systemd \.socket unit"
        )
