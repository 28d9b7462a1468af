"""``bundle``: an aarch64 archive from wheels, and a host archive that really serves.

The aarch64 bundle is checked with ``packaging.tags`` and pyelftools called
directly, not through crossbuild's helpers. The host bundle is unpacked into
an empty directory, installed by its ``install.sh`` with no index and a clean
environment (nothing from this checkout or its venv on the path), started
from its launcher against our tracker, and a stock client runs the shared
reference MLP through it. Two host bundles from the same inputs are the
same bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from crossbuild.__main__ import main
from crossbuild.bundle import FIXED_MTIME
from crossbuild.elf import ELF_MAGIC, elf_info, elf_members
from crossbuild.targets import get_target
from crossbuild.wheels import platform_tags
from tests.support import REPO_ROOT, Process, free_port, running, start_tracker

PYTHON = sys.version_info[:2]
PY = "{}.{}".format(*PYTHON)
NEVER_ON_BOARD = {"numpy", "cloudpickle", "tornado", "apache-tvm"}
SERVER_WRITTEN = importlib.util.find_spec("tvmrpc.server.service") is not None
pytestmark = pytest.mark.slow


def unpack(archive: Path, into: Path) -> Path:
    """Extract ``archive`` into the empty ``into``; return its single top directory."""
    into.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (top,) = into.iterdir()
    return top


def target_tags(platforms: list[str]) -> set:
    """Every tag CPython PY on ``platforms`` accepts, per the packaging library."""
    tags = set(cpython_tags(PYTHON, platforms=platforms))
    tags |= set(compatible_tags(PYTHON, "cp" + PY.replace(".", ""), platforms=platforms))
    return tags


@pytest.fixture(scope="module")
def aarch64_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle-aarch64") / "tvmrpc-server-aarch64-linux-gnu.tar.gz"
    argv = ["bundle", "--target", "aarch64-linux-gnu", "--python", PY, "--glibc", "2.28"]
    argv += ["--from-wheel", "--tvm-version", metadata.version("apache-tvm"), "-o", str(out)]
    argv += ["--tvmrpc-source", str(REPO_ROOT)]
    assert main(argv) == 0
    return unpack(out, out.parent / "unpacked")


def test_aarch64_bundle_has_only_aarch64_code(aarch64_bundle):
    libs = sorted((aarch64_bundle / "lib").iterdir())
    assert [p.name for p in libs if p.name == "libtvm_runtime.so"] == ["libtvm_runtime.so"]
    for path in aarch64_bundle.rglob("*"):
        if path.is_file() and path.read_bytes()[:4] == ELF_MAGIC:
            assert elf_info(path).machine == "EM_AARCH64", path
    elf_in_wheels = 0
    for wheel in (aarch64_bundle / "wheels").glob("*.whl"):
        for member, info in elf_members(wheel):
            assert info.machine == "EM_AARCH64", f"{wheel.name}:{member}"
            elf_in_wheels += 1
    assert elf_in_wheels > 0  # tvm_ffi, cryptography, zope.interface ... are compiled


def test_aarch64_bundle_wheels_fit_the_board(aarch64_bundle):
    ok = target_tags(platform_tags(get_target("aarch64-linux-gnu"), (2, 28)))
    names = set()
    for wheel in (aarch64_bundle / "wheels").glob("*.whl"):
        name, _version, _build, tags = parse_wheel_filename(wheel.name)
        assert tags & ok, f"{wheel.name} does not fit cp{PY} manylinux aarch64 glibc 2.28"
        names.add(canonicalize_name(name))
    assert {"tvmrpc", "twisted", "apache-tvm-ffi"} <= names
    assert not names & NEVER_ON_BOARD
    manifest = json.loads((aarch64_bundle / "manifest.json").read_text())
    assert manifest["target"] == "aarch64-linux-gnu"
    assert manifest["python"] == PY
    assert manifest["runtime"]["libtvm_runtime.so"] == "AArch64"


def test_aarch64_bundle_layout(aarch64_bundle):
    for script in ("install.sh", "bin/tvm-server"):
        assert os.access(aarch64_bundle / script, os.X_OK), script
    launcher = (aarch64_bundle / "bin" / "tvm-server").read_text()
    assert "-n --pidfile= tvm-server" in launcher
    unit = (aarch64_bundle / "systemd" / "tvm-server@.service.in").read_text()
    assert "EnvironmentFile=/etc/tvmrpc/%i.env" in unit
    assert "--key ${TVM_KEY} --grace 20 $TVM_SERVER_ARGS" in unit  # tvmrpc's own unit
    env = (aarch64_bundle / "systemd" / "tvm-server.env").read_text()
    assert "TVM_KEY=" in env
    assert "TVM_SERVER_ARGS=--tracker " in env


# --- the host bundle, installed and serving ----------------------------------


def clean_env() -> dict[str, str]:
    """A board-like environment: no venv, no PYTHONPATH, no pip configuration."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": os.devnull,
        "TVM_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def bare_python(tmp_path) -> str:
    """A Python with no packages at all (the base interpreter here may have numpy)."""
    bare = tmp_path / "bare-python"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    return str(bare / "bin" / "python")


