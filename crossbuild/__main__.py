"""tvmrpc-crossbuild: toolchain files, the TVM runtime for a board, and a server bundle.

  toolchain --target aarch64-linux-gnu [--root DIR] [--sysroot DIR] -o FILE
  runtime   --tvm-source DIR --target T [--set USE_OPENCL=ON ...] [--build-dir DIR] [-j N]
  runtime   --from-wheel --target T --tvm-version V [-o DIR]
  bundle    --target T --python X.Y (--runtime DIR | --from-wheel --tvm-version V) -o FILE.tar.gz

  --wheel-dir DIR (runtime, bundle): wheels there are used, downloads are kept there.

The bundle is reproducible: the same inputs give the same bytes; its members'
time is SOURCE_DATE_EPOCH when set, else 1980-01-01.

Errors are one line on stderr and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from crossbuild import config as cfg
from crossbuild.elf import machine_label
from crossbuild.errors import CrossbuildError
from crossbuild.targets import TARGETS, Target, get_target
from crossbuild.toolchain import make_toolchain, render_toolchain

try:  # packaging is a host-side extra (the board never runs crossbuild): say so in one line
    from crossbuild.bundle import BundleSpec, bundle_mtime, bundle_name, make_bundle
    from crossbuild.runtime import RuntimeResult, build_from_source, runtime_from_wheel
    from crossbuild.wheels import DEFAULT_GLIBC, allows, parse_version, platform_tags
except ModuleNotFoundError as missing:
    if (missing.name or "").partition(".")[0] != "packaging":
        raise
    sys.exit("tvmrpc-crossbuild: error: packaging is needed: pip install 'tvmrpc[crossbuild]'")

CHECKOUT = Path(__file__).resolve().parent.parent


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", required=True, metavar="TRIPLE", help=f"one of: {', '.join(TARGETS)}"
    )


def _add_vendor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="vendor toolchain root (Linaro layout: DIR/bin/<triple>-gcc, DIR/<triple>/libc)",
    )
    parser.add_argument("--sysroot", metavar="DIR", help="the target's root filesystem")


def _add_wheel_platform(parser: argparse.ArgumentParser) -> None:
    host = "{}.{}".format(*sys.version_info[:2])
    parser.add_argument("--python", default=host, metavar="X.Y", help=f"board's Python ({host})")
    parser.add_argument(
        "--glibc",
        default="{}.{}".format(*DEFAULT_GLIBC),
        metavar="X.Y",
        help="board's glibc; picks manylinux wheels (default %(default)s)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        metavar="TAG",
        help="wheel platform tag instead of the manylinux ones (repeat), e.g. linux_armv7l",
    )
    parser.add_argument(
        "--extra-index-url", metavar="URL", help="another package index, e.g. piwheels for armhf"
    )
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        metavar="DIR",
        help="local wheel directory: its wheels are used instead of downloading them, "
        "and downloaded wheels are kept there for the next run",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog="tvmrpc-crossbuild",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tc = sub.add_parser("toolchain", help="write a CMake toolchain file")
    _add_target(tc)
    _add_vendor(tc)
    tc.add_argument("-o", "--output", required=True, metavar="FILE", help="'-' for stdout")

    rt = sub.add_parser("runtime", help="cross-build libtvm_runtime, or take it from wheels")
    _add_target(rt)
    rt.add_argument("--tvm-source", metavar="DIR", type=Path, help="a TVM source tree")
    rt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="config.cmake option (repeat), e.g. USE_OPENCL=ON",
    )
    rt.add_argument("--build-dir", type=Path, metavar="DIR", help="default: SOURCE/build-TRIPLE")
    rt.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, metavar="N")
    rt.add_argument("--build-type", default="Release")
    _add_vendor(rt)
    rt.add_argument("--from-wheel", action="store_true", help="take it from apache-tvm wheels")
    rt.add_argument("--tvm-version", metavar="V", help="apache-tvm version (--from-wheel)")
    rt.add_argument(
        "-o", "--output", type=Path, metavar="DIR", help="where --from-wheel puts the libraries"
    )
    _add_wheel_platform(rt)

    bd = sub.add_parser("bundle", help="an offline-installable server archive for the board")
    _add_target(bd)
    source = bd.add_mutually_exclusive_group(required=True)
    source.add_argument("--runtime", type=Path, metavar="DIR", help="dir with libtvm_runtime*.so")
    source.add_argument("--from-wheel", action="store_true", help="runtime from apache-tvm wheel")
    bd.add_argument("--tvm-version", metavar="V", help="apache-tvm version (--from-wheel)")
    bd.add_argument(
        "--tvm-ffi-version",
        metavar="V",
        help="apache-tvm-ffi version (default: what the apache-tvm wheel asks for, "
        "else the host's)",
    )
    tvmrpc = bd.add_mutually_exclusive_group()
    tvmrpc.add_argument("--tvmrpc-source", type=Path, metavar="DIR", help="default: this checkout")
    tvmrpc.add_argument("--tvmrpc-wheel", type=Path, metavar="FILE")
    bd.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.tar.gz")
    _add_wheel_platform(bd)
    return parser


def _platforms(args: argparse.Namespace, target: Target) -> tuple[str, ...]:
    if args.platform:
        return tuple(args.platform)
    return tuple(platform_tags(target, parse_version(args.glibc, "--glibc")))


def _pip_args(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--extra-index-url", args.extra_index_url) if args.extra_index_url else ()


def _print_runtime(result: RuntimeResult) -> None:
    for change in result.changes:
        print(f"config.cmake: {change.name} {change.old} -> {change.new}")
    for name, missing in sorted(result.skipped.items()):
        print(f"skipped {name}: needs {', '.join(missing)}")
    for artifact in result.artifacts:
        print(f"{artifact.path}  {machine_label(artifact.machine)}")


def cmd_toolchain(args: argparse.Namespace) -> int:
    text = render_toolchain(make_toolchain(get_target(args.target), args.root, args.sysroot))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(args.output)
    return 0


def _need_version(args: argparse.Namespace) -> str:
    if not args.tvm_version:
        raise CrossbuildError("--from-wheel needs --tvm-version, e.g. --tvm-version 0.22.0")
    return args.tvm_version


def cmd_runtime(args: argparse.Namespace) -> int:
    target = get_target(args.target)
    if args.from_wheel:
        if args.tvm_source or args.set:
            raise CrossbuildError("--from-wheel takes no --tvm-source or --set")
        out = args.output or Path(f"tvm-runtime-{target.triple}")
        result = runtime_from_wheel(
            target,
            _need_version(args),
            out,
            parse_version(args.python, "--python"),
            _platforms(args, target),
            _pip_args(args),
            args.wheel_dir,
        )
        _print_runtime(result)
        if result.tvm_ffi_requirement:
            print(f"needs {result.tvm_ffi_requirement}")
        return 0
    if args.tvm_source is None:
        raise CrossbuildError("runtime needs --tvm-source DIR (or --from-wheel)")
    settings = dict(cfg.parse_assignment(item) for item in args.set)
    build_dir = args.build_dir or args.tvm_source / f"build-{target.triple}"
    toolchain = make_toolchain(target, args.root, args.sysroot)
    result = build_from_source(
        args.tvm_source, toolchain, build_dir, settings, max(1, args.jobs), args.build_type
    )
    _print_runtime(result)
    return 0


def _host_tvm_ffi() -> str | None:
    try:
        return metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        return None


def _tvm_ffi_requirement(explicit: str | None, wheel: str | None, host: str | None) -> str:
    """The apache-tvm-ffi the board gets: as asked, else the host's (so client and board
    speak the same FFI) within what the apache-tvm wheel requires, else that requirement."""
    if explicit:
        return f"apache-tvm-ffi=={explicit}"
    if host is None:
        if wheel is None:
            raise CrossbuildError("pass --tvm-ffi-version (apache-tvm-ffi is not installed here)")
        return wheel
    pin = f"=={host}"
    if not wheel or wheel == "apache-tvm-ffi":
        return f"apache-tvm-ffi{pin}"
    if not allows(wheel, host):  # the pin would ask pip for a version that cannot exist
        raise CrossbuildError(
            f"apache-tvm needs {wheel} but this host has apache-tvm-ffi {host}: "
            "pass --tvm-ffi-version"
        )
    return f"{wheel},{pin}"


def cmd_bundle(args: argparse.Namespace) -> int:
    target = get_target(args.target)
    python = parse_version(args.python, "--python")
    platforms = _platforms(args, target)
    bundle_name(args.output)  # a bad -o fails before any download
    mtime = bundle_mtime(os.environ)  # and so does a bad SOURCE_DATE_EPOCH
    with tempfile.TemporaryDirectory(prefix="tvm-runtime-") as tmp:
        requirement = None
        if args.from_wheel:
            result = runtime_from_wheel(
                target,
                _need_version(args),
                Path(tmp),
                python,
                platforms,
                _pip_args(args),
                args.wheel_dir,
            )
            _print_runtime(result)
            runtime_dir, requirement = Path(tmp), result.tvm_ffi_requirement
        else:
            runtime_dir = args.runtime
        requirement = _tvm_ffi_requirement(args.tvm_ffi_version, requirement, _host_tvm_ffi())
        source = args.tvmrpc_source
        if source is None and args.tvmrpc_wheel is None:
            source = CHECKOUT
        spec = BundleSpec(
            target=target,
            python=python,
            platforms=platforms,
            runtime_dir=runtime_dir,
            tvm_ffi_requirement=requirement,
            output=args.output,
            tvmrpc_source=source,
            tvmrpc_wheel=args.tvmrpc_wheel,
            pip_args=_pip_args(args),
            wheel_dir=args.wheel_dir,
            mtime=mtime,
        )
        manifest = make_bundle(spec)
    for wheel in manifest["wheels"]:
        print(f"wheel   {wheel}")
    for lib, machine in manifest["runtime"].items():
        print(f"runtime {lib}  {machine}")
    print(args.output)
    return 0


COMMANDS = {"toolchain": cmd_toolchain, "runtime": cmd_runtime, "bundle": cmd_bundle}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status (one-line errors on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CrossbuildError as error:
        print(f"tvmrpc-crossbuild {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
