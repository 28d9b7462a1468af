"""The command line: entry points and one-line errors that need no network or compiler."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossbuild.__main__ import main
from crossbuild.errors import CrossbuildError
from crossbuild.targets import get_target
from crossbuild.toolchain import shipped_toolchain_path
from tests.support import REPO_ROOT


def error_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    _out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_module_entry_point_writes_the_shipped_toolchain(tmp_path):
    out = tmp_path / "a64.cmake"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "crossbuild",
            "toolchain",
            "--target",
            "aarch64-linux-gnu",
            "-o",
            str(out),
        ],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    assert out.read_text() == shipped_toolchain_path(get_target("aarch64-linux-gnu")).read_text()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["runtime", "--target", "aarch64-linux-gnu", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_from_wheel_errors(capsys):
    argv = ["runtime", "--from-wheel", "--target", "aarch64-linux-gnu"]
    assert error_of(capsys, *argv).endswith(
        "--from-wheel needs --tvm-version, e.g. --tvm-version 0.22.0"
    )
    assert error_of(capsys, *argv, "--tvm-version", "1", "--set", "USE_X=1").endswith(
        "--from-wheel takes no --tvm-source or --set"
    )
    assert "--glibc wants MAJOR.MINOR" in error_of(
        capsys, *argv, "--tvm-version", "1", "--glibc", "2"
    )


def test_bundle_output_name_checked_first(capsys, tmp_path):
    line = error_of(
        capsys,
        *("bundle", "--target", "aarch64-linux-gnu", "--from-wheel", "--tvm-version", "0"),
        *("-o", str(tmp_path / "server.zip")),
    )
    assert line.endswith("-o wants a .tar.gz file name, got server.zip")


def test_bundle_rejects_a_runtime_for_another_machine(capsys, tmp_path):
    import tvm

    host_runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    shutil.copy2(host_runtime, tmp_path / "libtvm_runtime.so")
    line = error_of(
        capsys,
        *("bundle", "--target", "aarch64-linux-gnu", "--runtime", str(tmp_path)),
        *("-o", str(tmp_path / "out.tar.gz")),
    )
    assert line.endswith(f"{tmp_path}/libtvm_runtime.so is for x86-64, the target is AArch64")
    assert not (tmp_path / "out.tar.gz").exists()
    line = error_of(
        capsys,
        *("bundle", "--target", "aarch64-linux-gnu", "--runtime", str(tmp_path / "nowhere")),
        *("-o", str(tmp_path / "out.tar.gz")),
    )
    assert line.endswith("is not a directory")


def test_tvm_ffi_requirement_choice():
    from crossbuild.__main__ import _tvm_ffi_requirement as choose

    assert choose("0.1.9", "apache-tvm-ffi>=0.1.14", "0.1.15") == "apache-tvm-ffi==0.1.9"
    assert choose(None, "apache-tvm-ffi>=0.1.14", "0.1.15") == "apache-tvm-ffi>=0.1.14,==0.1.15"
    assert choose(None, None, "0.1.15") == "apache-tvm-ffi==0.1.15"
    assert choose(None, "apache-tvm-ffi>=0.1.14", None) == "apache-tvm-ffi>=0.1.14"
    assert choose(None, "apache-tvm-ffi>=0.1.14", "0.1.15.post2") == (
        "apache-tvm-ffi>=0.1.14,==0.1.15.post2"
    )
    assert choose(None, "apache-tvm-ffi", "0.1.15") == "apache-tvm-ffi==0.1.15"
    with pytest.raises(
        CrossbuildError,
        match=r"^apache-tvm needs apache-tvm-ffi>=0\.1\.14 but this host has apache-tvm-ffi "
        r"0\.1\.9: pass --tvm-ffi-version$",
    ):
        choose(None, "apache-tvm-ffi>=0.1.14", "0.1.9")
    with pytest.raises(CrossbuildError, match="pass --tvm-ffi-version"):
        choose(None, None, None)


def test_bundle_finds_the_runtime_in_a_build_dirs_lib(capsys, tmp_path):
    """Current TVM build directories keep libtvm_runtime.so in lib/."""
    import tvm

    (tmp_path / "lib").mkdir()
    host_runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    shutil.copy2(host_runtime, tmp_path / "lib" / "libtvm_runtime.so")
    line = error_of(
        capsys,
        *("bundle", "--target", "aarch64-linux-gnu", "--runtime", str(tmp_path)),
        *("-o", str(tmp_path / "out.tar.gz")),
    )
    assert line.endswith(f"{tmp_path}/lib/libtvm_runtime.so is for x86-64, the target is AArch64")


def test_without_packaging_one_line_says_what_to_install(tmp_path):
    """crossbuild is host-side: without its extra it says what to install, no traceback."""
    result = subprocess.run(
        # -S: no site-packages, so neither packaging nor pyelftools is importable.
        [sys.executable, "-S", "-m", "crossbuild", "toolchain", "--target", "aarch64-linux-gnu"],
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        1,
        "tvmrpc-crossbuild: error: packaging is needed: pip install 'tvmrpc[crossbuild]'\n",
    )
