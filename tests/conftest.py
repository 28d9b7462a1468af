"""Shared fixtures: a per-test log directory that survives failures for reading."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where daemons started by a test write their output."""
    path = tmp_path / "logs"
    path.mkdir()
    return path
