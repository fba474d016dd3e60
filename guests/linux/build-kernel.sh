#!/bin/sh
# Builds a small Linux kernel for Swiftlet from Debian's linux-source-6.1:
# `make tinyconfig`, then config-fragment merged over it, then bzImage.
#
#   apt-get install linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev
#   guests/linux/build-kernel.sh            # -> guests/linux/build/bzImage, vmlinux
#
# Environment:
#   LINUX_SOURCE_TARBALL  default /usr/src/linux-source-6.1.tar.xz
#   BUILD_DIR             default guests/linux/build (next to this script)
#   JOBS                  default: the number of CPUs
#   CONFIG_ONLY=1         stop after writing and checking .config (quick CI check)
# Took 28 minutes on a 2-core nested VM. Idempotent: reuses the unpacked tree and the
# object directory, and `make` only rebuilds what changed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tarball="${LINUX_SOURCE_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
build="${BUILD_DIR:-$here/build}"
jobs="${JOBS:-$(nproc)}"

if [ ! -f "$tarball" ]; then
    echo "build-kernel: $tarball not found; install it with: apt-get install linux-source-6.1" >&2
    exit 1
fi
mkdir -p "$build"
src="$build/linux-source-6.1"
if [ ! -f "$src/Makefile" ]; then
    echo "build-kernel: unpacking $tarball"
    tar -C "$build" -xf "$tarball"
fi
obj="$build/obj"
mkdir -p "$obj"

make -C "$src" O="$obj" tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/config-fragment" >/dev/null
make -C "$src" O="$obj" olddefconfig >/dev/null

# Every fragment option must have survived (a typo or an unmet dependency drops it).
missing=0
grep '^CONFIG_' "$here/config-fragment" | while IFS= read -r line; do
    grep -qx "$line" "$obj/.config" || { echo "build-kernel: not set in .config: $line" >&2; exit 1; }
done || missing=1
[ "$missing" -eq 0 ] || exit 1
if [ "${CONFIG_ONLY:-0}" = 1 ]; then
    echo "build-kernel: $obj/.config has every option of config-fragment"
    exit 0
fi

make -C "$src" O="$obj" -j"$jobs" bzImage
cp "$obj/arch/x86/boot/bzImage" "$build/bzImage"
cp "$obj/vmlinux" "$build/vmlinux"
echo "build-kernel: $build/bzImage and $build/vmlinux"
