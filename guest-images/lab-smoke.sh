#!/usr/bin/env bash
# Smoke test of the images: boots the lab host (QEMU TCG, emulated AMD-V) with
# lab-initrd.cpio.gz + lab-qemu.cpio.gz + a small cpio holding /lab/run, which
# boots the guest under QEMU microvm with -accel kvm inside the lab:
#   1. bzImage, ticker, tandem.ticks=5
#   2. vmlinux (PVH), dirty workload for 3 s
# Usage: guest-images/lab-smoke.sh [IMAGES_DIR]   (default: run build.sh)
# Exit status 0 when every expected marker was seen.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMG=${1:-$("$HERE/build.sh")}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

mkdir -p "$T/root/lab"
cat >"$T/root/lab/run" <<'EOF'
#!/bin/sh
[ -c /dev/kvm ] || { echo "no /dev/kvm"; exit 3; }
up() { cut -d' ' -f1 /proc/uptime; }
# stamp: prefixes each line with the lab's uptime
stamp() { while IFS= read -r l; do echo "[lab $(up)] $l"; done; }
QEMU="qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -display none -serial stdio -no-reboot"
echo "[lab $(up)] run 1: bzImage ticker"
{ timeout 300 $QEMU -kernel /images/vmlinuz -initrd /images/guest-initrd.cpio \
	-append "console=ttyS0 quiet panic=-1 initcall_blacklist=cmos_init tandem.workload=ticker tandem.ticks=5"; echo "qemu-rc=$?"; } 2>&1 | stamp
echo "[lab $(up)] run 2: vmlinux (PVH) dirty"
{ timeout 300 $QEMU -kernel /images/vmlinux -initrd /images/guest-initrd.cpio \
	-append "console=ttyS0 quiet panic=-1 initcall_blacklist=cmos_init tandem.workload=dirty tandem.dirty_mib=20 tandem.span_mib=32 tandem.seconds=3"; echo "qemu-rc=$?"; } 2>&1 | stamp
exit 0
EOF
chmod 0755 "$T/root/lab/run"
(cd "$T/root" && find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet) >"$T/test.cpio"
cat "$IMG/lab-initrd.cpio.gz" "$IMG/lab-qemu.cpio.gz" "$T/test.cpio" >"$T/initrd"

start=$(date +%s.%N)
elapsed() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
timeout 900 qemu-system-x86_64 -M pc -accel tcg -cpu EPYC,+svm -m 2048 -nodefaults \
	-no-user-config -display none -serial stdio -kernel "$IMG/vmlinuz" -initrd "$T/initrd" \
	-append "console=ttyS0 quiet panic=-1" -no-reboot 2>/dev/null </dev/null |
	while IFS= read -r l; do
		l=${l%$'\r'}
		echo "$l" >>"$T/log"
		printf '%6s %s\n' "$(elapsed)" "$l"
	done
echo "lab-smoke: wall $(elapsed) s"

ok=0
for want in '@@TANDEM-LAB-EXIT=0@@' 'tick 5 mono_ms=' 'dirty 3 pages=' 'TANDEM-GUEST-DONE rc=0' 'qemu-rc=0'; do
	grep -q -- "$want" "$T/log" || { echo "lab-smoke: missing '$want'"; ok=1; }
done
[ "$(grep -c 'TANDEM-GUEST-READY' "$T/log")" = 2 ] || { echo "lab-smoke: expected 2 guest boots"; ok=1; }
! grep -q 'check=BAD' "$T/log" || { echo "lab-smoke: dirty check failed"; ok=1; }
[ $ok = 0 ] && echo "lab-smoke: OK"
exit $ok
