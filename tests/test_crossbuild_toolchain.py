"""The generated aarch64 toolchain cross-compiles a real CMake C++ project.

The project is apache-tvm-ffi's source distribution from the package index
(the library every TVM runtime links) plus a small test program that calls a
packed function through it. pyelftools checks both are AArch64; where
qemu-user is installed, the program runs under ``qemu-aarch64 -L <sysroot>``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from crossbuild.__main__ import main
from crossbuild.elf import elf_info
from crossbuild.runtime import find_cmake
from crossbuild.targets import get_target

TARGET = get_target("aarch64-linux-gnu")
JOBS = "2"  # CI has two cores, shared


def _cmake_at_least(major: int, minor: int) -> str | None:
    try:
        cmake = find_cmake()
    except Exception:  # noqa: BLE001 - any failure means "no usable cmake"
        return None
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(\d+)\.(\d+)", out)
    return cmake if match and (int(match[1]), int(match[2])) >= (major, minor) else None


CMAKE = _cmake_at_least(3, 26)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("aarch64-linux-gnu-g++") is None,
        reason="no aarch64-linux-gnu-g++ (apt install g++-aarch64-linux-gnu)",
    ),
    pytest.mark.skipif(CMAKE is None, reason="no cmake >= 3.26 (pip install 'cmake>=3.26')"),
]

PROBE_CMAKE = """\
cmake_minimum_required(VERSION 3.26)
project(crossbuild_probe LANGUAGES C CXX)
add_subdirectory(${TVM_FFI_SOURCE} tvm_ffi)
add_executable(probe probe.cc)
target_compile_features(probe PRIVATE cxx_std_17)
target_link_libraries(probe PRIVATE tvm_ffi_shared)
"""

PROBE_CC = """\
#include <tvm/ffi/function.h>
#include <cstdio>
int main() {
  auto add = tvm::ffi::Function::FromTyped([](int64_t a, int64_t b) { return a + b; });
  int64_t sum = add(40, 2).cast<int64_t>();
  std::printf("probe: 40 + 2 = %lld\\n", static_cast<long long>(sum));
  return sum == 42 ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def tvm_ffi_source(request, tmp_path_factory) -> Path:
    """apache-tvm-ffi's sdist (the installed version) unpacked; the download is cached."""
    version = metadata.version("apache-tvm-ffi")
    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = (
        Path(store.mkdir("crossbuild-sdist"))
        if store is not None
        else tmp_path_factory.mktemp("sdist")
    )
    found = sorted(cache.glob(f"apache_tvm_ffi-{version}.tar.gz"))
    if not found:
        # --no-binary for this package only: with :all: pip would also build
        # the sdist's build requirements (cmake itself) from source.
        pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        subprocess.run(
            [
                *pip,
                "--no-deps",
                "--no-binary",
                "apache-tvm-ffi",
                "--dest",
                str(cache),
                f"apache-tvm-ffi=={version}",
            ],
            check=True,
        )
        found = sorted(cache.glob(f"apache_tvm_ffi-{version}.tar.gz"))
    assert found, f"pip downloaded no sdist of apache-tvm-ffi {version} into {cache}"
    out = tmp_path_factory.mktemp("tvm-ffi-src")
    with tarfile.open(found[0]) as tar:
        tar.extractall(out, filter="data")
    return out / f"apache_tvm_ffi-{version}"


@pytest.fixture(scope="module")
def cross_build(tvm_ffi_source, tmp_path_factory) -> Path:
    """The probe project built with the generated toolchain; returns the build directory."""
    work = tmp_path_factory.mktemp("probe")
    toolchain = work / "aarch64.cmake"
    assert main(["toolchain", "--target", TARGET.triple, "-o", str(toolchain)]) == 0
    (work / "src").mkdir()
    (work / "src" / "CMakeLists.txt").write_text(PROBE_CMAKE)
    (work / "src" / "probe.cc").write_text(PROBE_CC)
    build = work / "build"
    log = work / "build.log"
    # Only what the probe needs: no libbacktrace, no extra API, no -O2.
    options = ["-DTVM_FFI_USE_LIBBACKTRACE=OFF", "-DTVM_FFI_USE_EXTRA_CXX_API=OFF"]
    options += ["-DTVM_FFI_BACKTRACE_ON_SEGFAULT=OFF", f"-DTVM_FFI_SOURCE={tvm_ffi_source}"]
    with open(log, "w") as out:
        for argv in (
            [
                CMAKE,
                "-S",
                str(work / "src"),
                "-B",
                str(build),
                f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                *options,
            ],
            [CMAKE, "--build", str(build), "--target", "probe", "--parallel", JOBS],
        ):
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
            assert code == 0, f"{argv[:3]} failed; see {log}:\n{log.read_text()[-3000:]}"
    return build


def test_library_and_program_are_aarch64(cross_build):
    library = cross_build / "lib" / "libtvm_ffi.so"
    program = cross_build / "probe"
    for path in (library, program):
        info = elf_info(path)
        assert (info.machine, info.elf_class) == ("EM_AARCH64", 64), path
    assert "libtvm_ffi.so" in elf_info(program).needed


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64 (qemu-user)")
def test_program_runs_under_qemu(cross_build):
    result = subprocess.run(
        ["qemu-aarch64", "-L", TARGET.debian_sysroot, str(cross_build / "probe")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "probe: 40 + 2 = 42"
