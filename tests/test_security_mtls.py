"""Client certificates as board identity (``--listen mtls:``) and TLS between our server and
a proxy (``tvm-server --proxy tls:...``).

Boards of ours hold a client certificate from a lab CA made in the test and no secret: one
registers at the tracker over mTLS, one waits at the proxy over mTLS (the daemon relays its
session to the worker), and the proxy registers at the tracker over mTLS; a stock client in
plaintext runs a compiled model on both through the same tracker and proxy. A board with no
certificate, or one from another CA, is refused by TLS and never reaches the queue."""

from __future__ import annotations

import gc
import json
import socket
import ssl
import struct

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.proxy_support import start_proxy
from tests.server_support import mlp_library, start_server  # noqa: F401 - a fixture
from tests.status_support import STATUS_FLAG, metrics, status_port, value
from tests.support import running, start_tracker, stock_tracker_socket
from tests.tls_support import CA, mtls_listen, tls_target
from tvmrpc import boardtls
from tvmrpc.codec import TRACKER_MAGIC
from tvmrpc.mlp import run_mlp

pytestmark = pytest.mark.stock


class Lab:
    """The test's PKI: a lab CA (daemons and boards) and another CA (an outsider)."""

    def __init__(self, directory) -> None:
        self.ca = CA(directory, "mtls-lab-ca")
        self.other = CA(directory, "mtls-other-ca")
        self.tracker = self.ca.issue("mtls-tracker", ["localhost"], ["127.0.0.1"])
        self.proxy = self.ca.issue("mtls-proxy", ["localhost"], ["127.0.0.1"])
        self.board = self.ca.issue("board-a", ["board-a.lab"], [])
        self.board_b = self.ca.issue("board-b", ["board-b.lab"], [])
        self.proxy_client = self.ca.issue("proxy-as-client", ["proxy.lab"], [])
        self.outsider = self.other.issue("outsider", ["outsider.lab"], [])

    def listen(self, server: tuple, mode: str = "required") -> str:
        return mtls_listen(*server, self.ca.pem, mode)

    def target(self, port: int, client: tuple | None) -> str:
        return tls_target("localhost", port, self.ca.trust_dir, client=client)


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("mtls-pki"))


def tls_port(daemon, factory: str) -> int:
    """The port of a daemon's mtls: endpoint, once it listens."""
    return int(daemon.wait_for(rf"{factory} \(TLS\) starting on (\d+)").group(1))


def call(sock, value):
    frame = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(frame)) + frame)
    return base.recvjson(sock)


def raw_tls(port: int, lab: Lab, client: tuple | None, source: str) -> ssl.SSLSocket:
    """A TLS connection from ``source`` that trusts the lab CA, with ``client`` as its cert."""
    context = ssl.create_default_context(cafile=str(lab.ca.pem))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return context.wrap_socket(sock, server_hostname="localhost")


def rogue_put(port: int, lab: Lab, client: tuple | None, source: str) -> str:
    """Try to PUT ``lab`` at an mtls: port; say how it ended (never with a success)."""
    try:
        with raw_tls(port, lab, client, source) as sock:
            sock.sendall(struct.pack("<i", TRACKER_MAGIC))
            if sock.recv(4) != struct.pack("<i", TRACKER_MAGIC):
                return "refused by TLS: closed without the tracker magic"
            reply = call(sock, [base.TrackerCode.PUT, "lab", [1, "lab:evil"], "10.9.9.9"])
    except (ssl.SSLError, OSError) as exc:
        return f"refused by TLS: {exc}"
    return f"answered {reply!r}"


def keepalive_links(port: int) -> list[bool]:
    """For each established loopback TCP connection to ``port``: is its keepalive timer on?

    ``/proc/net/tcp``'s ``tr`` column is 2 while a keepalive timer is armed (an idle
    connection with SO_KEEPALIVE); 0 when no timer runs (no keepalive).
    """
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] == "01":
                found.append(fields[5].split(":")[0] == "02")
    return found


