"""The source distribution is complete: its tests run from the unpacked tree.

``python -m build`` makes the sdist and, from the sdist, the wheel (so the
sdist is known to build). The unpacked sdist must hold every tracked file
but the few listed in ``NOT_IN_SDIST``, and pytest run from it must collect
exactly the tests the checkout collects. The wheel must hold every tracked
file of the packages it installs (package data included) and its
top_level.txt must not claim ``twisted``.

Running the collected tests in a fresh venv from the unpacked sdist takes
minutes; that is ``.ci/sdist-check`` (docs/development.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow

# Tracked files the sdist leaves out on purpose, each with its reason.
NOT_IN_SDIST = {
    ".gitignore",  # git's own: means nothing in an unpacked tree
}
# What the wheel installs: these tracked paths (files under them) and nothing else.
WHEEL_ROOTS = ("tvmrpc/", "crossbuild/", "twisted/plugins/tvmrpc_plugins.py")
# Build by-products that must never be shipped.
JUNK = ("__pycache__/", ".pyc", "dropin.cache", ".pytest_cache/")


def tracked_files() -> set[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout (this tree is not one: an unpacked sdist?)")
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {line for line in out.splitlines() if (REPO_ROOT / line).is_file()}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from it, as ``python -m build`` makes them."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def unpacked(dist, tmp_path_factory) -> Path:
    (sdist,) = dist.glob("tvmrpc-*.tar.gz")
    into = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (top,) = into.iterdir()
    return top


def files_under(top: Path) -> set[str]:
    return {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()}


def test_sdist_holds_every_tracked_file(unpacked):
    shipped = files_under(unpacked)
    missing = sorted(tracked_files() - NOT_IN_SDIST - shipped)
    assert missing == [], "add them to MANIFEST.in (or to NOT_IN_SDIST with a reason)"
    assert [f for f in shipped if any(j in f for j in JUNK)] == []
    # What this test suite and CI need, named so a broken MANIFEST.in says what it lost.
    needed = ["tox.ini", "pytest.ini", "dev.sh", ".ci/run", ".ci/sdist-check", "LICENSE"]
    needed += ["pyproject.toml", "setup.py", "docs/development.md", "tvmrpc/harness/__init__.py"]
    # every test helper (what the tests import that is not a test file)
    helpers = [p for p in (REPO_ROOT / "tests").glob("*.py") if not p.name.startswith("test_")]
    needed += sorted(f"tests/{p.name}" for p in helpers)
    assert "tests/support.py" in needed
    needed += ["crossbuild/templates/install.sh", "tvmrpc/systemd/units/tvm-server@.service"]
    assert [f for f in needed if f not in shipped] == []


def collected(tree: Path) -> list[str]:
    """The test ids ``pytest --collect-only -m "not slow"`` finds from ``tree``."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sorted(line for line in result.stdout.splitlines() if "::" in line)


def test_sdist_collects_the_checkouts_tests(unpacked):
    from_checkout = collected(REPO_ROOT)
    from_sdist = collected(unpacked)
    print(f"\ncollected {len(from_checkout)} tests (not slow) in the checkout and the sdist")
    assert len(from_checkout) > 100
    assert from_sdist == from_checkout


def test_wheel_holds_the_packages_and_their_data(dist):
    (wheel,) = dist.glob("tvmrpc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (top_level,) = (n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["crossbuild", "tvmrpc"]
    installed = {n for n in names if ".dist-info/" not in n}
    expected = {f for f in tracked_files() if f.startswith(WHEEL_ROOTS)}
    assert sorted(expected - installed) == []  # package data: units, templates, toolchains
    assert sorted(installed - expected) == []  # and nothing else (no tests, no caches)
