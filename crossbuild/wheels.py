"""Wheels for the board: which platform tags fit it, and fetching them with pip.

The tag logic is pure (checked with plain calls) and delegates wheel file
names, tags, requirements and versions to ``packaging`` (the library pip
itself uses), so crossbuild agrees with pip about what installs where. The
rest runs pip as a subprocess, the ordinary client of the package index.

``packaging`` is a host-side dependency (the ``crossbuild`` extra): nothing
on the board imports this module.

Invariant of a wheelhouse built here: every wheel's tag set intersects
``supported_tags(...)`` for the board's Python and platform.
"""

from __future__ import annotations

import email.parser
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

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import Version

from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target

DEFAULT_GLIBC = (2, 31)  # Debian 11, Ubuntu 20.04, Raspberry Pi OS bullseye and newer
# What the board never gets: they would need a compiler or drag in big stacks.
FORBIDDEN = frozenset({"numpy", "cloudpickle", "tornado", "apache-tvm"})


@dataclass(frozen=True)
class WheelName:
    """A parsed wheel file name (PEP 427), tags expanded."""

    name: NormalizedName  # e.g. "apache-tvm-ffi"
    version: Version
    tags: frozenset[Tag]


def parse_wheel_name(filename: str) -> WheelName:
    """Parse ``name-version(-build)?-py-abi-plat.whl``; compressed tag sets are expanded."""
    try:
        name, version, _build, tags = parse_wheel_filename(filename)
    except InvalidWheelFilename as error:
        raise CrossbuildError(f"not a wheel file name: {filename} ({error})") from None
    return WheelName(name, version, tags)


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


def supported_tags(python: tuple[int, int], platforms: Sequence[str]) -> frozenset[Tag]:
    """Every tag CPython ``python`` on ``platforms`` installs (``packaging.tags``' rules)."""
    interpreter = "cp{}{}".format(*python)
    tags = set(cpython_tags(python, abis=[interpreter], platforms=platforms))
    tags.update(compatible_tags(python, interpreter, platforms))
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
    """The unconditional ``Requires-Dist`` on ``project`` in METADATA text, e.g. ``x>=1``.

    A requirement with a marker (an extra, a platform) is not needed on the board.
    """
    wanted = canonicalize_name(project)
    for spec in email.parser.HeaderParser().parsestr(metadata).get_all("Requires-Dist", []):
        try:
            requirement = Requirement(spec)
        except InvalidRequirement as error:
            raise CrossbuildError(f"bad Requires-Dist {spec!r} in a wheel: {error}") from None
        if requirement.marker is None and canonicalize_name(requirement.name) == wanted:
            return f"{project}{requirement.specifier}"
    return None


def allows(requirement: str, version: str) -> bool:
    """Whether ``requirement`` (``name>=1,<2``) accepts ``version``, pre-releases included."""
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def newest(wheels: Iterable[Path]) -> Path | None:
    """The wheel with the highest version (PEP 440 order, not the file names' order)."""
    return max(wheels, key=lambda w: parse_wheel_name(w.name).version, default=None)


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


def build_tvmrpc_wheel(source: Path, dest: Path, source_date_epoch: int | None = None) -> Path:
    """Build the tvmrpc wheel from the checkout ``source`` (via a copy: no build/ left).

    With ``source_date_epoch`` the wheel's members carry that time (the
    ``SOURCE_DATE_EPOCH`` convention the wheel builder honours): the same
    checkout gives the same bytes.
    """
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
        env = dict(os.environ)
        if source_date_epoch is not None:
            env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            raise _pip_error(result, f"build the tvmrpc wheel from {source}")
    found = newest(dest.glob("tvmrpc-*.whl"))
    if found is None:
        raise CrossbuildError(f"pip built no tvmrpc wheel from {source}")
    return found


def wheel_metadata(wheel: Path) -> str:
    """The METADATA text of ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
                return archive.read(name).decode("utf-8", "replace")
    raise CrossbuildError(f"{wheel.name} has no METADATA")
