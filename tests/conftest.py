"""Shared fixtures: a per-test log directory that survives failures for reading."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tls_support import SECRET


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
