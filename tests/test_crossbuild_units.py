"""crossbuild's pure logic with plain calls: config edits, --set, toolchain text, wheel tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossbuild import config as cfg
from crossbuild.bundle import bundle_name, render_template
from crossbuild.elf import ElfInfo, foreign_needs
from crossbuild.errors import CrossbuildError
from crossbuild.targets import SHIPPED_TOOLCHAINS, TARGETS, get_target
from crossbuild.toolchain import make_toolchain, render_toolchain, shipped_toolchain_path
from crossbuild.wheels import (
    forbidden,
    misfits,
    parse_version,
    parse_wheel_name,
    platform_tags,
    requirement_of,
    supported_tags,
)

CONFIG = """\
# comment line that mentions set(USE_LLVM ON) must stay
set(USE_CUDA OFF)
set(USE_OPENCL OFF)  # OpenCL runtime
  set(USE_LLVM "llvm-config --link-static")
set(USE_LIBBACKTRACE AUTO)
set(USE_SORT ON)
"""


def test_config_defaults_switch_off_what_the_file_has():
    text, changes = cfg.edit_config(CONFIG, {})
    assert "  set(USE_LLVM OFF)\n" in text
    assert "set(USE_LIBBACKTRACE OFF)\n" in text
    assert [c.name for c in changes] == ["USE_LLVM", "USE_LIBBACKTRACE"]
    assert changes[0].old == '"llvm-config --link-static"'
    # USE_MICRO is not in this (newer) file: skipped, not added, not an error.
    assert "USE_MICRO" not in text
    # Comments and untouched lines survive byte for byte.
    assert text.splitlines()[0] == CONFIG.splitlines()[0]
    assert "set(USE_SORT ON)\n" in text


def test_config_set_overrides_defaults_and_keeps_trailing_comment():
    text, changes = cfg.edit_config(
        CONFIG, {"USE_OPENCL": "ON", "USE_LLVM": "/opt/llvm/bin/llvm-config"}
    )
    assert "set(USE_OPENCL ON)  # OpenCL runtime\n" in text
    assert "  set(USE_LLVM /opt/llvm/bin/llvm-config)\n" in text
    assert {c.name: c.new for c in changes}["USE_OPENCL"] == "ON"


def test_config_value_with_spaces_is_quoted():
    text, _ = cfg.edit_config(CONFIG, {"USE_OPENCL": "/opt/my sdk"}, defaults={})
    assert 'set(USE_OPENCL "/opt/my sdk")' in text


def test_config_unknown_option_is_an_error_with_a_suggestion():
    with pytest.raises(
        CrossbuildError, match=r"no option USE_OPENCLL \(did you mean USE_OPENCL\?\)"
    ):
        cfg.edit_config(CONFIG, {"USE_OPENCLL": "ON"})
    with pytest.raises(CrossbuildError, match=r"^config.cmake has no option USE_ZZZ$"):
        cfg.edit_config(CONFIG, {"USE_ZZZ": "ON"})


def test_config_newer_tree_libbacktrace_option():
    text, changes = cfg.edit_config("set(USE_LLVM OFF)\nset(TVM_FFI_USE_LIBBACKTRACE ON)\n", {})
    assert text == "set(USE_LLVM OFF)\nset(TVM_FFI_USE_LIBBACKTRACE OFF)\n"
    assert [(c.name, c.old, c.new) for c in changes] == [
        ("USE_LLVM", "OFF", "OFF"),
        ("TVM_FFI_USE_LIBBACKTRACE", "ON", "OFF"),
    ]


def test_config_crlf_line_endings_kept():
    text, _ = cfg.edit_config(CONFIG.replace("\n", "\r\n"), {"USE_CUDA": "ON"})
    assert "set(USE_CUDA ON)\r\n" in text
    assert text.count("\r\n") == CONFIG.count("\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("USE_OPENCL=ON", ("USE_OPENCL", "ON")), (" USE_X = a=b ", ("USE_X", "a=b"))],
)
def test_parse_assignment(text, expected):
    assert cfg.parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["USE_OPENCL", "=ON", "USE OPENCL=ON", "USE_X=", "1X=ON"])
def test_parse_assignment_errors(text):
    with pytest.raises(CrossbuildError, match="--set wants NAME=VALUE"):
        cfg.parse_assignment(text)


def test_toolchain_debian_layout():
    text = render_toolchain(make_toolchain(get_target("aarch64-linux-gnu")))
    assert 'set(CMAKE_CXX_COMPILER "aarch64-linux-gnu-g++")' in text
    assert "CMAKE_SYSROOT" not in text  # Debian's compiler knows its own
    assert 'set(CMAKE_FIND_ROOT_PATH "/usr/aarch64-linux-gnu")' in text
    for kind, mode in [("PROGRAM", "NEVER"), ("LIBRARY", "ONLY"), ("INCLUDE", "ONLY")]:
        assert f"set(CMAKE_FIND_ROOT_PATH_MODE_{kind} {mode})" in text
    assert "set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)" in text


def test_toolchain_vendor_linaro_layout():
    target = get_target("arm-linux-gnueabihf")
    text = render_toolchain(make_toolchain(target, root="/opt/gcc-linaro-7.5/"))
    assert 'set(CMAKE_C_COMPILER "/opt/gcc-linaro-7.5/bin/arm-linux-gnueabihf-gcc")' in text
    assert 'set(CMAKE_SYSROOT "/opt/gcc-linaro-7.5/arm-linux-gnueabihf/libc")' in text
    assert "set(CMAKE_SYSTEM_PROCESSOR arm)" in text
    explicit = render_toolchain(make_toolchain(target, root="/opt/t", sysroot="/srv/rootfs"))
    assert 'set(CMAKE_SYSROOT "/srv/rootfs")' in explicit


@pytest.mark.parametrize("triple", SHIPPED_TOOLCHAINS)
def test_shipped_toolchains_match_the_renderer(triple):
    target = get_target(triple)
    assert shipped_toolchain_path(target).read_text() == render_toolchain(make_toolchain(target))


def test_unknown_target():
    with pytest.raises(CrossbuildError, match="unknown target 'mips'; known targets: aarch64"):
        get_target("mips")


def test_wheel_name_parsing_expands_compressed_tags():
    wheel = parse_wheel_name(
        "Apache_TVM_FFI-0.1.15-cp311-cp311-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl"
    )
    assert wheel.name == "apache-tvm-ffi"
    assert ("cp311", "cp311", "manylinux_2_28_aarch64") in wheel.tags
    assert len(wheel.tags) == 2
    with pytest.raises(CrossbuildError):
        parse_wheel_name("notawheel.tar.gz")


def test_platform_tags_follow_glibc():
    tags = platform_tags(TARGETS["aarch64-linux-gnu"], (2, 28))
    assert tags[0] == "manylinux_2_28_aarch64"
    assert tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags
    assert "manylinux_2_31_aarch64" not in tags
    with pytest.raises(CrossbuildError, match="too old"):
        platform_tags(TARGETS["aarch64-linux-gnu"], (2, 12))


def test_wheel_fit():
    plats = platform_tags(TARGETS["aarch64-linux-gnu"], (2, 28))
    fits = [
        "twisted-26.10.0-py3-none-any.whl",
        "hyperlink-21.0.0-py2.py3-none-any.whl",
        "cryptography-50.0.2-cp311-abi3-manylinux_2_28_aarch64.whl",
        "cryptography-50.0.2-cp37-abi3-manylinux_2_28_aarch64.whl",
        "zope_interface-8.7-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
    ]
    wrong = [
        "zope_interface-8.7-cp311-cp311-manylinux2014_x86_64.whl",  # other machine
        "zope_interface-8.7-cp312-cp312-manylinux2014_aarch64.whl",  # other Python
        "cryptography-50.0.2-cp311-abi3-manylinux_2_34_aarch64.whl",  # newer glibc
        "cffi-2.1.1-cp311-cp311-musllinux_1_2_aarch64.whl",  # other libc
    ]
    assert misfits(fits + wrong, (3, 11), plats) == wrong
    assert ("py3", "none", "any") in supported_tags((3, 11), plats)


def test_forbidden_wheels():
    names = ["numpy-2.0-cp311-cp311-manylinux_2_28_aarch64.whl", "attrs-26.1.0-py3-none-any.whl"]
    assert forbidden(names) == names[:1]


def test_requirement_of_reads_only_unconditional_requires():
    metadata = (
        "Name: apache-tvm\nRequires-Dist: apache-tvm-ffi>=0.1.14.post0\n"
        "Requires-Dist: numpy\nRequires-Dist: tornado; extra == 'rpc'\n"
    )
    assert requirement_of(metadata, "apache-tvm-ffi") == "apache-tvm-ffi>=0.1.14.post0"
    assert requirement_of(metadata, "tornado") is None


def test_versions_and_names():
    assert parse_version("3.11", "--python") == (3, 11)
    with pytest.raises(CrossbuildError, match=r"--python wants MAJOR\.MINOR"):
        parse_version("3", "--python")
    assert bundle_name(Path("/x/tvmrpc-server-aarch64.tar.gz")) == ("tvmrpc-server-aarch64")
    with pytest.raises(CrossbuildError, match=r"\.tar\.gz"):
        bundle_name(Path("out.zip"))
    assert render_template("a @X@ b @X@", {"X": "1"}) == "a 1 b 1"


def test_foreign_needs():
    info = ElfInfo("EM_AARCH64", 64, ("libtvm_ffi.so", "libc.so.6", "libcudart.so.13"))
    assert foreign_needs(info, {"libtvm_ffi.so"}) == ["libcudart.so.13"]
