"""An emulated board for the demo and the tests: root filesystem, bundle, install, server.

The same journey a real board takes, on this machine: a Debian root
filesystem for the board (cached), the server bundle made by the project's
own ``python -m crossbuild bundle --from-wheel`` (its wheels cached), the
bundle unpacked on the board and installed offline by its ``install.sh``,
and ``tvm-server`` started from the installed launcher. See
:mod:`crossbuild.emulate` for how the board's programs run.

Invariants:
- Everything downloaded (root filesystem, wheels) is kept in ``cache_dir``
  under names keyed by its inputs; nothing else is written outside ``work``.
- The board runs the apache-tvm runtime of the host's apache-tvm version, so
  a host client and the board speak the same runtime.
- Every failure is a :class:`~crossbuild.errors.CrossbuildError` whose text
  is one line saying what failed and where its log is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import attrs

from crossbuild import emulate, rootfs
from crossbuild.errors import CrossbuildError

from ..harness import child_env

TRIPLE = "aarch64-linux-gnu"
PREFIX = "/opt/tvmrpc"  # where the bundle is installed, inside the board


def default_cache_dir() -> Path:
    """``$TVMRPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/tvmrpc``, else ``~/.cache/tvmrpc``."""
    if os.environ.get("TVMRPC_CACHE_DIR"):
        return Path(os.environ["TVMRPC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "tvmrpc"


def host_tvm_version() -> str:
    """The apache-tvm version installed here (the board gets the same runtime)."""
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        raise CrossbuildError("apache-tvm is not installed here: pip install apache-tvm") from None


def bundle_argv(
    spec: rootfs.RootfsSpec, output: Path, wheel_dir: Path, tvm_version: str
) -> list[str]:
    """``python -m crossbuild bundle`` for a board with ``spec``'s Python and glibc (pure)."""
    return [
        sys.executable, "-m", "crossbuild", "bundle", "--target", TRIPLE,
        "--python", "{}.{}".format(*spec.python), "--glibc", "{}.{}".format(*spec.glibc),
        "--from-wheel", "--tvm-version", tvm_version, "--wheel-dir", str(wheel_dir),
        "-o", str(output),
    ]  # fmt: skip


def _run(argv: Sequence[str], log: Path, what: str, timeout: float) -> str:
    """Run ``argv`` with its output appended to ``log``; its output, or a one-line error."""
    with open(log, "a", encoding="utf-8") as out:
        out.write("$ " + " ".join(argv) + "\n")
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=child_env(), timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CrossbuildError(f"{what} did not finish within {timeout:g} s; log: {log}") from None
    with open(log, "a", encoding="utf-8") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise CrossbuildError(f"{what} failed: {reason} (log: {log})")
    return done.stdout


def read_bundle(bundle: Path) -> tuple[str, dict]:
    """The top directory of a bundle made by ``crossbuild bundle`` and its ``manifest.json``."""
    try:
        with tarfile.open(bundle) as tar:
            member = next(
                (
                    m
                    for m in tar.getmembers()
                    if m.name.count("/") == 1 and m.name.endswith("/manifest.json")
                ),
                None,
            )
            stream = tar.extractfile(member) if member is not None else None
            if stream is None:
                raise CrossbuildError(f"{bundle} has no manifest.json: not a crossbuild bundle")
            assert member is not None
            return member.name.split("/")[0], json.loads(stream.read().decode("utf-8"))
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise CrossbuildError(f"cannot read {bundle} as a bundle: {exc}") from None


