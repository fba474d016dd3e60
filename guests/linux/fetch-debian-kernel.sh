#!/bin/sh
# Downloads Debian's cloud kernel (the versioned package linux-image-cloud-amd64 depends
# on) into a cache directory, extracts its bzImage as `vmlinuz` and writes the
# uncompressed ELF inside it as `vmlinux`. Idempotent: does nothing when both exist.
#
#   SWIFTLET_KERNEL_CACHE  cache directory (default /var/cache/swiftlet/linux)
#
# Needs apt-get, dpkg-deb, python3, and for the payload formats Python lacks the
# `zstd` / `lz4` command-line tools (Debian: zstd, lz4).
set -eu

cache="${SWIFTLET_KERNEL_CACHE:-/var/cache/swiftlet/linux}"
if [ -s "$cache/vmlinuz" ] && [ -s "$cache/vmlinux" ]; then
    echo "fetch-debian-kernel: $cache already holds vmlinuz and vmlinux"
    exit 0
fi
mkdir -p "$cache"

# linux-image-cloud-amd64 is a metapackage; its Depends names the real image package.
package=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n 1)
if [ -z "$package" ]; then
    echo "fetch-debian-kernel: cannot resolve linux-image-cloud-amd64 (run apt-get update?)" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
(cd "$work" && apt-get download "$package" >/dev/null 2>&1) || (cd "$work" && apt-get download "$package")
dpkg-deb -x "$work"/"$package"_*.deb "$work/root"
image=$(ls "$work"/root/boot/vmlinuz-* | head -n 1)
cp "$image" "$cache/vmlinuz.tmp" && mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
echo "$package" > "$cache/package"

# The bzImage's setup header gives the compressed payload (boot protocol 2.08+):
# setup_sects at 0x1F1, payload_offset at 0x248 and payload_length at 0x24C, both
# relative to the protected-mode kernel at (setup_sects + 1) * 512.
python3 - "$cache/vmlinuz" "$work/payload" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
if data[0x1FE:0x200] != b"\x55\xaa" or data[0x202:0x206] != b"HdrS":
    sys.exit("not a bzImage")
setup = data[0x1F1] or 4
offset, length = struct.unpack_from("<II", data, 0x248)
start = (setup + 1) * 512 + offset
open(sys.argv[2], "wb").write(data[start:start + length])
PY

payload="$work/payload"
magic=$(od -An -tx1 -N4 "$payload" | tr -d ' \n')
case "$magic" in
    1f8b*)    gzip -dc <"$payload" >"$work/vmlinux" 2>/dev/null || true ;;     # trailing size is ignored
    fd377a58) xz -dc --single-stream <"$payload" >"$work/vmlinux" ;;
    28b52ffd) zstd -dc <"$payload" >"$work/vmlinux" 2>/dev/null || true ;;   # trailing size: "unknown frame"
    02214c18) lz4 -dc <"$payload" >"$work/vmlinux" 2>/dev/null || true ;;
    *) echo "fetch-debian-kernel: unknown payload compression (magic $magic)" >&2; exit 1 ;;
esac
# The kernel build appends the uncompressed size as the payload's last 4 bytes.
expected=$(tail -c 4 "$payload" | od -An -tu4 --endian=little | tr -d ' \n')
if [ "$(wc -c <"$work/vmlinux")" -ne "$expected" ]; then
    echo "fetch-debian-kernel: decompressed $(wc -c <"$work/vmlinux") bytes, the payload says $expected" >&2
    exit 1
fi
if [ "$(od -An -tx1 -N4 "$work/vmlinux" | tr -d ' \n')" != "7f454c46" ]; then
    echo "fetch-debian-kernel: the decompressed payload is not an ELF file" >&2
    exit 1
fi
mv "$work/vmlinux" "$cache/vmlinux"
echo "fetch-debian-kernel: $package -> $cache/vmlinuz ($(wc -c <"$cache/vmlinuz") bytes), $cache/vmlinux ($(wc -c <"$cache/vmlinux") bytes)"
