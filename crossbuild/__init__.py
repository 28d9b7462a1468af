"""crossbuild: cross-compile the TVM runtime for a board and bundle a self-contained server.

Commands (``python -m crossbuild`` or ``tvmrpc-crossbuild``):

- ``toolchain``: write a CMake toolchain file for a target triple;
- ``runtime``: build ``libtvm_runtime`` from a TVM tree with that toolchain,
  or take it from the target platform's apache-tvm wheel (``--from-wheel``);
- ``bundle``: one archive that installs offline on the board and runs
  ``twistd -n tvm-server``.
"""
