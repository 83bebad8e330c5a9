# Cross-compiling for 64-bit ARM Linux with Debian's cross toolchain (crossbuild-essential-arm64)
# and the arm64 libraries installed as a foreign architecture (dpkg multiarch). Used by
# scripts/arm64-cross.sh; tests run through qemu-aarch64 (CMAKE_CROSSCOMPILING_EMULATOR).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64)
# Programs (protoc, grpc_cpp_plugin) run on the build machine; libraries and headers are the
# arm64 ones under the same root, found through lib/aarch64-linux-gnu.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
# pkg-config for the target's .pc files (gRPC's CMake package finds RE2 through it).
set(PKG_CONFIG_EXECUTABLE aarch64-linux-gnu-pkg-config CACHE FILEPATH "pkg-config for aarch64")
