"""TLS where both ends are ours: our proxy registers at our tracker over TLS (a CA made in
the test), and is refused with a wrong CA or host name, while a stock client in plaintext
runs a compiled model on the board through the same tracker and proxy."""

from __future__ import annotations

import gc

import pytest
from tvm import rpc

from tests.proxy_support import start_proxied_server, start_proxy
from tests.server_support import mlp_library  # noqa: F401 - a fixture
from tests.support import running, start_tracker
from tests.tls_support import CA, ssl_listen, tls_target
from tvmrpc.mlp import run_mlp

pytestmark = pytest.mark.stock


@pytest.fixture
def pki(tmp_path):
    lab = CA(tmp_path, "lab-ca")
    other = CA(tmp_path, "other-ca")
    cert, key = lab.issue("tracker", ["localhost", "tracker.lab"], ["127.0.0.1"])
    return lab, other, cert, key


def tls_port(tracker) -> int:
    """The port of the tracker's ssl: --listen endpoint, once it listens."""
    port = int(tracker.wait_for(r"TrackerFactory \(TLS\) starting on (\d+)").group(1))
    tracker.wait_for(rf"tvm-tracker listening on 127\.0\.0\.1:{port}\b")
    return port


def test_board_over_tls_stock_client_in_plaintext(log_dir, pki, mlp_library):  # noqa: F811
    lab, _, cert, key = pki
    # start_tracker's own --listen is the plaintext one (stock clients); this one is TLS.
    with running(start_tracker(log_dir, "--listen", ssl_listen(cert, key))) as tracker:
        plain, secure = tracker.port, tls_port(tracker)
        target = tls_target("localhost", secure, lab.trust_dir)
        with running(start_proxy(log_dir, "--tracker", target)) as proxy:
            proxy.wait_for(r"connected to tracker")
            with running(start_proxied_server(log_dir, proxy, "tlsboard")):
                proxy.wait_for(r"put tlsboard:\S+ at the tracker")
                client = rpc.connect_tracker("127.0.0.1", plain)
                session = client.request("tlsboard", session_timeout=60)
                assert run_mlp(session, mlp_library).ok
                del session
                gc.collect()


@pytest.mark.parametrize("wrong", ["ca", "hostname"])
def test_wrong_ca_or_hostname_is_refused(log_dir, pki, wrong):
    lab, other, cert, key = pki
    with running(start_tracker(log_dir, "--listen", ssl_listen(cert, key))) as tracker:
        port = tls_port(tracker)
        if wrong == "ca":
            target = tls_target("localhost", port, other.trust_dir)
        else:
            target = tls_target("elsewhere.lab", port, lab.trust_dir, via=f"127.0.0.1:{port}")
        with running(start_proxy(log_dir, "--tracker", target, name=f"proxy-{wrong}")) as proxy:
            why = {
                "ca": r"its certificate is not signed by a CA in trustRoots=",
                "hostname": r"its certificate does not name the host= we asked for",
            }[wrong]
            line = proxy.wait_for(r"#warn\] tracker \S+ failed TLS verification: " + why)
            print(line.group(0))
            assert "connected to tracker" not in proxy.output


def test_the_whole_lab_secret_and_tls(log_dir, pki, tmp_path, mlp_library):  # noqa: F811
    """Every measure at once: the tracker serves stock clients in plaintext and boards over
    TLS, with a board secret; our proxy registers over TLS proving the secret; our server
    waits at the proxy proving it too; a stock client outside --allow is refused, one inside
    runs the compiled model on our server through the same tracker and proxy."""
    from tests.server_support import start_server
    from tests.test_security_allow import closed_unanswered
    from tvmrpc.codec import TRACKER_MAGIC

    lab, _, cert, key = pki
    secret_file = tmp_path / "board.secret"
    secret_file.write_text("lab-secret-0123456789abcdef\n")
    secret = ("--board-secret-file", str(secret_file))
    tracker_args = ("--listen", ssl_listen(cert, key), "--allow", "127.0.0.1/32", *secret)
    with running(start_tracker(log_dir, *tracker_args)) as tracker:
        plain, secure = tracker.port, tls_port(tracker)
        target = tls_target("localhost", secure, lab.trust_dir)
        with running(start_proxy(log_dir, "--tracker", target, *secret)) as proxy:
            proxy.wait_for(r"connected to tracker")
            board = ("--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port))
            with running(start_server(log_dir, "lab", *board, *secret, listen=False)):
                proxy.wait_for(r"put lab:\S+ at the tracker")
                assert closed_unanswered(plain, TRACKER_MAGIC, "127.0.0.2")
                session = rpc.connect_tracker("127.0.0.1", plain).request("lab", session_timeout=60)
                assert run_mlp(session, mlp_library).ok
                del session
                gc.collect()
        assert "refused" not in proxy.output
        assert "refused a request" not in tracker.output
