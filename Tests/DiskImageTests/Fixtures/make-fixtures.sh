#!/bin/sh
# Regenerates the qcow2 fixture images used by DiskImageTests, with qemu-img and qemu-io
# (Debian: qemu-utils). Each image is small (tens to a few hundred KiB) and covers one
# corner of the format's option space. Run from anywhere: ./make-fixtures.sh
#
# The tests never hard-code the expected contents: they compare Swiftlet's reads against
# `qemu-img convert -O raw` of the same file, so regenerating (even with different data)
# keeps them valid.
set -eu
cd "$(dirname "$0")"
command -v qemu-img >/dev/null || { echo "make-fixtures.sh: qemu-img not found (apt-get install qemu-utils)" >&2; exit 1; }

rm -f ./*.qcow2 ./*.raw
io() { fmt=$1; shift; qemu-io -f "$fmt" "$@" >/dev/null || { echo "qemu-io failed: $*" >&2; exit 1; }; }
mk() { qemu-img create -q -f qcow2 "$@"; }

# 512 KiB of varied but compressible bytes, the source for compressed images.
seq 1 200000 | head -c 524288 > source.raw

# Version 3, default 64 KiB clusters: data, a plain zero cluster, and an allocated zero cluster.
mk v3-c64k.qcow2 4M
io qcow2 -c "write -P 0x11 0 64k" -c "write -P 0x22 64k 4k" -c "write -z 2M 64k" \
    -c "write -P 0x33 3M 64k" -c "write -z 3M 64k" v3-c64k.qcow2

# Version 2 (compat 0.10), 4 KiB clusters.
mk -o compat=0.10,cluster_size=4k v2-c4k.qcow2 2M
io qcow2 -c "write -P 0x44 0 12k" -c "write -P 0x45 1000 3000" -c "write -P 0x46 1536k 8k" v2-c4k.qcow2

# The smallest cluster size, 512 bytes, with writes crossing cluster boundaries.
mk -o cluster_size=512 c512.qcow2 1M
io qcow2 -c "write -P 0x51 100 5000" -c "write -P 0x52 700k 1536" -c "write -z 900k 4k" c512.qcow2

# Every refcount width (refcount_order 0 to 6).
for bits in 1 2 4 8 32 64; do
    mk -o cluster_size=4k,refcount_bits=$bits refcount$bits.qcow2 1M
    io qcow2 -c "write -P $bits 8k 12k" -c "write -P 0x70 600k 4k" refcount$bits.qcow2
done

# Compressed clusters: deflate with 16 KiB and 64 KiB clusters, zstd with 16 KiB.
qemu-img convert -q -c -O qcow2 -o cluster_size=16k source.raw comp-zlib-c16k.qcow2
qemu-img convert -q -c -O qcow2 source.raw comp-zlib-c64k.qcow2
qemu-img convert -q -c -O qcow2 -o cluster_size=16k,compression_type=zstd source.raw comp-zstd-c16k.qcow2
# A compressed image that was then partly overwritten.
cp comp-zlib-c16k.qcow2 comp-rewritten.qcow2
io qcow2 -c "write -P 0x77 20k 4k" -c "write -z 64k 16k" comp-rewritten.qcow2

# Extended L2 entries (32 subclusters per cluster), with and without a backing image.
mk -o cluster_size=32k,extended_l2=on ext-l2.qcow2 2M
io qcow2 -c "write -P 0x81 0 1k" -c "write -P 0x82 5k 3k" -c "write -z 40k 2k" \
    -c "write -P 0x83 64k 32k" -c "write -z 70k 1k" ext-l2.qcow2

# A backing chain of depth 3: raw base, qcow2 middle, qcow2 top (larger than its backing).
# Names are relative, so they resolve against this folder.
qemu-img create -q -f raw base.raw 512k
io raw -c "write -P 0x91 0 512k" -c "write -P 0x92 100k 4k" base.raw
mk -o cluster_size=4k -b base.raw -F raw mid.qcow2 1M
io qcow2 -c "write -P 0xa1 4k 4k" -c "write -z 64k 8k" -c "write -P 0xa2 510k 4k" mid.qcow2
mk -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 2M
io qcow2 -c "write -P 0xb1 8k 4k" -c "write -P 0xb2 1500k 4k" -c "write -P 0xb3 100k 100" top.qcow2
mk -o cluster_size=32k,extended_l2=on -b base.raw -F raw ext-l2-overlay.qcow2 1M
io qcow2 -c "write -P 0xc1 2k 2k" -c "write -z 36k 1k" ext-l2-overlay.qcow2

# Internal snapshots.
mk -o cluster_size=4k snapshots.qcow2 1M
io qcow2 -c "write -P 0xd1 0 8k" snapshots.qcow2
qemu-img snapshot -c first snapshots.qcow2
io qcow2 -c "write -P 0xd2 0 4k" -c "write -P 0xd3 512k 4k" snapshots.qcow2
qemu-img snapshot -c second snapshots.qcow2
io qcow2 -c "write -P 0xd4 4k 4k" snapshots.qcow2

# Lazy refcounts (a compatible feature bit).
mk -o cluster_size=4k,lazy_refcounts=on lazy.qcow2 1M
io qcow2 -c "write -P 0xe1 0 4k" lazy.qcow2

# A persistent dirty bitmap (autoclear feature, bitmaps extension), with writes before and after.
mk -o cluster_size=4k bitmaps.qcow2 1M
io qcow2 -c "write -P 0xf1 0 64k" bitmaps.qcow2
qemu-img bitmap --add bitmaps.qcow2 backup0
io qcow2 -c "write -P 0xf2 128k 64k" bitmaps.qcow2

rm -f source.raw
ls -l
