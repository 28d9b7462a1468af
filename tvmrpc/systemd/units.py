"""The shipped unit files and ``tvmrpc systemd-units --prefix P --out DIR``.

The units live in ``tvmrpc/systemd/units/`` as package data with ``@PREFIX@``
where the install prefix goes (the virtualenv, or the bundle's directory);
every ExecStart is ``@PREFIX@/bin/tvm-<daemon> FLAGS``. The command writes
them for one prefix, copies the example environment files into
``--env-dir`` (never over an existing one) and refreshes Twisted's plugin
cache, so a daemon started later as an unprivileged user finds a current
``dropin.cache`` instead of warning that it cannot write one.

Invariants:
- :func:`render` is pure; :func:`shipped` lists exactly the files in ``units/``.
- Only ``*.service``/``*.socket`` files go to ``--out``; ``*.env`` files only
  to ``--env-dir``, and an existing environment file is left untouched.
- The prefix must be absolute and contain no whitespace (systemd would
  split the command line there).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

UNIT_SUFFIXES = (".service", ".socket")
ENV_EXAMPLES = {
    "tracker.env": "tracker.env",
    "proxy.env": "proxy.env",
    "tvm-server.env": "KEY.env.example",
}


class UnitsError(Exception):
    """Bad arguments to ``systemd-units`` (one line for the operator)."""


def shipped() -> dict[str, str]:
    """File name → text of every file in ``tvmrpc/systemd/units/``."""
    folder = resources.files("tvmrpc.systemd").joinpath("units")
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.is_file()
    }


def unit_names() -> list[str]:
    return [name for name in shipped() if name.endswith(UNIT_SUFFIXES)]


def check_prefix(prefix: str) -> str:
    """``prefix`` without a trailing slash; raise :class:`UnitsError` if unusable."""
    if not prefix.startswith("/"):
        raise UnitsError(f"--prefix must be an absolute path, got {prefix!r}")
    if any(c.isspace() for c in prefix) or "%" in prefix or "$" in prefix:
        raise UnitsError(f"--prefix must not contain spaces, % or $: {prefix!r}")
    return prefix.rstrip("/") or "/"


def render(text: str, prefix: str) -> str:
    """A unit's text for ``prefix`` (pure)."""
    return text.replace("@PREFIX@", check_prefix(prefix))


def write_units(prefix: str, out: Path) -> list[Path]:
    """Write every unit for ``prefix`` into ``out``; return the paths written."""
    prefix = check_prefix(prefix)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in shipped().items():
        if name.endswith(UNIT_SUFFIXES):
            path = out / name
            path.write_text(render(text, prefix), encoding="utf-8")
            path.chmod(0o644)
            written.append(path)
    return written


def write_env_examples(env_dir: Path) -> list[Path]:
    """Copy the example environment files into ``env_dir`` unless present."""
    env_dir.mkdir(parents=True, exist_ok=True)
    files = shipped()
    written = []
    for source, target in ENV_EXAMPLES.items():
        path = env_dir / target
        if not path.exists():
            path.write_text(files[source], encoding="utf-8")
            path.chmod(0o644)
            written.append(path)
    return written


def refresh_plugin_cache() -> list[str]:
    """Rewrite Twisted's ``dropin.cache`` files; return the problems (empty: all written).

    Run at install time by the owner of the installation (root): a daemon
    running as a dynamic user cannot write the cache after an upgrade, and
    Twisted then logs "Unable to write to plugin cache" at every start.
    """
    # Twisted is imported here, not at module level: `tvmrpc --help` loads this module.
    from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
    from twisted.plugin import IPlugin, getPlugins
    from zope.interface import implementer

    @implementer(ILogObserver)
    class CacheProblems:
        """Keeps the text of plugin-cache warnings and errors."""

        def __init__(self) -> None:
            self.problems: list[str] = []

        def __call__(self, event: LogEvent) -> None:
            text = formatEvent(event)
            if "plugin cache" in text or event.get("isError") or event.get("log_failure"):
                self.problems.append(text)

    watch = CacheProblems()
    globalLogPublisher.addObserver(watch)
    try:
        list(getPlugins(IPlugin))
    finally:
        globalLogPublisher.removeObserver(watch)
    return watch.problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write tvmrpc's systemd units for an install prefix and refresh Twisted's "
        "plugin cache (run as root at install and after every upgrade)."
    )
    parser.add_argument(
        "--prefix",
        default=sys.prefix,
        help="install prefix whose bin/ holds tvm-tracker, tvm-proxy, tvm-server "
        "[default: this Python's, %(default)s]",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="directory for the units (/etc/systemd/system)"
    )
    parser.add_argument(
        "--env-dir", type=Path, help="also copy example environment files here (/etc/tvmrpc)"
    )
    parser.add_argument(
        "--no-plugin-cache", action="store_true", help="do not refresh Twisted's plugin cache"
    )


def run(args: argparse.Namespace) -> int:
    try:
        prefix = check_prefix(args.prefix)
    except UnitsError as exc:
        print(f"tvmrpc systemd-units: {exc}", file=sys.stderr)
        return 2
    missing = [
        f"{prefix}/bin/{cmd}"
        for cmd in ("tvm-tracker", "tvm-proxy", "tvm-server")
        if not Path(prefix, "bin", cmd).exists()
    ]
    try:
        written = write_units(prefix, args.out)
        if args.env_dir is not None:
            written += write_env_examples(args.env_dir)
    except OSError as exc:
        print(f"tvmrpc systemd-units: cannot write: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if missing:
        print(
            f"warning: {', '.join(missing)} missing: install tvmrpc into {prefix} "
            "(pip install tvmrpc) before starting the units",
            file=sys.stderr,
        )
    if not args.no_plugin_cache:
        problems = refresh_plugin_cache()
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        if problems:
            print(
                "warning: Twisted's plugin cache is not current; run this command as the "
                "owner of the installation (root) or daemons will warn at every start",
                file=sys.stderr,
            )
        else:
            print("refreshed Twisted's plugin cache")
    print("next: systemctl daemon-reload; see docs/operations.md")
    return 0
