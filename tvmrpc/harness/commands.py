"""Command lines and environments for the harness's children, and running one to completion.

Invariants:
- Every command runs this interpreter (``sys.executable``), so the Python
  environment running the harness (its apache-tvm, its Twisted) is the one
  every child uses.
- :func:`child_env` is the only environment children get unless a caller
  passes its own; its PYTHONPATH comes from :mod:`tvmrpc.pythonpath`.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tvmrpc.pythonpath import with_package_on_path

#: Seconds a harness wait (or a run to completion) takes at most unless told.
DEFAULT_TIMEOUT = 60.0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for daemons: this tvmrpc first on PYTHONPATH, unbuffered output,
    one TVM thread unless the caller's environment says otherwise, then ``extra``."""
    env = with_package_on_path(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TVM_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` run by this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_module(
    module: str,
    *args: str,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` run to completion with :func:`child_env`, output as text.

    With ``check``, a non-zero exit raises CalledProcessError (its ``stderr`` says why).
    """
    return subprocess.run(
        module_argv(module, *args),
        capture_output=True,
        text=True,
        env=env if env is not None else child_env(),
        timeout=timeout,
        check=check,
    )


def twistd_argv(plugin: str, *args: str) -> list[str]:
    """``twistd -n --pidfile= PLUGIN ARGS`` run by this interpreter."""
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        plugin,
        *args,
    ]
