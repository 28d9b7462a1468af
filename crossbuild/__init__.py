"""crossbuild: cross-compile the TVM runtime for a board and bundle a self-contained server.

Commands (``python -m crossbuild`` or ``tvmrpc-crossbuild``):

- ``toolchain``: write a CMake toolchain file for a target triple;
- ``runtime``: build ``libtvm_runtime`` from a TVM tree with that toolchain,
  or take it from the target platform's apache-tvm wheel (``--from-wheel``);
- ``bundle``: one archive that installs offline on the board and runs
  ``twistd -n tvm-server``.

Modules for an emulated board (``tvmrpc demo --board aarch64``, the tests):
``rootfs`` builds the board's Debian root filesystem with mmdebstrap, and
``emulate`` runs its programs in a chroot through qemu-user and binfmt_misc.
"""
