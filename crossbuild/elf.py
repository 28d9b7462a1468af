"""What an ELF file was built for and what it needs, read with pyelftools.

Only headers and the dynamic section are read; nothing is loaded or run.

Invariant: ``require_machine`` is the one check that an ELF file is for the
board's machine; the runtime libraries, the bundle and the wheels in it all
go through it, so they fail with the same one-line message.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from crossbuild.errors import CrossbuildError

ELF_MAGIC = b"\x7fELF"

# Libraries every glibc Linux board has; anything else a runtime library needs
# must come with it.
SYSTEM_LIBRARIES = frozenset(
    {
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "libstdc++.so.6",
        "libgcc_s.so.1",
        "libatomic.so.1",
    }
)


def _elffile():  # imported lazily so --help works without pyelftools
    try:
        from elftools.elf.elffile import ELFFile
    except ImportError:
        raise CrossbuildError("pyelftools is needed: pip install pyelftools") from None
    return ELFFile


@dataclass(frozen=True)
class ElfInfo:
    """The facts about one ELF file that decide whether it runs on a board."""

    machine: str  # e.g. "EM_AARCH64"
    elf_class: int  # 32 or 64
    needed: tuple[str, ...]  # DT_NEEDED entries


def read_elf(stream: BinaryIO) -> ElfInfo:
    """Machine, class and DT_NEEDED of the ELF file in ``stream`` (seekable)."""
    elf = _elffile()(stream)
    needed: list[str] = []
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is not None:
        needed = [tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
    return ElfInfo(elf["e_machine"], elf.elfclass, tuple(needed))


def elf_info(path: Path) -> ElfInfo:
    """``read_elf`` for a file on disk."""
    with open(path, "rb") as stream:
        return read_elf(stream)


def is_elf(path: Path) -> bool:
    """True when ``path`` starts with the ELF magic."""
    with open(path, "rb") as stream:
        return stream.read(4) == ELF_MAGIC


def elf_members(wheel: Path) -> Iterator[tuple[str, ElfInfo]]:
    """``(member name, info)`` for every ELF file inside the zip archive ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            with archive.open(member) as stream:
                if stream.read(4) != ELF_MAGIC:
                    continue
            yield member.filename, read_elf(io.BytesIO(archive.read(member)))


def foreign_needs(info: ElfInfo, provided: frozenset[str] | set[str]) -> list[str]:
    """DT_NEEDED entries neither a glibc system library nor in ``provided`` (pure)."""
    return [
        name
        for name in info.needed
        if name not in SYSTEM_LIBRARIES and name not in provided and not name.startswith("ld-linux")
    ]


def machine_label(machine: str) -> str:
    """``EM_AARCH64`` -> ``AArch64`` for messages."""
    labels = {
        "EM_AARCH64": "AArch64",
        "EM_ARM": "ARM",
        "EM_RISCV": "RISC-V",
        "EM_X86_64": "x86-64",
        "EM_386": "x86",
    }
    return labels.get(machine, machine)


def require_machine(what: str, info: ElfInfo, machine: str, hint: str = "") -> ElfInfo:
    """``info`` when it is for ``machine`` (an ``e_machine`` name such as ``EM_AARCH64``).

    Otherwise a one-line CrossbuildError naming ``what`` (a path, or
    ``wheel:member``) and both machines, with ``hint`` (what to do) appended.
    """
    if info.machine != machine:
        message = f"{what} is for {machine_label(info.machine)}, the target is "
        message += machine_label(machine)
        raise CrossbuildError(f"{message}: {hint}" if hint else message)
    return info