def test_spec_parsing_and_file_errors_are_one_line(tmp_path, lab):
    spec = boardtls.parse_spec(
        "mtls:9191:interface=10.0.0.1:privateKey=k\\:1.pem:clientCA=ca.pem:clientCert=optional"
    )
    assert (spec.port, spec.interface, spec.private_key, spec.cert_key) == (
        9191,
        "10.0.0.1",
        "k:1.pem",
        "k:1.pem",
    )
    assert not spec.required
    assert spec.client_ca == "ca.pem"
    for bad, why in [
        ("mtls:privateKey=k:clientCA=c", "needs a port number"),
        ("mtls:1:clientCA=c", "needs privateKey="),
        ("mtls:1:privateKey=k", "needs clientCA="),
        ("mtls:1:privateKey=k:clientCA=c:clientCert=maybe", "required or optional"),
        ("mtls:1:privateKey=k:clientCA=c:caCerts=x", "unknown field caCerts="),
    ]:
        with pytest.raises(boardtls.EndpointError, match=why):
            boardtls.parse_spec(bad)
    cert, key = lab.tracker
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(boardtls.EndpointError, match=r"clientCA=.*missing-ca.pem: cannot read it"):
        boardtls.server_endpoint(None, f"mtls:0:privateKey={key}:certKey={cert}:clientCA={missing}")
    empty = tmp_path / "empty-ca.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(boardtls.EndpointError, match="no PEM certificate in it"):
        boardtls.server_endpoint(None, f"mtls:0:privateKey={key}:certKey={cert}:clientCA={empty}")


def test_missing_client_ca_is_a_startup_error(log_dir, lab, tmp_path):
    from tests.support import Daemon
    from tests.test_ops_startup import exits

    cert, key = lab.tracker
    listen = f"mtls:0:privateKey={key}:certKey={cert}:clientCA={tmp_path / 'nope.pem'}"
    tracker = Daemon("tvm-tracker", ["--listen", listen], log_dir / "bad-ca.log")
    tracker.wait_for(r"nope\.pem")
    assert exits(tracker) == 1
    lines = [line for line in tracker.output.splitlines() if "nope.pem" in line]
    print(lines)
    assert len(lines) == 1, lines
    assert "clientCA=" in lines[0]
    assert "cannot read it" in lines[0]


def test_mtls_without_pyopenssl_names_the_package(log_dir, lab, tmp_path):
    from tests.support import Daemon
    from tests.test_ops_startup import exits, hiding

    listen = lab.listen(lab.tracker)
    daemon = Daemon(
        "tvm-tracker", ["--listen", listen], log_dir / "nossl.log", env=hiding(tmp_path, "OpenSSL")
    )
    assert exits(daemon) == 1
    last = daemon.output.strip().splitlines()[-1]
    print(last)
    assert last.startswith(f"tvm-tracker: --listen {listen!r} needs TLS support")
    assert "Traceback" not in daemon.output


