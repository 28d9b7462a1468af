"""Boards we know how to build for: GNU triple, CMake processor, ELF machine, wheel platform.

Pure data. Invariant: every target's ``triple`` is the prefix of its compiler
names (``<triple>-gcc``) and of Debian's cross-compiler package
(``g++-<triple>``), and ``elf_machine`` is what pyelftools reports as
``e_machine`` for binaries built for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossbuild.errors import CrossbuildError


@dataclass(frozen=True)
class Target:
    """One board ABI."""

    triple: str  # GNU triple: compiler prefix, Debian multiarch directory
    processor: str  # CMAKE_SYSTEM_PROCESSOR
    elf_machine: str  # pyelftools' e_machine name, e.g. "EM_AARCH64"
    wheel_arch: str  # the architecture in manylinux platform tags, e.g. "aarch64"
    description: str

    @property
    def debian_package(self) -> str:
        """Debian/Ubuntu package with this target's C++ cross compiler."""
        return f"g++-{self.triple.replace('_', '-')}"

    @property
    def debian_sysroot(self) -> str:
        """Where Debian's cross toolchain keeps the target's libc (``qemu -L`` wants it)."""
        return f"/usr/{self.triple}"


TARGETS: dict[str, Target] = {
    t.triple: t
    for t in (
        Target(
            "aarch64-linux-gnu",
            "aarch64",
            "EM_AARCH64",
            "aarch64",
            "64-bit Arm (Raspberry Pi 3/4/5, Jetson, RK3588)",
        ),
        Target(
            "arm-linux-gnueabihf",
            "arm",
            "EM_ARM",
            "armv7l",
            "32-bit Arm, hard float (Raspberry Pi OS 32-bit)",
        ),
        Target(
            "riscv64-linux-gnu",
            "riscv64",
            "EM_RISCV",
            "riscv64",
            "64-bit RISC-V (VisionFive 2, Milk-V)",
        ),
        Target(
            "x86_64-linux-gnu",
            "x86_64",
            "EM_X86_64",
            "x86_64",
            "64-bit x86 (the usual host; bundles for PCs)",
        ),
    )
}

# Targets with a toolchain file shipped in crossbuild/toolchains/.
SHIPPED_TOOLCHAINS = ("aarch64-linux-gnu", "arm-linux-gnueabihf", "riscv64-linux-gnu")


def get_target(name: str) -> Target:
    """The target called ``name`` (a GNU triple); a one-line error lists the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise CrossbuildError(
            f"unknown target {name!r}; known targets: {', '.join(TARGETS)}"
        ) from None
