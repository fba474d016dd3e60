#!/usr/bin/env bash
# bench/disk-image.sh: `swiftlet image convert` against `qemu-img convert -O raw`, side by side
# in one run, on the same 1 GiB images: fully allocated, sparse, compressed, and the top of a
# backing chain of depth 3, each to a new output file and over an existing one. Also the in-process
# cost of a 4 KiB random read through the L2 cache.
#
# Self-contained: builds a release swiftlet with its own scratch path, makes the images in a
# temporary folder with qemu-img/qemu-io (Debian: qemu-utils), and removes them afterwards.
# CPU times come from GNU time (Debian: time).
#
#   bash bench/disk-image.sh            # 5 repetitions, best time of each reported
#   REPS=5 SIZE=2G bash bench/disk-image.sh
#
# Timings are warm-cache (the images are read from the page cache), best of REPS, both wall-clock
# and CPU (user + system over all threads, which background load disturbs less); the two tools
# alternate repetition by repetition so background load hits both alike.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${REPS:-5}
SIZE=${SIZE:-1G}
SCRATCH=${SWIFTLET_BENCH_SCRATCH:-$ROOT/.build-bench-disk-static}

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "disk-image.sh: $tool not found (apt-get install qemu-utils)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "disk-image.sh: /usr/bin/time not found (apt-get install time)" >&2; exit 1; }

# The Swift standard library is linked statically: it saves ~10 ms of dynamic loading per run,
# which is most of the time on the sparse image (qemu-img is C and starts in a few ms).
echo "== building swiftlet (release, static Swift stdlib, scratch $SCRATCH)"
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product swiftlet >/dev/null
SWIFTLET="$SCRATCH/release/swiftlet"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/swiftlet-disk-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

if [ -n "${BENCH_IMAGES:-}" ]; then
    # Reuse images made by an earlier run (kept in that folder): BENCH_IMAGES=/path bash bench/disk-image.sh
    for name in full sparse compressed chain; do ln -s "$BENCH_IMAGES/$name.qcow2" .; done
    ln -s "$BENCH_IMAGES/base.qcow2" "$BENCH_IMAGES/mid.qcow2" .
else
    echo "== making $SIZE images in $WORK"
    bytes=$(numfmt --from=iec "$SIZE")
    # Incompressible data for the allocated image and the chain's base.
    head -c "$bytes" /dev/urandom > random.raw
    # Text-like data that deflate shrinks about 3x, for the compressed image.
    (seq 1 1000000000 || true) | head -c "$bytes" > text.raw

    qemu-img convert -O qcow2 random.raw full.qcow2
    qemu-img convert -c -O qcow2 -m 16 text.raw compressed.qcow2
    qemu-img create -q -f qcow2 sparse.qcow2 "$SIZE"
    args=()
    for ((i = 0; i < 64; i++)); do args+=(-c "write -P $((i + 1)) $((i * bytes / 64)) 64k"); done
    qemu-io -f qcow2 "${args[@]}" sparse.qcow2 >/dev/null
    # Chain: base (all data) <- mid (an eighth rewritten) <- top (another eighth rewritten).
    qemu-img convert -O qcow2 random.raw base.qcow2
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    qemu-io -f qcow2 -c "write -P 0x11 $((bytes / 4)) $((bytes / 8))" mid.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain.qcow2
    qemu-io -f qcow2 -c "write -P 0x22 $((bytes * 5 / 8)) $((bytes / 8))" chain.qcow2 >/dev/null
    rm -f random.raw text.raw
fi

# One timed run: prints "real cpu" (cpu = user + system, summed over all threads).
timed() {
    local t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o time.out "$@" >/dev/null
    local t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" '{printf "%.4f %.2f\n", b - a, $1 + $2}' time.out
}
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? a : b }'; }

load_before=$(cut -d' ' -f1 /proc/loadavg)
images=(full sparse compressed chain)
# Two cases per image: a new output file (removed before each run, outside the timing), and an
# existing one: the same command run again over the output of its previous run, as a user re-running
# a conversion does (qemu-img truncates the old file; Swiftlet overwrites it in place).
declare -A qr qc sr sc qre qce sre sce
for name in "${images[@]}"; do
    # Byte-identical check first.
    qemu-img convert -O raw "$name.qcow2" q.raw
    "$SWIFTLET" image convert "$name.qcow2" s.raw
    cmp -s q.raw s.raw || { echo "disk-image.sh: $name: outputs differ" >&2; exit 1; }
    "$SWIFTLET" image convert "$name.qcow2" q.raw   # Over an existing file (qemu-img's output).
    cmp -s q.raw s.raw || { echo "disk-image.sh: $name: output over an existing file differs" >&2; exit 1; }
    rm -f q.raw s.raw
    qr[$name]=999 qc[$name]=999 sr[$name]=999 sc[$name]=999
    qre[$name]=999 qce[$name]=999 sre[$name]=999 sce[$name]=999
    for ((r = 0; r < REPS; r++)); do
        rm -f q.raw s.raw
        read -r real cpu < <(timed qemu-img convert -O raw "$name.qcow2" q.raw)
        qr[$name]=$(min "${qr[$name]}" "$real"); qc[$name]=$(min "${qc[$name]}" "$cpu")
        read -r real cpu < <(timed "$SWIFTLET" image convert "$name.qcow2" s.raw)
        sr[$name]=$(min "${sr[$name]}" "$real"); sc[$name]=$(min "${sc[$name]}" "$cpu")
        read -r real cpu < <(timed qemu-img convert -O raw "$name.qcow2" q.raw)
        qre[$name]=$(min "${qre[$name]}" "$real"); qce[$name]=$(min "${qce[$name]}" "$cpu")
        read -r real cpu < <(timed "$SWIFTLET" image convert "$name.qcow2" s.raw)
        sre[$name]=$(min "${sre[$name]}" "$real"); sce[$name]=$(min "${sce[$name]}" "$cpu")
    done
    rm -f q.raw s.raw
done
load_after=$(cut -d' ' -f1 /proc/loadavg)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
table() {  # table TITLE qemu-real ours-real qemu-cpu ours-cpu (names of the arrays)
    local -n q_r=$2 s_r=$3 q_c=$4 s_c=$5
    echo
    echo "== $1"
    printf '%-12s %10s %10s %7s   %10s %10s %7s\n' image "qemu real" "ours real" ratio "qemu cpu" "ours cpu" ratio
    for name in "${images[@]}"; do
        printf '%-12s %10.4f %10.4f %7s   %10.2f %10.2f %7s\n' "$name" \
            "${q_r[$name]}" "${s_r[$name]}" "$(ratio "${q_r[$name]}" "${s_r[$name]}")" \
            "${q_c[$name]}" "${s_c[$name]}" "$(ratio "${q_c[$name]}" "${s_c[$name]}")"
    done
}
echo
echo "convert to raw, $SIZE virtual, best of $REPS; seconds (ratio = qemu-img / swiftlet, > 1: swiftlet is faster)"
echo "load average before/after: $load_before / $load_after on $(nproc) cores"
table "to a new output file" qr sr qc sc
table "over an existing output file (the previous run's)" qre sre qce sce

echo
echo "== 4 KiB random reads through the L2 cache (in process, warm)"
for name in full chain compressed; do
    printf '%-12s ' "$name"
    # A compressed cluster is inflated whole for each 4 KiB read, so fewer reads there.
    reads=200000; [ "$name" = compressed ] && reads=5000
    "$SWIFTLET" image read-bench --reads "$reads" "$name.qcow2"
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
echo "qemu-img: $(qemu-img --version | head -1)"
