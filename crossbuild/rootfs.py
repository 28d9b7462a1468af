"""A minimal Debian root filesystem for an emulated board, built with mmdebstrap and cached.

``mmdebstrap --variant=extract`` unpacks an explicit package list (Python,
libstdc++ for the TVM runtime, a shell and the tools ``install.sh`` uses)
without running any of the board's maintainer scripts, so building it needs
no emulation; hooks add what those scripts would have made (``/etc/passwd``,
``/etc/group``, the merged-/usr links ``/bin``, ``/sbin``, ``/lib`` where the
suite has no such directories, ``/proc`` and ``/opt``). The result is a tar file.

Invariants:
- :meth:`RootfsSpec.key` changes whenever an input of the build changes
  (suite, architecture, packages, mirror, this module's recipe version), so a
  cached tarball is only ever reused for the same inputs.
- A cached tarball appears under its final name only once complete (written
  as ``.part``, then renamed); an interrupted build leaves nothing reusable.
- Building a tarball removes the cached ones of the same suite and
  architecture made from other inputs (one per suite and architecture stays).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from crossbuild.errors import CrossbuildError

RECIPE = 2  # bump when the hooks or the build change
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Enough for install.sh (sh, coreutils, sed, tar, gzip) and the server (python3,
#: libstdc++6 for libtvm_runtime.so); python3-venv for install.sh --venv.
PACKAGES = ("dash", "coreutils", "sed", "tar", "gzip", "python3", "python3-venv", "libstdc++6")
#: What each suite's board has: its Python and glibc (``bundle --python/--glibc``).
SUITES = {"bookworm": ((3, 11), (2, 36)), "trixie": ((3, 13), (2, 41))}

_HOOKS = (
    # merged /usr (trixie on): base-files' scripts would make these links; extract runs none.
    'for d in bin sbin lib; do [ -e "$1/$d" ] || ln -s "usr/$d" "$1/$d"; done',
    'printf "root:x:0:0:root:/root:/bin/sh\\nnobody:x:65534:65534:nobody:/nonexistent:'
    '/usr/sbin/nologin\\n" > "$1/etc/passwd"',
    'printf "root:x:0:\\nnogroup:x:65534:\\n" > "$1/etc/group"',
    'mkdir -p "$1/proc" "$1/opt" "$1/root" "$1/tmp" && chmod 1777 "$1/tmp"',
)


@dataclass(frozen=True)
class RootfsSpec:
    """The inputs of one root filesystem."""

    arch: str = "arm64"  # Debian architecture
    suite: str = "bookworm"
    packages: tuple[str, ...] = PACKAGES
    mirror: str = DEFAULT_MIRROR

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise CrossbuildError(f"unknown suite {self.suite!r}; known: {', '.join(SUITES)}")

    @property
    def python(self) -> tuple[int, int]:
        return SUITES[self.suite][0]

    @property
    def glibc(self) -> tuple[int, int]:
        return SUITES[self.suite][1]

    def key(self) -> str:
        """A file name that identifies these inputs (pure)."""
        inputs = json.dumps({"recipe": RECIPE, **asdict(self)}, sort_keys=True)
        digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
        return f"debian-{self.suite}-{self.arch}-{digest}.tar"


def mmdebstrap_argv(spec: RootfsSpec, output: Path) -> list[str]:
    """The mmdebstrap command that writes ``spec``'s root filesystem to ``output`` (pure)."""
    argv = [
        "mmdebstrap",
        f"--arch={spec.arch}",
        "--variant=extract",
        "--format=tar",
        "--include=" + ",".join(spec.packages),
    ]
    argv += [f"--extract-hook={hook}" for hook in _HOOKS]  # the only hooks extract runs
    return [*argv, spec.suite, str(output), spec.mirror]


def build_rootfs(spec: RootfsSpec, output: Path, log: Path) -> Path:
    """Run mmdebstrap (output to ``log``); the tarball at ``output``, complete or absent."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    with open(log, "a", encoding="utf-8") as out:
        argv = mmdebstrap_argv(spec, partial)
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        ).returncode
    if code != 0:
        partial.unlink(missing_ok=True)
        raise CrossbuildError(f"mmdebstrap failed (exit {code}); log: {log}")
    partial.replace(output)
    return output


def cached_rootfs(spec: RootfsSpec, cache_dir: Path, log: Path) -> tuple[Path, bool]:
    """``spec``'s tarball from ``cache_dir``, built there first if absent; (path, built)."""
    path = cache_dir / spec.key()
    if path.is_file():
        return path, False
    build_rootfs(spec, path, log)
    # Same suite and architecture, older inputs: superseded, not worth 100 MB each.
    for old in cache_dir.glob(f"debian-{spec.suite}-{spec.arch}-*.tar"):
        if old != path:
            old.unlink(missing_ok=True)
    return path, True


def parse_python(text: str) -> tuple[int, int]:
    """``"3.11"`` -> ``(3, 11)``; a one-line error otherwise (pure)."""
    major, _, minor = text.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise CrossbuildError(f"not a Python version: {text!r}")
    return int(major), int(minor)


def suite_for_python(python: tuple[int, int]) -> str:
    """The suite whose python3 is ``python``; a one-line error lists what there is (pure)."""
    for suite, (version, _glibc) in SUITES.items():
        if version == python:
            return suite
    have = ", ".join(f"{s} {v[0]}.{v[1]}" for s, (v, _g) in SUITES.items())
    raise CrossbuildError(
        f"no emulated board has Python {python[0]}.{python[1]}; there are: {have}"
    )


def unpack_rootfs(tarball: Path, dest: Path) -> Path:
    """Extract ``tarball`` into the new directory ``dest`` (owners and modes kept)."""
    dest.mkdir(parents=True)
    argv = ["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(dest)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CrossbuildError(f"cannot unpack {tarball}: {done.stderr.strip()}")
    return dest
