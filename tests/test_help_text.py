"""Every console help text is plain text: no reST markup from the docstrings it came from.

Module docstrings here use reST (``literal``, :mod:`x`); a help text built
from one printed ``tvmrpc`` to the operator. Each entry point's help is
rendered in-process (argparse's format_help, usage.Options' str) and, for
the ``tvmrpc`` console script, the way an operator sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, subprocess_env

# Double backticks, interpreted-text roles (:mod:`x`) and any other backquote.
MARKUP = re.compile(r"``|:[a-z]+:`|`")


def rendered(run) -> str:
    """What ``run()`` prints for --help (argparse exits 0 after printing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        run()
    assert exited.value.code == 0
    return out.getvalue()


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [p for action in actions for p in action.choices.values()]


def help_texts() -> dict[str, str]:
    from crossbuild.__main__ import build_parser
    from tvmrpc import cli
    from tvmrpc.demo import session

    texts = {"tvmrpc": rendered(lambda: cli.main(["--help"]))}
    for name in cli.SUBCOMMANDS:
        texts[f"tvmrpc {name}"] = rendered(lambda name=name: cli.main([name, "--help"]))
    crossbuild = build_parser()
    texts["tvmrpc-crossbuild"] = crossbuild.format_help()
    for parser in subparsers(crossbuild):
        texts[parser.prog] = parser.format_help()
    texts["tvmrpc.demo.session"] = rendered(lambda: session.main(["--help"]))
    for daemon in ("tracker", "proxy", "server"):
        options = importlib.import_module(f"tvmrpc.{daemon}.service").Options()
        texts[f"twistd tvm-{daemon}"] = str(options)
    from bench.__main__ import main as bench_main

    overview = io.StringIO()
    with contextlib.redirect_stdout(overview):
        assert bench_main(["--help"]) == 0
    texts["python -m bench"] = overview.getvalue()
    for bench in ("tracker", "scale", "server", "proxy"):
        module = importlib.import_module(f"bench.{bench}")
        texts[f"bench {bench}"] = rendered(lambda module=module: module.main(["--help"]))
    return texts


def test_help_texts_have_no_rest_markup():
    texts = help_texts()
    assert len(texts) >= 15  # every entry point above was rendered
    marked = {name: MARKUP.findall(text) for name, text in texts.items() if MARKUP.search(text)}
    assert marked == {}


def test_tvmrpc_console_help_is_plain():
    """``tvmrpc --help`` as the operator runs it (it printed ``tvmrpc`` from the docstring)."""
    result = subprocess.run(
        [sys.executable, "-m", "tvmrpc.cli", "--help"],
        env=subprocess_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "twistd -n tvm-tracker" in result.stdout
    assert "`" not in result.stdout