def test_boards_with_client_certificates_stock_client_in_plaintext(log_dir, lab, mlp_library):  # noqa: F811
    """No secret anywhere: the mtls: ports make board registration need a proof, which the
    boards' certificates give; a rogue plaintext PUT is refused, a stock client runs the
    model on the direct board and on the one behind the proxy."""
    with running(start_tracker(log_dir, "--listen", lab.listen(lab.tracker))) as tracker:
        plain, secure = tracker.port, tls_port(tracker, "TrackerFactory")
        proxy_args = (
            "--listen",
            lab.listen(lab.proxy),
            "--tracker",
            lab.target(secure, lab.proxy_client),
        )
        with running(start_proxy(log_dir, *proxy_args)) as proxy:
            proxy_tls = tls_port(proxy, "ProxyFactory")
            proxy.wait_for(r"connected to tracker")
            direct = ("--tracker", lab.target(secure, lab.board))
            behind = ("--proxy", lab.target(proxy_tls, lab.board_b))
            with (
                running(start_server(log_dir, "direct", *direct)) as server,
                running(start_server(log_dir, "behind", *behind, listen=False)) as board_b,
            ):
                tracker.wait_for(r"admitted as a board by its client certificate CN=board-a")
                tracker.wait_for(r"server:direct registered from 127\.0\.0\.1")
                proxy.wait_for(r"registration server:behind from \S+ admitted .* CN=board-b")
                tracker.wait_for(r"admitted as a board by its client certificate CN=proxy-as")
                proxy.wait_for(r"put behind:\S+ at the tracker")
                # The links over TLS keep TCP keepalive on the socket beneath (a board or
                # tracker that vanishes is noticed): the proxy's and board-a's at the tracker,
                # board-b's at the proxy.
                assert keepalive_links(secure) == [True, True], keepalive_links(secure)
                assert keepalive_links(proxy_tls) == [True], keepalive_links(proxy_tls)
                rogue = stock_tracker_socket(plain, source="127.0.0.2")
                try:
                    reply = call(rogue, [base.TrackerCode.PUT, "direct", [1, "direct:x"], "10.9"])
                    assert reply[0] == base.TrackerCode.FAIL
                finally:
                    rogue.close()
                client = rpc.connect_tracker("127.0.0.1", plain)
                for key in ("direct", "behind"):
                    session = client.request(key, session_timeout=60)
                    assert run_mlp(session, mlp_library).ok, key
                    del session
                    gc.collect()
                server.wait_for(r"session ended for")
                board_b.wait_for(r"session ended for client:behind")
                # The relayed session again: the next one is handed to a fresh worker too.
                session = client.request("behind", session_timeout=60)
                assert run_mlp(session, mlp_library).ok
                del session
                gc.collect()
    assert "refused a TLS connection" not in tracker.output + proxy.output


def test_no_certificate_or_another_ca_is_refused(log_dir, lab, mlp_library):  # noqa: F811
    """At the tracker's and the proxy's mtls: ports a board with no client certificate, or
    one from another CA, fails the TLS handshake (one warn line per peer saying which) and
    never reaches the queue: a stock client still reaches the real board."""
    tracker_args = ("--listen", lab.listen(lab.tracker), *STATUS_FLAG)
    with running(start_tracker(log_dir, *tracker_args)) as tracker:
        plain, secure = tracker.port, tls_port(tracker, "TrackerFactory")
        sport = status_port(tracker)
        with running(start_proxy(log_dir, "--listen", lab.listen(lab.proxy))) as proxy:
            proxy_tls = tls_port(proxy, "ProxyFactory")
            real = ("--tracker", lab.target(secure, lab.board))
            with running(start_server(log_dir, "lab", *real)) as server:
                tracker.wait_for(r"server:lab registered from")
                # Rogues at the tracker: no certificate (127.0.0.2), another CA (127.0.0.3).
                for client, source in [(None, "127.0.0.2"), (lab.outsider, "127.0.0.3")]:
                    outcome = rogue_put(secure, lab, client, source)
                    print(source, outcome)
                    assert outcome.startswith("refused by TLS"), outcome
                assert rogue_put(secure, lab, None, "127.0.0.2").startswith("refused by TLS")
                tracker.wait_for(
                    r"#warn\] refused a TLS connection from 127\.0\.0\.2 on port \d+: "
                    r"it sent no client certificate"
                )
                tracker.wait_for(
                    r"#warn\] refused a TLS connection from 127\.0\.0\.3 on port \d+: "
                    r"its client certificate is not signed by a CA in clientCA="
                )
                # Boards of ours with the outsider's certificate, same key: at the proxy and
                # at the tracker. Each side says in one line what is wrong.
                at_proxy = ("--proxy", lab.target(proxy_tls, lab.outsider))
                at_tracker = ("--tracker", lab.target(secure, lab.outsider))
                with (
                    running(start_server(log_dir, "lab", *at_proxy, listen=False, name="rogue")),
                    running(start_server(log_dir, "lab", *at_tracker, name="rogue-t")) as rogue_t,
                ):
                    line = proxy.wait_for(r"#warn\] refused a TLS connection from 127\.0\.0\.1")
                    print(line.group(0))
                    assert "not signed by a CA in clientCA=" in line.string
                    line = tracker.wait_for(r"#warn\] refused a TLS connection from 127\.0\.0\.1")
                    assert "not signed by a CA in clientCA=" in line.string
                    # Every refusal is counted (127.0.0.2 twice, 127.0.0.3, then 127.0.0.1,
                    # logged in that order), though each peer is warned about once.
                    counted = value(
                        metrics(sport),
                        "tvmrpc_refused_connections_total",
                        reason="client certificate",
                    )
                    assert counted >= 4, counted
                    line = rogue_t.wait_for(r"#warn\] tracker \S+ failed TLS verification")
                    print(line.group(0))
                    assert "it refused our client certificate" in line.string
                client = rpc.connect_tracker("127.0.0.1", plain)
                session = client.request("lab", session_timeout=60)
                assert run_mlp(session, mlp_library).ok
                del session
                gc.collect()
                server.wait_for(r"session ended for")
        summary = rpc.connect_tracker("127.0.0.1", plain).summary()
        addresses = [info["addr"][0] for info in summary["server_info"]]
        assert "10.9.9.9" not in addresses
    warned = [line for line in tracker.output.splitlines() if "from 127.0.0.2" in line]
    assert len(warned) == 1, warned  # two refusals, one warn line
    assert "waits as server lab" not in proxy.output


