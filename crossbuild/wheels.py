"""Wheels for the board: which platform tags fit it, and fetching them with pip.

The tag logic is pure (checked with plain calls); the rest runs pip as a
subprocess, the ordinary client of the package index.

Invariant of a wheelhouse built here: every wheel's tag set intersects
``supported_tags(...)`` for the board's Python and platform.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target

DEFAULT_GLIBC = (2, 31)  # Debian 11, Ubuntu 20.04, Raspberry Pi OS bullseye and newer
# What the board never gets: they would need a compiler or drag in big stacks.
FORBIDDEN = frozenset({"numpy", "cloudpickle", "tornado", "apache-tvm"})


@dataclass(frozen=True)
class WheelName:
    """A parsed wheel file name (PEP 427), tags expanded."""

    name: str  # normalized project name, e.g. "apache-tvm-ffi"
    version: str
    tags: frozenset[tuple[str, str, str]]  # (python, abi, platform)


def normalize(name: str) -> str:
    """PEP 503 normalization: ``Apache_TVM.FFI`` -> ``apache-tvm-ffi``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> WheelName:
    """Parse ``name-version(-build)?-py-abi-plat.whl``; compressed tag sets are expanded."""
    stem = filename.removesuffix(".whl")
    parts = stem.split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise CrossbuildError(f"not a wheel file name: {filename}")
    pythons, abis, platforms = (p.split(".") for p in parts[-3:])
    tags = frozenset((p, a, pl) for p in pythons for a in abis for pl in platforms)
    return WheelName(normalize(parts[0]), parts[1], tags)


def platform_tags(target: Target, glibc: tuple[int, int] = DEFAULT_GLIBC) -> list[str]:
    """manylinux platform tags a board with ``glibc`` accepts, newest first."""
    major, minor = glibc
    if major != 2 or minor < 17:
        raise CrossbuildError(f"glibc {major}.{minor} is too old for manylinux wheels (need 2.17+)")
    arch = target.wheel_arch
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686") and minor >= 12:
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def supported_tags(
    python: tuple[int, int], platforms: Sequence[str]
) -> frozenset[tuple[str, str, str]]:
    """Every (python, abi, platform) tag CPython ``python`` on ``platforms`` installs."""
    major, minor = python
    cp = f"cp{major}{minor}"
    older = [f"py{major}{m}" for m in range(minor)]
    tags: set[tuple[str, str, str]] = set()
    for plat in [*platforms, "any"]:
        if plat != "any":
            tags.add((cp, cp, plat))
            tags.update((f"cp{major}{m}", "abi3", plat) for m in range(2, minor + 1))
            tags.add((cp, "none", plat))
        tags.update((py, "none", plat) for py in (f"py{major}", f"py{major}{minor}", cp, *older))
    return frozenset(tags)


def misfits(
    filenames: Iterable[str], python: tuple[int, int], platforms: Sequence[str]
) -> list[str]:
    """The wheel file names whose tags do not fit the board (pure)."""
    ok = supported_tags(python, platforms)
    return [f for f in filenames if not (parse_wheel_name(f).tags & ok)]


def forbidden(filenames: Iterable[str]) -> list[str]:
    """The wheel file names of packages the board must never need (pure)."""
    return [f for f in filenames if parse_wheel_name(f).name in FORBIDDEN]


def requirement_of(metadata: str, project: str) -> str | None:
    """The unconditional ``Requires-Dist`` on ``project`` in METADATA text, e.g. ``x>=1``."""
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        if ";" in spec:
            continue  # an extra or a marker: not needed on the board
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec)
        if match and normalize(match[1]) == normalize(project):
            return f"{project}{match[2].replace(' ', '')}"
    return None


def parse_version(text: str, what: str) -> tuple[int, int]:
    """``"3.11"`` -> ``(3, 11)``; a one-line error names the option ``what``."""
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not match:
        raise CrossbuildError(f"{what} wants MAJOR.MINOR such as 3.11, got {text!r}")
    return int(match[1]), int(match[2])


# --- I/O: pip ---------------------------------------------------------------


def _pip_error(result: subprocess.CompletedProcess[str], what: str) -> CrossbuildError:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("ERROR:")), lines[-1] if lines else "")
    reason = reason.removeprefix("ERROR:").strip()
    return CrossbuildError(f"pip could not {what}: {reason}")


def pip_download(
    requirements: Sequence[str],
    dest: Path,
    python: tuple[int, int],
    platforms: Sequence[str],
    no_deps: bool = False,
    pip_args: Sequence[str] = (),
    wheel_dir: Path | None = None,
) -> list[Path]:
    """Download binary wheels of ``requirements`` for the board into ``dest``; return them.

    With ``wheel_dir``, wheels already there are used instead of the index's
    (pip ``--find-links``) and every wheel fetched by name is kept there, so
    the next call downloads nothing it already has.
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    major, minor = python
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
    argv += ["--only-binary=:all:", "--dest", str(dest)]
    argv += ["--python-version", f"{major}.{minor}", "--implementation", "cp"]
    argv += ["--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for plat in platforms:
        argv += ["--platform", plat]
    if no_deps:
        argv.append("--no-deps")
    if wheel_dir is not None:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--find-links", str(wheel_dir)]
    argv += [*pip_args, *requirements]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise _pip_error(result, f"download {' '.join(requirements)} for {platforms[0]}")
    got = sorted(set(dest.iterdir()) - before)
    if wheel_dir is not None:
        keep_wheels(got, wheel_dir, skip={Path(r).name for r in requirements})
    return got


def keep_wheels(wheels: Iterable[Path], wheel_dir: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Copy ``wheels`` not yet in ``wheel_dir`` there (atomically); ``skip`` names stay out.

    Local files given as requirements (the tvmrpc wheel built from a checkout)
    are skipped: the directory holds only what an index served.
    """
    skipped = set(skip)
    kept = []
    for wheel in wheels:
        target = wheel_dir / wheel.name
        if wheel.suffix != ".whl" or wheel.name in skipped or target.exists():
            continue
        partial = wheel_dir / f".{wheel.name}.{os.getpid()}.part"
        shutil.copy2(wheel, partial)
        partial.replace(target)
        kept.append(target)
    return kept


def build_tvmrpc_wheel(source: Path, dest: Path) -> Path:
    """Build the tvmrpc wheel from the checkout ``source`` (via a copy: no build/ left)."""
    if not (source / "setup.py").is_file() or not (source / "tvmrpc").is_dir():
        raise CrossbuildError(f"{source} is not a tvmrpc checkout (no setup.py and tvmrpc/)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tvmrpc-src-") as tmp:
        copy = Path(tmp) / "tvmrpc"
        copy.mkdir()
        for name in (
            "setup.py",
            "README.md",
            "LICENSE",
            "setup.cfg",
            "pyproject.toml",
            "MANIFEST.in",
        ):
            if (source / name).is_file():
                shutil.copy2(source / name, copy / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        for name in ("tvmrpc", "crossbuild", "twisted"):
            if (source / name).is_dir():
                shutil.copytree(source / name, copy / name, ignore=ignore)
        argv = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check"]
        argv += ["--no-deps", "--wheel-dir", str(dest), str(copy)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise _pip_error(result, f"build the tvmrpc wheel from {source}")
    found = sorted(dest.glob("tvmrpc-*.whl"))
    if not found:
        raise CrossbuildError(f"pip built no tvmrpc wheel from {source}")
    return found[-1]


def wheel_metadata(wheel: Path) -> str:
    """The METADATA text of ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
                return archive.read(name).decode("utf-8", "replace")
    raise CrossbuildError(f"{wheel.name} has no METADATA")