@attrs.define
class EmulatedBoard:
    """One board's journey; each method is one step and returns what it did in a line."""

    work: Path  # the board's root and the bundle go here
    cache_dir: Path = attrs.Factory(default_cache_dir)
    spec: rootfs.RootfsSpec = attrs.Factory(rootfs.RootfsSpec)
    timeout: float = 600.0  # for any one step
    board: emulate.Board | None = None
    bundle: Path | None = None

    @property
    def log(self) -> Path:
        return self.work / "board.log"

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def emulated(self) -> emulate.Emulated:
        return emulate.emulated(TRIPLE)

    def check(self) -> None:
        """EmulationUnavailable (one line) when this machine cannot emulate the board."""
        emulate.check_host(self.emulated)

    def make_root(self) -> str:
        """Unpack the board's root filesystem (built by mmdebstrap on a cache miss)."""
        self.work.mkdir(parents=True, exist_ok=True)
        tarball, built = rootfs.cached_rootfs(self.spec, self.cache_dir / "rootfs", self.log)
        if self.root.exists():
            shutil.rmtree(self.root)
        rootfs.unpack_rootfs(tarball, self.root)
        self.board, how = emulate.prepare(self.emulated, self.root)
        origin = "built with mmdebstrap into" if built else "from the cache"
        return (
            f"Debian {self.spec.suite} {self.spec.arch} in {self.root} ({origin} {tarball}); {how}"
        )

    def make_bundle(self, tvm_version: str | None = None) -> str:
        """``python -m crossbuild bundle`` for this board; its wheels come from the cache."""
        self.bundle = self.work / f"tvmrpc-server-{TRIPLE}.tar.gz"
        argv = bundle_argv(
            self.spec, self.bundle, self.cache_dir / "wheels", tvm_version or host_tvm_version()
        )
        _run(argv, self.log, "crossbuild bundle", self.timeout)
        return " ".join(["python", *argv[1:]])

    def use_bundle(self, bundle: Path) -> str:
        """Take a ready bundle instead of making one; the board gets the Debian suite whose
        Python the bundle is for. Call before :meth:`make_root`."""
        _top, manifest = read_bundle(bundle)
        if manifest.get("target") != TRIPLE:
            raise CrossbuildError(
                f"{bundle} is a bundle for {manifest.get('target')}, the board is {TRIPLE}"
            )
        python = rootfs.parse_python(str(manifest.get("python", "")))
        self.spec = dataclasses.replace(self.spec, suite=rootfs.suite_for_python(python))
        self.bundle = bundle
        return (
            f"{bundle}: for {TRIPLE}, Python {manifest['python']}: the board runs "
            f"Debian {self.spec.suite}"
        )

    def shell(self, script: str, what: str = "a command on the board") -> str:
        """Run ``script`` with the board's /bin/sh; its output (a one-line error if it fails)."""
        if self.board is None:
            raise CrossbuildError("make the root filesystem first")
        return _run(self.board.argv("/bin/sh", "-c", script), self.log, what, self.timeout)

    def install(self, mode: str = "plain", prefix: str = PREFIX) -> str:
        """Copy the bundle onto the board, unpack it there and run its ``install.sh``."""
        if self.board is None or self.bundle is None:
            raise CrossbuildError("make the root filesystem and the bundle first")
        if mode not in ("plain", "venv"):
            raise CrossbuildError(f"install mode is plain or venv, not {mode!r}")
        shutil.copy2(self.bundle, self.root / "tmp" / self.bundle.name)
        name = shlex.quote(self.bundle.name)
        top = shlex.quote(read_bundle(self.bundle)[0])
        script = (
            f"cd /tmp && rm -rf {top} && tar xzf {name} && "
            f"{top}/install.sh --{mode} --prefix {shlex.quote(prefix)}"
        )
        out = self.shell(script, f"install.sh --{mode} on the board")
        return next(
            (line for line in out.splitlines() if line.startswith("installed")),
            out.strip().splitlines()[0] if out.strip() else "installed",
        )

    def server_argv(self, *flags: str, prefix: str = PREFIX) -> list[str]:
        """The installed ``tvm-server`` with ``flags``, run on the board."""
        if self.board is None:
            raise CrossbuildError("make the root filesystem first")
        return self.board.argv(f"{prefix}/bin/tvm-server", *flags)

    def processes(self) -> list[int]:
        """Pids of the processes running on the board now."""
        return emulate.processes_in(self.root)

    def remove(self) -> None:
        """Delete the board's root (only once no process runs there)."""
        if self.root.exists() and not self.processes():
            shutil.rmtree(self.root)
