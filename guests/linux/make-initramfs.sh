#!/bin/sh
# Packs a busybox initramfs (gzip-compressed newc cpio) whose /init mounts /proc, /sys
# and /dev and starts a shell on the console.
#
#   apt-get install busybox-static cpio
#   guests/linux/make-initramfs.sh [OUTPUT]   # default guests/linux/build/initramfs.cpio.gz
set -eu

here=$(cd "$(dirname "$0")" && pwd)
output="${1:-$here/build/initramfs.cpio.gz}"
busybox="${BUSYBOX:-/bin/busybox}"
if [ ! -x "$busybox" ]; then
    echo "make-initramfs: $busybox not found; install it with: apt-get install busybox-static cpio" >&2
    exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT INT TERM
mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/etc"
cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "swiftlet guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) CPU(s), $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
echo "Type 'reboot -f' to stop the VM (i8042 reset)."
exec setsid cttyhack sh
INIT
chmod +x "$root/init"
mkdir -p "$(dirname "$output")"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) >"$output"
echo "make-initramfs: $output ($(wc -c <"$output") bytes)"
