"""crossbuild's pure logic with plain calls: config edits, --set, toolchain text, wheel tags."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from packaging.tags import Tag
from packaging.version import Version

from crossbuild import config as cfg
from crossbuild.bundle import (
    FIXED_MTIME,
    Member,
    bundle_mtime,
    bundle_name,
    render_template,
    write_archive,
)
from crossbuild.elf import ElfInfo, foreign_needs, require_machine
from crossbuild.errors import CrossbuildError
from crossbuild.targets import SHIPPED_TOOLCHAINS, TARGETS, get_target
from crossbuild.toolchain import make_toolchain, render_toolchain, shipped_toolchain_path
from crossbuild.wheels import (
    forbidden,
    misfits,
    newest,
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
    assert wheel.version == Version("0.1.15")
    assert Tag("cp311", "cp311", "manylinux_2_28_aarch64") in wheel.tags
    assert len(wheel.tags) == 2
    with pytest.raises(CrossbuildError, match=r"^not a wheel file name: notawheel\.tar\.gz \("):
        parse_wheel_name("notawheel.tar.gz")
    with pytest.raises(CrossbuildError, match="not a wheel file name"):
        parse_wheel_name("twisted-notaversion-py3-none-any.whl")


def test_newest_wheel_by_version_not_by_name():
    wheels = [Path(f"tvmrpc-{v}-py3-none-any.whl") for v in ("0.9.0", "0.10.0", "0.10.0rc1")]
    assert newest(wheels) == wheels[1]  # by name, 0.9.0 would sort last
    assert newest([]) is None


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
    ok = supported_tags((3, 11), plats)
    assert Tag("py3", "none", "any") in ok
    assert Tag("cp311", "none", "any") in ok
    assert Tag("cp39", "abi3", "manylinux_2_17_aarch64") in ok
    assert Tag("cp311", "cp311", "linux_aarch64") not in ok


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
    # Names compare normalized (PEP 503); the answer names the project as asked.
    assert requirement_of("Requires-Dist: Apache_TVM.FFI >= 0.1\n", "apache-tvm-ffi") == (
        "apache-tvm-ffi>=0.1"
    )
    with pytest.raises(CrossbuildError, match=r"^bad Requires-Dist 'x >=' in a wheel: "):
        requirement_of("Requires-Dist: x >=\n", "x")


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


def test_one_machine_check_for_every_elf_file():
    info = ElfInfo("EM_X86_64", 64, ())
    assert require_machine("lib.so", info, "EM_X86_64") is info
    with pytest.raises(
        CrossbuildError, match=r"^w\.whl:a\.so is for x86-64, the target is AArch64$"
    ):
        require_machine("w.whl:a.so", info, "EM_AARCH64")
    with pytest.raises(
        CrossbuildError, match=r"is for x86-64, the target is ARM: was the toolchain"
    ):
        require_machine("lib.so", info, "EM_ARM", "was the toolchain file used?")


def test_bundle_mtime_from_source_date_epoch():
    assert bundle_mtime({}) == FIXED_MTIME
    assert bundle_mtime({"SOURCE_DATE_EPOCH": ""}) == FIXED_MTIME
    assert bundle_mtime({"SOURCE_DATE_EPOCH": "1700000000"}) == 1700000000
    with pytest.raises(CrossbuildError, match=r"^SOURCE_DATE_EPOCH wants whole seconds"):
        bundle_mtime({"SOURCE_DATE_EPOCH": "yesterday"})


def test_archive_is_normalized(tmp_path):
    """Sorted members, one mtime, root:root, given modes, and a gzip header with no name or time."""
    data = tmp_path / "lib.so"
    data.write_bytes(b"\x7fELF...")
    data.chmod(0o600)
    members = [
        Member("top/z.txt", 0o644, data=b"z"),
        Member("top/lib/lib.so", 0o755, data),
        Member("top/a.sh", 0o755, data=b"#!/bin/sh\n"),
    ]
    out = tmp_path / "out.tar.gz"
    write_archive(members, out, 1700000000)
    raw = out.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08"
    assert raw[3] & 0x08 == 0  # FNAME flag clear: no file name
    assert raw[4:8] == b"\0\0\0\0"  # MTIME field: no time
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["top/a.sh", "top/lib/lib.so", "top/z.txt"]
        assert [(i.mode, i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos] == [
            (0o755, 1700000000, 0, 0, "root", "root"),
            (0o755, 1700000000, 0, 0, "root", "root"),
            (0o644, 1700000000, 0, 0, "root", "root"),
        ]
        assert all(i.isreg() for i in infos)
        assert tar.extractfile("top/lib/lib.so").read() == b"\x7fELF..."
    # The same members in another order, from another file of the same bytes: same archive.
    copy = tmp_path / "copy.so"
    copy.write_bytes(data.read_bytes())
    again = tmp_path / "again.tar.gz"
    write_archive(
        [members[2], Member("top/lib/lib.so", 0o755, copy), members[0]], again, 1700000000
    )
    assert again.read_bytes() == raw
