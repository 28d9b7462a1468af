"""CMake toolchain files: rendering is pure, finding the compiler is the only I/O.

Two layouts:

- Debian/Ubuntu cross compilers (``apt install g++-aarch64-linux-gnu``): the
  compilers are ``<triple>-gcc``/``<triple>-g++`` on PATH and the target's
  libraries live in ``/usr/<triple>``; the compiler knows its own sysroot, so
  none is set.
- A vendor toolchain root (the Linaro layout): ``<root>/bin/<triple>-gcc`` and
  the sysroot ``<root>/<triple>/libc``, passed to the compiler as CMAKE_SYSROOT.

Either way programs are searched on the host and libraries, headers and
packages only in the target's root (the FIND_ROOT_PATH modes TVM's docs use).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target


@dataclass(frozen=True)
class Toolchain:
    """Where one target's compilers and libraries are."""

    target: Target
    c_compiler: str  # a name looked up on PATH, or an absolute path
    cxx_compiler: str
    sysroot: str | None  # CMAKE_SYSROOT; None when the compiler knows its own
    find_root: str  # CMAKE_FIND_ROOT_PATH


def make_toolchain(
    target: Target, root: str | None = None, sysroot: str | None = None
) -> Toolchain:
    """``target``'s toolchain: Debian's cross compilers, or the vendor layout under ``root``."""
    if root is None:
        return Toolchain(
            target,
            f"{target.triple}-gcc",
            f"{target.triple}-g++",
            sysroot,
            sysroot or target.debian_sysroot,
        )
    bin_dir = f"{root.rstrip('/')}/bin"
    sysroot = sysroot or f"{root.rstrip('/')}/{target.triple}/libc"
    return Toolchain(
        target,
        f"{bin_dir}/{target.triple}-gcc",
        f"{bin_dir}/{target.triple}-g++",
        sysroot,
        sysroot,
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toolchain(toolchain: Toolchain) -> str:
    """The text of a CMake toolchain file for ``toolchain`` (deterministic)."""
    target = toolchain.target
    where = (
        f"vendor toolchain: compilers {toolchain.cxx_compiler}"
        if os.path.isabs(toolchain.cxx_compiler)
        else f"Debian/Ubuntu cross compilers (apt install {target.debian_package})"
    )
    lines = [
        f"# CMake toolchain file for {target.triple}: {target.description}.",
        "# Written by tvmrpc-crossbuild (python -m crossbuild toolchain --target "
        f"{target.triple}); {where}.",
        "set(CMAKE_SYSTEM_NAME Linux)",
        f"set(CMAKE_SYSTEM_PROCESSOR {target.processor})",
        f"set(CMAKE_C_COMPILER {_quote(toolchain.c_compiler)})",
        f"set(CMAKE_CXX_COMPILER {_quote(toolchain.cxx_compiler)})",
    ]
    if toolchain.sysroot is not None:
        lines.append(f"set(CMAKE_SYSROOT {_quote(toolchain.sysroot)})")
    lines += [
        f"set(CMAKE_FIND_ROOT_PATH {_quote(toolchain.find_root)})",
        "# Run build tools from the host; take libraries, headers and packages from the target.",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)",
    ]
    return "\n".join(lines) + "\n"


def shipped_toolchain_path(target: Target) -> Path:
    """The ready-made toolchain file for ``target`` inside this package."""
    return Path(__file__).resolve().parent / "toolchains" / f"{target.triple}.cmake"


def check_compilers(toolchain: Toolchain) -> None:
    """Fail with a one-line hint when the C or C++ compiler cannot be run."""
    for compiler in (toolchain.c_compiler, toolchain.cxx_compiler):
        found = os.access(compiler, os.X_OK) if os.path.isabs(compiler) else shutil.which(compiler)
        if not found:
            hint = (
                "check --root"
                if os.path.isabs(compiler)
                else f"install {toolchain.target.debian_package} or pass --root"
            )
            raise CrossbuildError(f"compiler {compiler} not found: {hint}")
