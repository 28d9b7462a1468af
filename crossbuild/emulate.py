"""An emulated board: the board's root filesystem in a chroot, its programs run by qemu-user.

The kernel hands the board's ELF files to ``qemu-<arch>-static`` through
binfmt_misc, registered with the line Debian's ``qemu-user-static`` ships in
``/usr/lib/binfmt.d/qemu-<arch>.conf`` plus the F flag (the kernel opens the
interpreter at registration, so it runs inside a chroot that has no qemu).
Debian's package registers nothing without a running systemd, so this module
registers it, in one of two ways:

- ``private`` (preferred, Linux 6.7 and later): a binfmt_misc instance of its
  own, mounted inside a new user and mount namespace (``unshare --user
  --map-root-user --mount``). The host's table is never touched and the
  registration ends with the board's last process.
- ``host``: the host's binfmt_misc at ``/proc/sys/fs/binfmt_misc`` (mounted
  if needed), registered once and left registered, as systemd-binfmt would.

Invariants:
- :func:`check_host` fails with one line that says what to do: run as root,
  ``modprobe binfmt_misc``, or the exact ``apt-get install`` line for what
  is missing.
- :meth:`Board.argv` runs the command inside the root with the pid of the
  process started (``exec`` all the way down), so a signal sent to that pid
  reaches the board's program itself; no PID namespace (twistd as PID 1
  under qemu hangs on SIGTERM).
- Mounts a board makes (its binfmt_misc, ``/proc`` in the root) live in its
  own mount namespace and vanish with it; nothing is mounted on the host
  except, in ``host`` mode only, binfmt_misc itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crossbuild.errors import CrossbuildError
from crossbuild.targets import Target, get_target

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF_DIR = Path("/usr/lib/binfmt.d")


class EmulationUnavailable(CrossbuildError):  # noqa: N818 - a reason, said in one line
    """This machine cannot run the board's programs; ``str()`` says what to do."""


class MissingPackages(EmulationUnavailable):
    """Only Debian packages are missing (``packages``); the message has the apt-get line."""

    def __init__(self, message: str, packages: Sequence[str]) -> None:
        super().__init__(message)
        self.packages = list(packages)


@dataclass(frozen=True)
class Emulated:
    """What emulating one target takes: Debian's and qemu's names for its architecture."""

    target: Target
    debian_arch: str  # dpkg architecture, e.g. "arm64"
    qemu_arch: str  # qemu-<arch>-static, binfmt.d/qemu-<arch>.conf

    @property
    def qemu(self) -> str:
        return f"qemu-{self.qemu_arch}-static"

    @property
    def binfmt_conf(self) -> Path:
        return BINFMT_CONF_DIR / f"qemu-{self.qemu_arch}.conf"


EMULATED = {"aarch64-linux-gnu": ("arm64", "aarch64")}


def emulated(triple: str) -> Emulated:
    """The emulation facts for ``triple``; a one-line error for targets we cannot emulate."""
    if triple not in EMULATED:
        raise CrossbuildError(
            f"no emulated board for {triple}; emulated targets: {', '.join(EMULATED)}"
        )
    debian_arch, qemu_arch = EMULATED[triple]
    return Emulated(get_target(triple), debian_arch, qemu_arch)


# --- pure ------------------------------------------------------------------------


def registration_line(conf_text: str) -> str:
    """The binfmt_misc ``register`` line in a binfmt.d file, with the F flag added (pure).

    Format ``:name:type:offset:magic:mask:interpreter:flags``.
    """
    for line in conf_text.splitlines():
        line = line.strip()
        if line.startswith(":"):
            fields = line.split(":")
            if len(fields) != 8 or not fields[1] or not fields[6]:
                raise CrossbuildError(f"not a binfmt_misc registration: {line[:60]}")
            if "F" not in fields[7]:
                fields[7] += "F"
            return ":".join(fields)
    raise CrossbuildError("no binfmt_misc registration line (':name:type:...') in the file")


def entry_name(line: str) -> str:
    """The handler's name in a registration line, e.g. ``qemu-aarch64``."""
    return line.split(":")[1]


def entry_flags(status: str) -> str:
    """The ``flags:`` of a ``/proc/sys/fs/binfmt_misc/<name>`` file (pure)."""
    for line in status.splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


def apt_line(packages: Sequence[str]) -> str:
    """The command that installs ``packages`` on Debian/Ubuntu."""
    return "apt-get install -y " + " ".join(packages)