@pytest.fixture(scope="module")
def host_runtime(tmp_path_factory) -> Path:
    """A directory with this host's TVM runtime libraries (the --runtime of a host bundle)."""
    import tvm

    runtime = tmp_path_factory.mktemp("runtime-host")
    for lib in Path(tvm.__file__).parent.joinpath("lib").glob("libtvm_runtime*.so"):
        if lib.name != "libtvm_runtime_cuda.so":  # needs CUDA, which this host has not
            shutil.copy2(lib, runtime / lib.name)
    return runtime


def host_bundle_argv(runtime: Path, out: Path) -> list[str]:
    argv = ["bundle", "--target", "x86_64-linux-gnu", "--python", PY, "--glibc", "2.28"]
    return [*argv, "--runtime", str(runtime), "-o", str(out), "--tvmrpc-source", str(REPO_ROOT)]


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory, host_runtime) -> Path:
    out = tmp_path_factory.mktemp("bundle-host") / "tvmrpc-server-host.tar.gz"
    assert main(host_bundle_argv(host_runtime, out)) == 0
    return out


def test_bundle_is_reproducible(host_runtime, tmp_path, monkeypatch):
    """Two runs with the same inputs give the same bytes (the wheels come from --wheel-dir
    the second time; the tvmrpc wheel is built afresh each time)."""
    wheel_dir = tmp_path / "wheels"
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first, second = tmp_path / "1" / "b.tar.gz", tmp_path / "2" / "b.tar.gz"
    assert main([*host_bundle_argv(host_runtime, first), "--wheel-dir", str(wheel_dir)]) == 0
    kept = sorted(p.name for p in wheel_dir.iterdir())
    assert main([*host_bundle_argv(host_runtime, second), "--wheel-dir", str(wheel_dir)]) == 0
    assert sorted(p.name for p in wheel_dir.iterdir()) == kept  # nothing new was fetched
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert {m.mtime for m in tar.getmembers()} == {FIXED_MTIME}
        (wheel,) = (m for m in names if m.startswith("b/wheels/tvmrpc-"))
        with zipfile.ZipFile(tar.extractfile(wheel)) as built:  # built with the same time
            assert {i.date_time for i in built.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # SOURCE_DATE_EPOCH, when set, is the time of every member (and of the tvmrpc wheel's).
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    third = tmp_path / "3" / "b.tar.gz"
    assert main([*host_bundle_argv(host_runtime, third), "--wheel-dir", str(wheel_dir)]) == 0
    with tarfile.open(third) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}
        (wheel,) = (m for m in tar.getnames() if m.startswith("b/wheels/tvmrpc-"))
        with zipfile.ZipFile(tar.extractfile(wheel)) as built:
            assert {i.date_time[:3] for i in built.infolist()} == {(2023, 11, 14)}


