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

Invariant of the archive: it is reproducible. The same inputs give the same
bytes: members sorted by name, every member a regular file with mode 0644 or
0755, owner 0:0 ``root``, and one mtime (``SOURCE_DATE_EPOCH`` when set, else
1980-01-01); the gzip header carries no file name and no time; the tvmrpc
wheel built from a checkout is built with the same ``SOURCE_DATE_EPOCH``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from crossbuild.elf import elf_members, is_elf, machine_label, require_machine
from crossbuild.errors import CrossbuildError
from crossbuild.runtime import Artifact, check_machine
from crossbuild.targets import Target
from crossbuild.wheels import (
    build_tvmrpc_wheel,
    forbidden,
    misfits,
    pip_download,
)

REQUIREMENTS = ("tvmrpc", "apache-tvm-ffi")
EXECUTABLE = 0o755
READABLE = 0o644
# The mtime of every member when SOURCE_DATE_EPOCH is not set: 1980-01-01 00:00 UTC,
# the earliest time a zip file (a wheel) can hold, so the tvmrpc wheel gets it too.
FIXED_MTIME = 315532800


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
    mtime: int = FIXED_MTIME  # of every member (see bundle_mtime)


def bundle_mtime(environ: Mapping[str, str]) -> int:
    """``SOURCE_DATE_EPOCH`` from ``environ`` when set, else ``FIXED_MTIME`` (pure)."""
    text = environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not text:
        return FIXED_MTIME
    if not text.isdigit():
        raise CrossbuildError(
            f"SOURCE_DATE_EPOCH wants whole seconds since 1970 such as 1700000000, got {text!r}"
        )
    return int(text)


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


def runtime_libraries(runtime_dir: Path, target: Target) -> list[Artifact]:
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
    return check_machine(libs, target)


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
            require_machine(f"{wheel.name}:{member}", info, spec.target.elf_machine)
            elf.setdefault(wheel.name, []).append(member)
    return elf


@dataclass(frozen=True)
class Member:
    """One file of the archive: its bytes come from ``path`` or ``data``."""

    arcname: str
    mode: int
    path: Path | None = None
    data: bytes = b""


def write_archive(members: Sequence[Member], output: Path, mtime: int) -> None:
    """Write ``members`` as a reproducible ``.tar.gz`` (see the module's invariants)."""
    # filename="" and mtime=0: the gzip header holds neither a name nor a time.
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in sorted(members, key=lambda m: m.arcname):
            info = tarfile.TarInfo(member.arcname)
            info.type = tarfile.REGTYPE
            info.mode = member.mode
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if member.path is None:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
                continue
            with open(member.path, "rb") as stream:
                info.size = os.fstat(stream.fileno()).st_size
                tar.addfile(info, stream)


def make_bundle(spec: BundleSpec) -> dict:
    """Fetch, check and pack everything; return the manifest written into the archive."""
    name = bundle_name(spec.output)
    libs = runtime_libraries(spec.runtime_dir, spec.target)
    with tempfile.TemporaryDirectory(prefix="tvmrpc-bundle-") as tmp:
        work = Path(tmp)
        if spec.tvmrpc_wheel is not None:
            tvmrpc_wheel = spec.tvmrpc_wheel
        elif spec.tvmrpc_source is not None:
            tvmrpc_wheel = build_tvmrpc_wheel(spec.tvmrpc_source, work / "built", spec.mtime)
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
            "runtime": {lib.path.name: machine_label(lib.machine) for lib in libs},
        }

        def text(body: str, arcname: str, mode: int = READABLE) -> Member:
            return Member(f"{name}/{arcname}", mode, data=body.encode("utf-8"))

        members = [
            text(render_template(_template("install.sh"), values), "install.sh", EXECUTABLE),
            text(render_template(_template("tvm-server"), values), "bin/tvm-server", EXECUTABLE),
            text(systemd_file("tvm-server@.service"), "systemd/tvm-server@.service.in"),
            text(systemd_file("tvm-server.env"), "systemd/tvm-server.env"),
            text(json.dumps(manifest, indent=2) + "\n", "manifest.json"),
            *(Member(f"{name}/lib/{lib.path.name}", EXECUTABLE, lib.path) for lib in libs),
            *(Member(f"{name}/wheels/{wheel.name}", READABLE, wheel) for wheel in wheels),
        ]
        spec.output.parent.mkdir(parents=True, exist_ok=True)
        partial = spec.output.with_name(spec.output.name + ".part")
        write_archive(members, partial, spec.mtime)
        partial.replace(spec.output)
    return manifest
