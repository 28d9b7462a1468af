"""The worker side of the server: ``python -m tvmrpc.server.worker`` (spawned by the daemon).

Runs on the board under plain ``python3``: it imports nothing of tvmrpc
outside this package, never Twisted, and nothing heavy (numpy, ml_dtypes,
cloudpickle and tornado are blocked while ``tvm_ffi`` loads).

One module per job:

- :mod:`.runtime` finds and loads the runtime, libraries and ``--init`` modules;
- :mod:`.control` is the daemon ↔ zygote message schema (pure);
- :mod:`.zygote` is the fork server and the entry point;
- :mod:`.session` is one session in one worker;
- :mod:`.health` is the health check a fresh worker runs;
- :mod:`.processes` forks, kills and caps worker processes.

Invariants:
- Importing this package imports no Twisted and no numpy (tested).
- A start-up failure is reported to the daemon as one line (cause and
  fix), never as a traceback.
- A worker runs exactly one session in its own process group, then exits;
  nothing it forked outlives it.
"""

from .control import ControlError
from .health import CHECK_ALARM_SECONDS, self_test
from .processes import kill_group, limit_memory
from .runtime import (
    BLOCKED_WHILE_LOADING,
    RUNTIME_NAME,
    NotReadyError,
    WorkerOptions,
    find_runtime_library,
    load_runtime,
    load_runtime_or_explain,
    prepare_worker,
    probe_str_type_index,
)
from .session import PathEscapeError, link_module, run_session, session_path
from .zygote import Zygote, main, parse_args

__all__ = [
    "BLOCKED_WHILE_LOADING",
    "CHECK_ALARM_SECONDS",
    "RUNTIME_NAME",
    "ControlError",
    "NotReadyError",
    "PathEscapeError",
    "WorkerOptions",
    "Zygote",
    "find_runtime_library",
    "kill_group",
    "limit_memory",
    "link_module",
    "load_runtime",
    "load_runtime_or_explain",
    "main",
    "parse_args",
    "prepare_worker",
    "probe_str_type_index",
    "run_session",
    "self_test",
    "session_path",
]