def test_optional_certificates_beside_the_secret(log_dir, lab, secret_file):
    """clientCert=optional with --board-secret-file: a board with a certificate and no secret
    registers, a board without a certificate registers by proving the secret, and a PUT
    with neither is refused at the application level and never queued."""
    tracker_args = ("--listen", lab.listen(lab.tracker, "optional"))
    secret = ("--board-secret-file", str(secret_file))
    with running(start_tracker(log_dir, *tracker_args, *secret)) as tracker:
        plain, secure = tracker.port, tls_port(tracker, "TrackerFactory")
        by_cert = ("--tracker", lab.target(secure, lab.board))
        by_secret = ("--tracker", lab.target(secure, None), *secret)
        with (
            running(start_server(log_dir, "bycert", *by_cert)),
            running(start_server(log_dir, "bysecret", *by_secret)),
        ):
            tracker.wait_for(r"server:bycert registered from")
            tracker.wait_for(r"server:bysecret registered from")
            outcome = rogue_put(secure, lab, None, "127.0.0.2")
            print(outcome)
            assert outcome.startswith("answered [-1, "), outcome
            assert "board registration needs" in outcome
            summary = rpc.connect_tracker("127.0.0.1", plain).summary()
            assert summary["queue_info"]["bycert"]["free"] == 1
            assert summary["queue_info"]["bysecret"]["free"] == 1
            assert "lab" not in summary["queue_info"]
    assert "admitted as a board by its client certificate CN=board-a" in tracker.output
    assert "refused a TLS connection" not in tracker.output


