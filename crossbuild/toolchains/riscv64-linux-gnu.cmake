# CMake toolchain file for riscv64-linux-gnu: 64-bit RISC-V (VisionFive 2, Milk-V).
# Written by tvmrpc-crossbuild (python -m crossbuild toolchain --target riscv64-linux-gnu); Debian/Ubuntu cross compilers (apt install g++-riscv64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR riscv64)
set(CMAKE_C_COMPILER "riscv64-linux-gnu-gcc")
set(CMAKE_CXX_COMPILER "riscv64-linux-gnu-g++")
set(CMAKE_FIND_ROOT_PATH "/usr/riscv64-linux-gnu")
# Run build tools from the host; take libraries, headers and packages from the target.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
