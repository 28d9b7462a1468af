"""One archive that installs a tvmrpc server on a board with nothing but python3.

Layout inside ``<name>.tar.gz`` (top directory ``<name>/``)::

    install.sh                 offline installer (venv + pip --no-index, or plain unpack)
    bin/tvm-server             launcher: twistd -n tvm-server "$@"
    lib/libtvm_runtime*.so     the TVM runtime for the board
    wheels/*.whl               tvmrpc, twisted and its deps, apache-tvm-ffi
    systemd/tvm-server@.service.in, systemd/tvm-server.env
    manifest.json              target, Python, platform tags, files and their ELF machine

Invariants checked before anything is written: every wheel's tags fit the
board, no wheel is numpy, cloudpickle, tornado or apache-tvm, and every ELF
file (runtime libraries and the ones inside wheels) is for the target machine.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from crossbuild.elf import elf_info, elf_members, is_elf, machine_label
from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target
from crossbuild.wheels import (
    build_tvmrpc_wheel,
    forbidden,
    misfits,
    pip_download,
)

REQUIREMENTS = ("tvmrpc", "apache-tvm-ffi")
EXECUTABLE = 0o755


@dataclass(frozen=True)
class BundleSpec:
    """What goes into a bundle."""

    target: Target
    python: tuple[int, int]
    platforms: tuple[str, ...]
    runtime_dir: Path  # holds the board's libtvm_runtime*.so
    tvm_ffi_requirement: str  # e.g. "apache-tvm-ffi==0.1.15.post2"
    output: Path  # the .tar.gz
    tvmrpc_source: Path | None = None  # checkout to build the tvmrpc wheel from
    tvmrpc_wheel: Path | None = None  # or a ready wheel
    pip_args: tuple[str, ...] = ()
    wheel_dir: Path | None = None  # local wheels tried first, downloads kept there


def bundle_name(output: Path) -> str:
    """The archive's top directory: the file name without ``.tar.gz``/``.tgz``."""
    name = output.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise CrossbuildError(f"-o wants a .tar.gz file name, got {output.name}")


def render_template(text: str, values: dict[str, str]) -> str:
    """Replace every ``@KEY@`` in ``text`` (pure)."""
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _template(name: str) -> str:
    return resources.files("crossbuild").joinpath("templates", name).read_text(encoding="utf-8")


def systemd_file(name: str) -> str:
    """A file shipped with tvmrpc's units (the bundle installs the same server unit)."""
    folder = resources.files("tvmrpc.systemd").joinpath("units")
    return folder.joinpath(name).read_text(encoding="utf-8")


def runtime_libraries(runtime_dir: Path, target: Target) -> list[Path]:
    """The ``libtvm_runtime*.so`` in ``runtime_dir`` (or its ``lib/``, where current TVM
    build directories keep them), each checked to be for ``target``."""
    if not runtime_dir.is_dir():
        raise CrossbuildError(f"--runtime {runtime_dir} is not a directory")
    libs: list[Path] = []
    for where in (runtime_dir, runtime_dir / "lib"):
        libs = sorted(p for p in where.glob("libtvm_runtime*.so*") if p.is_file() and is_elf(p))
        if libs:
            break
    if not libs:
        raise CrossbuildError(f"{runtime_dir} has no libtvm_runtime*.so; run the runtime command")
    for lib in libs:
        machine = elf_info(lib).machine
        if machine != target.elf_machine:
            raise CrossbuildError(
                f"{lib} is for {machine_label(machine)}, the target is "
                f"{machine_label(target.elf_machine)}"
            )
    return libs


def check_wheelhouse(wheels: Sequence[Path], spec: BundleSpec) -> dict[str, list[str]]:
    """Fail unless every wheel fits the board; return ELF members per wheel with their machine."""
    names = [w.name for w in wheels]
    bad = misfits(names, spec.python, spec.platforms)
    if bad:
        raise CrossbuildError(f"wheels that do not fit {spec.platforms[0]}: {', '.join(bad)}")
    heavy = forbidden(names)
    if heavy:
        raise CrossbuildError(f"the board must not need {', '.join(heavy)}")
    elf: dict[str, list[str]] = {}
    for wheel in wheels:
        for member, info in elf_members(wheel):
            if info.machine != spec.target.elf_machine:
                raise CrossbuildError(
                    f"{wheel.name}:{member} is for {machine_label(info.machine)}, not "
                    f"{machine_label(spec.target.elf_machine)}"
                )
            elf.setdefault(wheel.name, []).append(member)
    return elf


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str, mode: int) -> None:
    info = tar.gettarinfo(str(path), arcname)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with open(path, "rb") as stream:
        tar.addfile(info, stream)


def _add_text(tar: tarfile.TarFile, text: str, arcname: str, mode: int) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def make_bundle(spec: BundleSpec) -> dict:
    """Fetch, check and pack everything; return the manifest written into the archive."""
    name = bundle_name(spec.output)
    libs = runtime_libraries(spec.runtime_dir, spec.target)
    with tempfile.TemporaryDirectory(prefix="tvmrpc-bundle-") as tmp:
        work = Path(tmp)
        if spec.tvmrpc_wheel is not None:
            tvmrpc_wheel = spec.tvmrpc_wheel
        elif spec.tvmrpc_source is not None:
            tvmrpc_wheel = build_tvmrpc_wheel(spec.tvmrpc_source, work / "built")
        else:
            raise CrossbuildError("no tvmrpc to bundle: pass --tvmrpc-source or --tvmrpc-wheel")
        wheels = pip_download(
            [str(tvmrpc_wheel), spec.tvm_ffi_requirement],
            work / "wheels",
            spec.python,
            spec.platforms,
            pip_args=spec.pip_args,
            wheel_dir=spec.wheel_dir,
        )
        elf = check_wheelhouse(wheels, spec)
        python = "{}.{}".format(*spec.python)
        values = {
            "TARGET": spec.target.triple,
            "PYTHON": python,
            "REQUIREMENTS": " ".join(REQUIREMENTS),
        }
        manifest = {
            "target": spec.target.triple,
            "python": python,
            "platforms": list(spec.platforms),
            "wheels": sorted(w.name for w in wheels),
            "wheel_elf_files": elf,
            "runtime": {lib.name: machine_label(elf_info(lib).machine) for lib in libs},
        }
        spec.output.parent.mkdir(parents=True, exist_ok=True)
        partial = spec.output.with_name(spec.output.name + ".part")
        with tarfile.open(partial, "w:gz") as tar:
            _add_text(
                tar,
                render_template(_template("install.sh"), values),
                f"{name}/install.sh",
                EXECUTABLE,
            )
            _add_text(
                tar,
                render_template(_template("tvm-server"), values),
                f"{name}/bin/tvm-server",
                EXECUTABLE,
            )
            _add_text(
                tar,
                systemd_file("tvm-server@.service"),
                f"{name}/systemd/tvm-server@.service.in",
                0o644,
            )
            _add_text(tar, systemd_file("tvm-server.env"), f"{name}/systemd/tvm-server.env", 0o644)
            _add_text(tar, json.dumps(manifest, indent=2) + "\n", f"{name}/manifest.json", 0o644)
            for lib in libs:
                _add_file(tar, lib, f"{name}/lib/{lib.name}", EXECUTABLE)
            for wheel in wheels:
                _add_file(tar, wheel, f"{name}/wheels/{wheel.name}", 0o644)
        shutil.move(partial, spec.output)
    return manifest
