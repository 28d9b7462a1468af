"""twistd plugins for tvmrpc: ServiceMaker objects only.

Each names a module with ``Options`` and ``makeService``; twistd imports it
only when that plugin is run, so ``twistd --help`` stays cheap.
"""

from twisted.application.service import ServiceMaker

tvm_tracker = ServiceMaker(
    "tvmrpc tracker",
    "tvmrpc.tracker.service",
    "Apache TVM RPC tracker: queues clients onto devices by key.",
    "tvm-tracker",
)

tvm_proxy = ServiceMaker(
    "tvmrpc proxy",
    "tvmrpc.proxy.service",
    "Apache TVM RPC proxy: pairs clients with servers that cannot be reached directly.",
    "tvm-proxy",
)

tvm_server = ServiceMaker(
    "tvmrpc server",
    "tvmrpc.server.service",
    "Apache TVM RPC server: runs sessions for stock TVM clients on this device.",
    "tvm-server",
)
