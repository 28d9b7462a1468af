"""Our proxy (``twistd -n tvm-proxy``) between stock TVM servers and clients."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import rpc

from tests.proxy_support import start_proxied_server, start_proxy
from tests.support import running

pytestmark = pytest.mark.stock


@pytest.fixture(params=["splice", "userspace"])
def proxy(request, log_dir):
    """Our proxy forwarding with splice(2), or in userspace (``--no-splice``)."""
    extra = ["--no-splice"] if request.param == "userspace" else []
    with running(start_proxy(log_dir, *extra)) as daemon:
        daemon.path = request.param
        yield daemon


def test_stock_server_and_client_through_proxy(proxy, log_dir):
    with running(start_proxied_server(log_dir, proxy, "dev")):
        mark = proxy.mark()
        session = rpc.connect("127.0.0.1", proxy.port, key="dev", session_timeout=60)
        path = proxy.wait_for(r"forwarding \S+ and \S+ by (\w+)", start=mark).group(1)
        assert path == proxy.path
        echo = session.get_function("testing.echo")
        assert echo("hello through the proxy") == "hello through the proxy"
        assert echo(12345) == 12345
        # 64 MiB up and back down, intact
        data = np.random.default_rng(4).integers(0, 256, size=64 << 20, dtype=np.uint8)
        remote = tvm.runtime.tensor(data, session.cpu())
        back = remote.numpy()
        assert back.shape == data.shape
        assert np.array_equal(back, data)
        del remote, session