@pytest.mark.parametrize("mode", ["venv", "plain"])
def test_host_bundle_installs_offline(host_bundle, bare_python, tmp_path, mode):
    top = unpack(host_bundle, tmp_path / "unpacked")
    prefix = tmp_path / "board"
    base = bare_python
    result = subprocess.run(
        [str(top / "install.sh"), f"--{mode}", "--prefix", str(prefix), "--python", base],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"installed ({mode}) in {prefix}" in result.stdout
    python = str(prefix / "venv" / "bin" / "python") if mode == "venv" else base
    env = clean_env()
    if mode == "plain":
        env["PYTHONPATH"] = str(prefix / "site-packages")
    # The bundle's runtime loads into the bundle's tvm_ffi and has the RPC server loop.
    probe = (
        "import ctypes, sys, importlib.util as u, tvmrpc, tvm_ffi, twisted.plugins.tvmrpc_plugins;"
        "ctypes.CDLL(sys.argv[1], ctypes.RTLD_GLOBAL);"
        "assert tvm_ffi.get_global_func('rpc.ServerLoop') is not None;"
        "print(tvmrpc.__file__);"
        "print([m for m in ('numpy', 'cloudpickle', 'tornado', 'tvm') if u.find_spec(m)])"
    )
    out = subprocess.run(
        [python, "-c", probe, str(prefix / "lib" / "libtvm_runtime.so")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    where, missing = out.stdout.splitlines()
    assert where.startswith(str(prefix))  # the bundle's tvmrpc, not this checkout's
    assert missing == "[]"
    if mode == "plain":
        assert (prefix / "bin" / ".python").read_text().strip() == base
    unit = (prefix / "systemd" / "tvm-server@.service").read_text()
    assert f"ExecStart={prefix}/bin/tvm-server --key" in unit


@pytest.fixture(scope="module")
def mlp_library(tmp_path_factory) -> Path:
    """The shared reference MLP compiled for this host (once for both install modes)."""
    from tvmrpc.mlp import build_mlp

    return build_mlp(tmp_path_factory.mktemp("model"))


@pytest.mark.stock
@pytest.mark.skipif(
    not SERVER_WRITTEN,
    reason="the tvm-server plugin module tvmrpc/server/service.py is not in this checkout yet",
)
@pytest.mark.parametrize("mode", ["venv", "plain"])
def test_host_bundle_serves_a_stock_client(
    host_bundle, bare_python, mlp_library, tmp_path, log_dir, mode
):
    from tvm import rpc

    from tvmrpc.mlp import run_mlp

    top = unpack(host_bundle, tmp_path / "unpacked")
    prefix = tmp_path / "board"
    base = bare_python
    subprocess.run(
        [str(top / "install.sh"), f"--{mode}", "--prefix", str(prefix), "--python", base],
        env=clean_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = clean_env()
    key = f"bundle-{mode}"
    with running(start_tracker(log_dir, "--verbose")) as tracker:
        launcher = [str(prefix / "bin" / "tvm-server"), "--key", key]
        launcher += ["--tracker", f"127.0.0.1:{tracker.port}", "--port", str(free_port())]
        with running(Process(launcher, log_dir / "bundle-server.log", env=env, cwd=tmp_path)):
            tracker.wait_for(rf"server:{key} registered from 127\.0\.0\.1")
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            session = client.request(key, priority=1, session_timeout=60)
            result = run_mlp(session, mlp_library)
            assert result.ok, (result.output, result.expected)


RUNTIME_PROBE_C = """\
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
typedef struct { const char* data; size_t size; } ByteArray;
typedef int (*GetGlobal)(const ByteArray*, void**);
int main(int argc, char** argv) {
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) { printf("dlopen: %s\\n", dlerror()); return 2; }
  GetGlobal get = (GetGlobal)dlsym(RTLD_DEFAULT, "TVMFFIFunctionGetGlobal");
  if (!get) { printf("no TVMFFIFunctionGetGlobal\\n"); return 3; }
  ByteArray name = {argv[2], strlen(argv[2])};
  void* func = NULL;
  if (get(&name, &func) != 0 || func == NULL) { printf("no %s\\n", argv[2]); return 4; }
  printf("found %s\\n", argv[2]);
  return 0;
}
"""


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (qemu-user)",
)
def test_aarch64_bundle_runtime_loads_on_aarch64(aarch64_bundle, tmp_path):
    """The bundled runtime and the bundled tvm_ffi load together on AArch64 (under qemu)."""
    (wheel,) = (aarch64_bundle / "wheels").glob("apache_tvm_ffi-*.whl")
    libs = tmp_path / "libs"
    libs.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        (libs / "libtvm_ffi.so").write_bytes(archive.read("tvm_ffi/lib/libtvm_ffi.so"))
    source = tmp_path / "probe.c"
    source.write_text(RUNTIME_PROBE_C)
    probe = tmp_path / "probe"
    subprocess.run(["aarch64-linux-gnu-gcc", str(source), "-o", str(probe), "-ldl"], check=True)
    qemu = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-E", f"LD_LIBRARY_PATH={libs}"]
    runtime = aarch64_bundle / "lib" / "libtvm_runtime.so"
    result = subprocess.run(
        [*qemu, str(probe), str(runtime), "rpc.ServerLoop"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "found rpc.ServerLoop"), result
