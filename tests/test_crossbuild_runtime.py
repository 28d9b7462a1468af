"""``runtime`` against a minimal TVM-shaped tree (and a real one when TVM_SOURCE_DIR is set).

The tree made here has what the command relies on: ``cmake/config.cmake``
and a CMakeLists that reads ``<build>/config.cmake`` and has a ``runtime``
target building ``libtvm_runtime.so``. It writes the option values it saw, so
the test checks what CMake got, not only what the file says.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from crossbuild.__main__ import main
from crossbuild.elf import elf_info

HAVE_AARCH64 = shutil.which("aarch64-linux-gnu-g++") is not None
needs_aarch64 = pytest.mark.skipif(
    not HAVE_AARCH64, reason="no aarch64-linux-gnu-g++ (apt install g++-aarch64-linux-gnu)"
)

CONFIG = """\
# TVM-shaped config.cmake for tests
set(USE_CUDA OFF)
set(USE_OPENCL OFF)
set(USE_LLVM ON)
set(USE_LIBBACKTRACE AUTO)
set(USE_MICRO ON)
"""

CMAKELISTS = """\
cmake_minimum_required(VERSION 3.18)
project(tvm C CXX)
if(EXISTS ${CMAKE_CURRENT_BINARY_DIR}/config.cmake)
  include(${CMAKE_CURRENT_BINARY_DIR}/config.cmake)
endif()
file(WRITE ${CMAKE_BINARY_DIR}/seen.txt
  "USE_LLVM=${USE_LLVM}\\nUSE_LIBBACKTRACE=${USE_LIBBACKTRACE}\\nUSE_MICRO=${USE_MICRO}\\n"
  "USE_OPENCL=${USE_OPENCL}\\nUSE_CUDA=${USE_CUDA}\\n")
