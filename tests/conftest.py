"""Shared fixtures: a per-test log directory, the board secret, and no daemon left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tls_support import SECRET
from tvmrpc.harness import LIVE


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where daemons started by a test write their output."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """The board secret in a file readable by its owner only, as a lab keeps it."""
    path = tmp_path / "board.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def _stop_left_daemons() -> Iterator[None]:
    """Stop (process group and all) every daemon a test started and did not stop.

    Daemons started by wider-scoped fixtures exist before this runs, so they
    are left to their fixture; a test that forgot ``running()`` cannot leak
    into the next one.
    """
    before = set(LIVE)
    yield
    for proc in LIVE - before:
        proc.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Whatever a wider-scoped fixture left running goes at the end of the run."""
    for proc in list(LIVE):
        proc.stop()
