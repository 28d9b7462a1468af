"""Runtime discovery and loading, in the zygote and its workers.

Finds ``libtvm_runtime.so``, imports ``tvm_ffi`` with heavy optional
modules blocked, loads ``--load-library`` libraries and imports ``--init``
modules, and asks the runtime facts the daemon needs.

Invariants:
- Neither ``tvm`` nor numpy, ml_dtypes, torch, cloudpickle or tornado is
  imported while ``tvm_ffi`` loads (the zygote stays thread-free, so forking
  it is safe); later imports of them (by ``--init`` modules) may succeed.
- Every failure to get ready is a :class:`NotReadyError` whose text is one
  line naming cause and fix, never a traceback.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.util
import os
import socket
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, cast

#: Modules kept out of the zygote while tvm_ffi loads (it imports numpy if it can).
BLOCKED_WHILE_LOADING = ("numpy", "ml_dtypes", "torch", "cloudpickle", "tornado")
RUNTIME_NAME = "libtvm_runtime.so"


class NotReadyError(Exception):
    """The runtime, a library or an init module cannot be loaded; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What each worker loads before its session, and its memory cap (0: none)."""

    load_libraries: tuple[str, ...] = ()
    init_modules: tuple[str, ...] = ()
    memory_limit: int = 0


def one_line(exc: BaseException) -> str:
    """An exception's text on one line, at most about 300 characters."""
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def find_runtime_library(explicit: str | None = None) -> Path:
    """Locate libtvm_runtime.so: explicit path, ``TVM_LIBRARY_PATH``, or the tvm package.

    The tvm package is located with :func:`importlib.util.find_spec` without
    importing it (importing tvm would import numpy).
    """
    candidates: list[Path] = []
    if explicit:
        path = Path(explicit)
        candidates.append(path / RUNTIME_NAME if path.is_dir() else path)
    for entry in filter(None, os.environ.get("TVM_LIBRARY_PATH", "").split(os.pathsep)):
        path = Path(entry)
        candidates.append(path / RUNTIME_NAME if path.is_dir() or not path.suffix else path)
    if not explicit:
        spec = importlib.util.find_spec("tvm")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates += [Path(location) / "lib" / RUNTIME_NAME, Path(location) / RUNTIME_NAME]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates) or "nothing"
    raise FileNotFoundError(f"cannot find {RUNTIME_NAME} (tried {tried})")


def load_runtime(library: Path) -> Any:
    """Import tvm_ffi with heavy optional modules blocked, then load the runtime globally."""
    # A None entry in sys.modules makes ``import name`` raise ImportError.
    modules = cast("dict[str, ModuleType | None]", sys.modules)
    saved = {name: modules.get(name) for name in BLOCKED_WHILE_LOADING}
    for name in BLOCKED_WHILE_LOADING:
        if saved[name] is None:
            modules[name] = None
    try:
        import tvm_ffi
    finally:
        for name, module in saved.items():
            if module is None:
                modules.pop(name, None)  # later imports (--init modules) may try again
    ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
    return tvm_ffi


def load_runtime_or_explain(explicit: str | None) -> Any:
    """:func:`load_runtime` with every failure turned into one line naming cause and fix."""
    try:
        library = find_runtime_library(explicit)
    except FileNotFoundError as exc:
        raise NotReadyError(
            f"{exc}: install apache-tvm on this board or pass --runtime-library PATH"
        ) from None
    try:
        return load_runtime(library)
    except ImportError as exc:
        raise NotReadyError(
            f"cannot import tvm_ffi ({exc}): install apache-tvm-ffi for {sys.executable}"
        ) from None
    except OSError as exc:
        raise NotReadyError(
            f"cannot load the runtime library {library} ({one_line(exc)}): install what it "
            "needs (e.g. libstdc++) or pass a --runtime-library built for this board"
        ) from None


def prepare_worker(options: WorkerOptions) -> None:
    """Load every ``--load-library`` and import every ``--init`` module (errors: one line)."""
    for library in options.load_libraries:
        try:
            ctypes.CDLL(library, ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise NotReadyError(
                f"--load-library {library} cannot be loaded ({one_line(exc)}): "
                "pass a shared library built for this board"
            ) from None
    for module in options.init_modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - any failure of user code
            raise NotReadyError(
                f"--init {module} failed ({type(exc).__name__}: {one_line(exc)}): "
                f"fix the module or make it importable (PYTHONPATH), or drop --init {module}"
            ) from None


def probe_str_type_index(tvm_ffi: Any) -> int:
    """Ask the runtime which type index it writes for a raw string in an exception packet."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        tvm_ffi.get_global_func("rpc.ReturnException")(ours.fileno(), "probe")
        head = theirs.recv(20, socket.MSG_WAITALL)
    _length, _code, _nargs, type_index = struct.unpack("<Qiii", head)
    return int(type_index)