def missing_packages(
    board: Emulated,
    compiler: bool = True,
    which: Callable[[str], str | None] = shutil.which,
    exists: Callable[[Path], bool] = Path.exists,
) -> list[str]:
    """Debian packages whose commands or files an emulated board needs and lack here."""
    needs = [
        (board.qemu, "qemu-user-static"),
        ("mmdebstrap", "mmdebstrap"),
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
    ]
    if compiler:
        needs.append((f"{board.target.triple}-g++", board.target.debian_package))
    packages = [pkg for tool, pkg in needs if which(tool) is None]
    if not exists(board.binfmt_conf) and "qemu-user-static" not in packages:
        packages.insert(0, "qemu-user-static")
    return packages


# --- the host --------------------------------------------------------------------


def kernel_has_binfmt_misc(filesystems: Path = Path("/proc/filesystems")) -> bool:
    try:
        return any(
            line.split()[-1] == "binfmt_misc"
            for line in filesystems.read_text().splitlines()
            if line.strip()
        )
    except OSError:
        return False


def check_host(board: Emulated, compiler: bool = True) -> None:
    """EmulationUnavailable (one line) unless this machine can build and run the board."""
    if os.geteuid() != 0:
        raise EmulationUnavailable(
            "an emulated board needs root (mmdebstrap, chroot, binfmt_misc): run it as root"
        )
    packages = missing_packages(board, compiler)
    if packages:
        raise MissingPackages(
            f"an emulated {board.target.triple} board needs {', '.join(packages)}: "
            f"{apt_line(packages)}",
            packages,
        )
    if not kernel_has_binfmt_misc() and not BINFMT_DIR.joinpath("register").exists():
        raise EmulationUnavailable(
            "the kernel has no binfmt_misc (needed to run the board's programs): "
            "modprobe binfmt_misc"
        )


def private_binfmt_works() -> bool:
    """Whether a binfmt_misc of its own can be mounted in a new user namespace here."""
    argv = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "mount",
        "-t",
        "binfmt_misc",
        "binfmt_misc",
        str(BINFMT_DIR),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def register_on_host(line: str) -> str:
    """Register ``line`` in the host's binfmt_misc (mounting it if needed); say what was done."""
    if not BINFMT_DIR.joinpath("register").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise EmulationUnavailable(
                f"cannot mount binfmt_misc on {BINFMT_DIR}: {done.stderr.strip()}"
            )
    entry = BINFMT_DIR / entry_name(line)
    if entry.exists():
        status = entry.read_text()
        if "F" not in entry_flags(status):
            raise EmulationUnavailable(
                f"{entry} is registered without the F flag, so it cannot work in a chroot: "
                f"echo -1 > {entry} and run again"
            )
        if not status.startswith("enabled"):
            raise EmulationUnavailable(f"{entry} is disabled: echo 1 > {entry}")
        return f"{entry_name(line)} already registered in {BINFMT_DIR}"
    (BINFMT_DIR / "register").write_text(line)
    return f"registered {entry_name(line)} in {BINFMT_DIR} (stays until reboot)"


# The board's launcher, run by the host's /bin/sh with "$1" the registration line
# ("" when registered on the host), "$2" the root and the rest the command.
_LAUNCH = r"""set -e
if [ -n "$1" ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  printf '%s' "$1" > /proc/sys/fs/binfmt_misc/register
fi
root=$2; shift 2
[ -d "$root/proc" ] && mount --rbind /proc "$root/proc"
exec chroot "$root" "$@"
"""


@dataclass(frozen=True)
class Board:
    """A root filesystem for ``emulated`` and how its programs are run (``private``/``host``)."""

    emulated: Emulated
    root: Path
    mode: str  # "private" or "host"
    registration: str  # the binfmt_misc line, F flag included

    def argv(self, *command: str) -> list[str]:
        """``command`` (a path inside the root, and its arguments) run on the board."""
        if self.mode == "private":
            head = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
            line = self.registration
        else:
            head = ["unshare", "--mount", "--propagation", "private"]
            line = ""
        return [*head, "--", "/bin/sh", "-c", _LAUNCH, "board", line, str(self.root), *command]


def prepare(emulated_board: Emulated, root: Path) -> tuple[Board, str]:
    """A :class:`Board` for ``root``, binfmt_misc made ready; also a line saying how.

    Call :func:`check_host` first for the one-line reasons this can fail.
    """
    try:
        line = registration_line(emulated_board.binfmt_conf.read_text())
    except OSError as exc:
        raise EmulationUnavailable(
            f"cannot read {emulated_board.binfmt_conf} ({exc.strerror}): "
            f"{apt_line(['qemu-user-static'])}"
        ) from None
    if private_binfmt_works():
        how = f"{entry_name(line)} registered in a private binfmt_misc (host's table untouched)"
        return Board(emulated_board, root, "private", line), how
    return Board(emulated_board, root, "host", line), register_on_host(line)


def processes_in(root: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the processes whose root directory is ``root`` (the board's processes)."""
    want = os.path.realpath(root)
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == want:
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return sorted(pids)