add_library(tvm_runtime SHARED src/runtime.cc)
add_custom_target(runtime DEPENDS tvm_runtime)
"""


def make_tree(root: Path, source: str = 'extern "C" int tvm_probe() { return 42; }\n') -> Path:
    (root / "cmake").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "cmake" / "config.cmake").write_text(CONFIG)
    (root / "CMakeLists.txt").write_text(CMAKELISTS)
    (root / "src" / "runtime.cc").write_text(source)
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["runtime", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@needs_aarch64
def test_builds_runtime_with_edits_and_sets(tmp_path, capsys):
    tree = make_tree(tmp_path / "tvm")
    build = tmp_path / "build"
    code, out, err = run(
        capsys,
        *("--tvm-source", str(tree), "--target", "aarch64-linux-gnu", "--build-dir", str(build)),
        *("--set", "USE_OPENCL=ON", "-j", "2"),
    )
    assert code == 0, err
    seen = dict(line.split("=", 1) for line in (build / "seen.txt").read_text().splitlines())
    assert seen == {
        "USE_LLVM": "OFF",
        "USE_LIBBACKTRACE": "OFF",
        "USE_MICRO": "OFF",
        "USE_OPENCL": "ON",
        "USE_CUDA": "OFF",
    }
    assert "config.cmake: USE_LLVM ON -> OFF" in out
    assert "config.cmake: USE_OPENCL OFF -> ON" in out
    library = build / "libtvm_runtime.so"
    assert f"{library}  AArch64" in out.splitlines()
    assert elf_info(library).machine == "EM_AARCH64"
    # The tree's own config.cmake is untouched; the build directory has the edited copy.
    assert (tree / "cmake" / "config.cmake").read_text() == CONFIG
    assert "set(USE_OPENCL ON)" in (build / "config.cmake").read_text()


def test_not_a_tvm_tree(tmp_path, capsys):
    code, _, err = run(capsys, "--tvm-source", str(tmp_path), "--target", "aarch64-linux-gnu")
    assert code == 1
    assert one_line_error(err).endswith(
        f"{tmp_path} is not a TVM source tree (no cmake/config.cmake and CMakeLists.txt)"
    )


def test_unknown_option_names_the_close_one(tmp_path, capsys):
    tree = make_tree(tmp_path / "tvm")
    argv = ["--tvm-source", str(tree), "--target", "aarch64-linux-gnu"]
    code, _, err = run(capsys, *argv, "--set", "USE_OPENCLL=ON")
    assert code == 1
    assert one_line_error(err).endswith(
        "config.cmake has no option USE_OPENCLL (did you mean USE_OPENCL?)"
    )
    code, _, err = run(capsys, *argv, "--set", "USE_OPENCL")
    assert code == 1
    assert "--set wants NAME=VALUE" in one_line_error(err)
    assert not (tree / "build-aarch64-linux-gnu").exists()  # nothing built on a bad option


def test_missing_compiler(tmp_path, capsys):
    tree = make_tree(tmp_path / "tvm")
    root = tmp_path / "no-toolchain"
    code, _, err = run(
        capsys, "--tvm-source", str(tree), "--target", "aarch64-linux-gnu", "--root", str(root)
    )
    assert code == 1
    assert one_line_error(err).endswith(
        f"compiler {root}/bin/aarch64-linux-gnu-gcc not found: check --root"
    )


def test_unknown_target_and_missing_source(tmp_path, capsys):
    code, _, err = run(capsys, "--tvm-source", str(tmp_path), "--target", "mips-linux-gnu")
    assert code == 1
    assert "unknown target 'mips-linux-gnu'" in one_line_error(err)
    code, _, err = run(capsys, "--target", "aarch64-linux-gnu")
    assert code == 1
    assert one_line_error(err).endswith("runtime needs --tvm-source DIR (or --from-wheel)")


@needs_aarch64
def test_build_failure_points_at_the_log(tmp_path, capsys):
    tree = make_tree(tmp_path / "tvm", source="this is not C++;\n")
    build = tmp_path / "build"
    code, _, err = run(
        capsys,
        *("--tvm-source", str(tree), "--target", "aarch64-linux-gnu", "--build-dir", str(build)),
    )
    assert code == 1
    line = one_line_error(err)
    log = build / "crossbuild.log"
    assert "cmake build of target runtime failed" in line
    assert line.endswith(f"log: {log}")
    assert "runtime.cc" in log.read_text()


@pytest.mark.slow
@needs_aarch64
@pytest.mark.skipif(
    not os.environ.get("TVM_SOURCE_DIR"), reason="set TVM_SOURCE_DIR to a TVM checkout"
)
def test_real_tvm_tree(tmp_path, capsys):
    code, out, err = run(
        capsys,
        *("--tvm-source", os.environ["TVM_SOURCE_DIR"], "--target", "aarch64-linux-gnu"),
        *("--build-dir", str(tmp_path / "build"), "-j", "2"),
    )
    assert code == 0, err
    libraries = [line for line in out.splitlines() if "libtvm_runtime" in line]
    assert libraries
    assert all(line.endswith("  AArch64") for line in libraries)


def make_linaro_root(root: Path) -> Path:
    """A vendor toolchain in the Linaro layout, made of Debian's cross compiler.

    ``<root>/bin/aarch64-linux-gnu-g++`` and the sysroot
    ``<root>/aarch64-linux-gnu/libc`` (links into ``/usr/aarch64-linux-gnu``).
    """
    triple = "aarch64-linux-gnu"
    (root / "bin").mkdir(parents=True)
    for tool in ("gcc", "g++"):
        (root / "bin" / f"{triple}-{tool}").symlink_to(shutil.which(f"{triple}-{tool}"))
    libc = root / triple / "libc"
    (libc / "usr").mkdir(parents=True)
    (libc / "usr" / "include").symlink_to(f"/usr/{triple}/include")
    (libc / "usr" / "lib").symlink_to(f"/usr/{triple}/lib")
    (libc / "lib").symlink_to(f"/usr/{triple}/lib")
    return root


@needs_aarch64
def test_vendor_toolchain_root(tmp_path, capsys):
    tree = make_tree(tmp_path / "tvm")
    root = make_linaro_root(tmp_path / "gcc-linaro")
    build = tmp_path / "build"
    code, out, err = run(
        capsys,
        *("--tvm-source", str(tree), "--target", "aarch64-linux-gnu", "--root", str(root)),
        *("--build-dir", str(build)),
    )
    assert code == 0, err
    assert f"{build / 'libtvm_runtime.so'}  AArch64" in out.splitlines()
    toolchain = (build / "toolchain-aarch64-linux-gnu.cmake").read_text()
    assert f'set(CMAKE_SYSROOT "{root}/aarch64-linux-gnu/libc")' in toolchain
    # The link line CMake wrote uses the vendor compiler with the vendor sysroot.
    link = (build / "CMakeFiles" / "tvm_runtime.dir" / "link.txt").read_text()
    assert link.startswith(
        f"{root}/bin/aarch64-linux-gnu-g++ --sysroot={root}/aarch64-linux-gnu/libc"
    )