def test_relayed_session_moves_bytes_exactly_plain_vs_tls(log_dir, lab):
    """16 MiB up and back through the proxy to a board waiting in plain TCP (socket handed to
    the worker) and to one waiting over mTLS (relayed by the daemon); prints both rates."""
    import hashlib
    import time

    blob = bytes(range(256)) * (16 * 4096)  # 16 MiB
    digest = hashlib.sha256(blob).hexdigest()
    # The plaintext board is let in by address: an mtls: port turns board authentication on.
    proxy_args = ("--listen", lab.listen(lab.proxy), "--allow-board-from", "127.0.0.1/32")
    with running(start_proxy(log_dir, *proxy_args)) as proxy:
        proxy_tls = tls_port(proxy, "ProxyFactory")
        plain = ("--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port))
        tls = ("--proxy", lab.target(proxy_tls, lab.board_b))
        with (
            running(start_server(log_dir, "plainwait", *plain, listen=False)),
            running(start_server(log_dir, "tlswait", *tls, listen=False)),
        ):
            proxy.wait_for(r"waits as server plainwait")
            proxy.wait_for(r"waits as server tlswait")
            for key in ("plainwait", "tlswait"):
                session = rpc.connect("127.0.0.1", proxy.port, key=key, session_timeout=120)
                started = time.perf_counter()
                session.upload(bytearray(blob), "blob.bin")
                up = time.perf_counter() - started
                back = session.download("blob.bin")
                both = time.perf_counter() - started
                assert hashlib.sha256(bytes(back)).hexdigest() == digest, key
                session.upload(bytearray(b"tiny"), "tiny.bin")
                started = time.perf_counter()
                for _ in range(50):
                    assert bytes(session.download("tiny.bin")) == b"tiny"
                small = (time.perf_counter() - started) / 50 * 1000
                print(
                    f"{key}: 16 MiB up {16 / up:.1f} MiB/s, up+down {32 / both:.1f} MiB/s, "
                    f"small download {small:.2f} ms "
                    f"({'handed to the worker' if key == 'plainwait' else 'relayed over TLS'})"
                )
                del session
                gc.collect()


@pytest.mark.parametrize("wrong", ["ca", "hostname"])
def test_board_refuses_a_proxy_with_a_wrong_ca_or_hostname(log_dir, lab, wrong):
    """Our server verifies the proxy it waits at: another CA, or a certificate that does not
    name host=, is one warn line saying which, and the board never waits there."""
    with running(start_proxy(log_dir, "--listen", lab.listen(lab.proxy))) as proxy:
        port = tls_port(proxy, "ProxyFactory")
        if wrong == "ca":
            target = tls_target("localhost", port, lab.other.trust_dir, client=lab.board)
        else:
            via = f"127.0.0.1:{port}"
            target = tls_target("elsewhere.lab", port, lab.ca.trust_dir, via=via, client=lab.board)
        board = start_server(log_dir, "lab", "--proxy", target, listen=False, name=f"b-{wrong}")
        with running(board):
            why = {
                "ca": r"its certificate is not signed by a CA in trustRoots=",
                "hostname": r"its certificate does not name the host= we asked for",
            }[wrong]
            line = board.wait_for(r"#warn\] proxy \S+: failed TLS verification: " + why)
            print(line.group(0))
        assert "waits as server lab" not in proxy.output


def test_session_timeout_reaches_the_client_through_the_relay(log_dir, lab, tmp_path):
    """A relayed session past its -timeout: the worker is killed and the stock client gets
    RPCSessionTimeoutError written by the daemon into the relay, then the next client is
    served by a fresh worker."""
    from tests.server_support import init_module_dir, server_env, time_out_a_session

    with running(start_proxy(log_dir, "--listen", lab.listen(lab.proxy))) as proxy:
        proxy_tls = tls_port(proxy, "ProxyFactory")
        path, module = init_module_dir(tmp_path / "init")
        tls = ("--proxy", lab.target(proxy_tls, lab.board_b))
        board = start_server(
            log_dir, "slow", "--init", module, *tls, env=server_env(path), listen=False
        )
        with running(board):
            proxy.wait_for(r"waits as server slow")
            mark = time_out_a_session(board, proxy.port, "slow")
            board.wait_for(r"session ended for client:slow", start=mark)
            session = rpc.connect("127.0.0.1", proxy.port, key="slow", session_timeout=30)
            assert session.get_function("tvmrpc_test.pid")() > 0
            del session
            gc.collect()
