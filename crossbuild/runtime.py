"""The TVM runtime libraries for a board: cross-built from a TVM tree, or taken from wheels.

Source mode follows TVM's own recipe: config.cmake copied into the build
directory and edited, a toolchain file, ``cmake --build . --target runtime``.
Wheel mode downloads the board's apache-tvm wheel and keeps only the runtime
libraries whose every dependency the board has (the compiler library and
device runtimes such as CUDA stay behind).

Invariant of both: every library returned is an ELF file for the target's
machine; anything else is an error, not a warning.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crossbuild import config as cfg
from crossbuild.elf import elf_info, foreign_needs, is_elf, require_machine
from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target
from crossbuild.toolchain import Toolchain, check_compilers, render_toolchain
from crossbuild.wheels import (
    newest,
    parse_wheel_name,
    pip_download,
    requirement_of,
    wheel_metadata,
)

RUNTIME_PREFIX = "libtvm_runtime"


@dataclass(frozen=True)
class Artifact:
    """One built or extracted library and the machine it is for."""

    path: Path
    machine: str


@dataclass
class RuntimeResult:
    """What a ``runtime`` run produced."""

    artifacts: list[Artifact]
    changes: list[cfg.Change] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # library -> missing deps
    tvm_ffi_requirement: str | None = None


def find_cmake() -> str:
    """cmake next to this Python (pip's ``cmake`` package) first, then on PATH."""
    beside = Path(sys.executable).parent / "cmake"
    if beside.is_file():
        return str(beside)
    found = shutil.which("cmake")
    if not found:
        raise CrossbuildError("cmake not found: pip install 'cmake>=3.26' or install it with apt")
    return found


def check_tvm_tree(source: Path) -> Path:
    """The tree's ``cmake/config.cmake``; a one-line error when ``source`` is not a TVM tree."""
    config = source / "cmake" / "config.cmake"
    if not source.is_dir():
        raise CrossbuildError(f"{source} does not exist")
    if not config.is_file() or not (source / "CMakeLists.txt").is_file():
        raise CrossbuildError(
            f"{source} is not a TVM source tree (no cmake/config.cmake and CMakeLists.txt)"
        )
    return config


def check_machine(paths: Sequence[Path], target: Target, hint: str = "") -> list[Artifact]:
    """Artifacts for ``paths``; a one-line error when one is not built for ``target``."""
    return [
        Artifact(path, require_machine(str(path), elf_info(path), target.elf_machine, hint).machine)
        for path in paths
    ]


def _run_logged(argv: Sequence[str], log: Path, step: str) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise CrossbuildError(f"{step} failed (exit {code}); log: {log}")


def build_from_source(
    source: Path,
    toolchain: Toolchain,
    build_dir: Path,
    settings: Mapping[str, str],
    jobs: int,
    build_type: str = "Release",
) -> RuntimeResult:
    """Configure and build the ``runtime`` target of the TVM tree ``source`` for the board."""
    config_path = check_tvm_tree(source)
    text, changes = cfg.edit_config(config_path.read_text(encoding="utf-8"), settings)
    check_compilers(toolchain)
    cmake = find_cmake()
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "config.cmake").write_text(text, encoding="utf-8")
    toolchain_file = build_dir / f"toolchain-{toolchain.target.triple}.cmake"
    toolchain_file.write_text(render_toolchain(toolchain), encoding="utf-8")
    log = build_dir / "crossbuild.log"
    log.write_text("", encoding="utf-8")
    configure = [cmake, "-S", str(source.resolve()), "-B", str(build_dir.resolve())]
    configure += [f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file.resolve()}"]
    configure += [f"-DCMAKE_BUILD_TYPE={build_type}"]
    _run_logged(configure, log, "cmake configure")
    _run_logged(
        [cmake, "--build", str(build_dir), "--target", "runtime", "--parallel", str(jobs)],
        log,
        "cmake build of target runtime",
    )
    libraries = sorted(
        p
        for p in build_dir.rglob(f"{RUNTIME_PREFIX}*.so*")
        if p.is_file() and not p.is_symlink() and "CMakeFiles" not in p.parts and is_elf(p)
    )
    if not libraries:
        raise CrossbuildError(f"the build made no {RUNTIME_PREFIX}*.so; log: {log}")
    return RuntimeResult(
        check_machine(libraries, toolchain.target, "was the toolchain file used?"), changes
    )


def extract_runtime(wheel: Path, out_dir: Path, target: Target) -> RuntimeResult:
    """Copy the runtime libraries the board can load from apache-tvm ``wheel`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [
            m
            for m in archive.namelist()
            if Path(m).name.startswith(RUNTIME_PREFIX) and ".so" in Path(m).name
        ]
        if not members:
            raise CrossbuildError(f"{wheel.name} has no {RUNTIME_PREFIX}*.so")
        with tempfile.TemporaryDirectory() as tmp:
            extracted = []
            for member in members:
                path = Path(tmp) / Path(member).name
                path.write_bytes(archive.read(member))
                extracted.append(path)
            names = {p.name for p in extracted} | {"libtvm_ffi.so"}
            kept, skipped = [], {}
            for path in extracted:
                missing = foreign_needs(elf_info(path), names)
                if missing:
                    skipped[path.name] = missing
                    continue
                dest = out_dir / path.name
                shutil.copy2(path, dest)
                dest.chmod(0o755)
                kept.append(dest)
    requirement = requirement_of(wheel_metadata(wheel), "apache-tvm-ffi")
    return RuntimeResult(check_machine(sorted(kept), target), [], skipped, requirement)


def runtime_from_wheel(
    target: Target,
    tvm_version: str,
    out_dir: Path,
    python: tuple[int, int],
    platforms: Sequence[str],
    pip_args: Sequence[str] = (),
    wheel_dir: Path | None = None,
) -> RuntimeResult:
    """Download apache-tvm ``tvm_version`` for the board and extract its runtime libraries.

    ``wheel_dir``: a local wheel directory tried first and filled (see ``pip_download``).
    """
    with tempfile.TemporaryDirectory(prefix="tvm-wheel-") as tmp:
        got = pip_download(
            [f"apache-tvm=={tvm_version}"],
            Path(tmp),
            python,
            platforms,
            True,
            pip_args,
            wheel_dir,
        )
        wheel = newest(p for p in got if parse_wheel_name(p.name).name == "apache-tvm")
        if wheel is None:
            raise CrossbuildError(f"pip downloaded no apache-tvm wheel for {platforms[0]}")
        return extract_runtime(wheel, out_dir, target)
