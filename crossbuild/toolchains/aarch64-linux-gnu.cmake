# CMake toolchain file for aarch64-linux-gnu: 64-bit Arm (Raspberry Pi 3/4/5, Jetson, RK3588).
# Written by tvmrpc-crossbuild (python -m crossbuild toolchain --target aarch64-linux-gnu); Debian/Ubuntu cross compilers (apt install g++-aarch64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER "aarch64-linux-gnu-gcc")
set(CMAKE_CXX_COMPILER "aarch64-linux-gnu-g++")
set(CMAKE_FIND_ROOT_PATH "/usr/aarch64-linux-gnu")
# Run build tools from the host; take libraries, headers and packages from the target.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
