#!/bin/sh
# Time to tick 1 (guest CLOCK_MONOTONIC ms): QEMU alone and QEMU with dirty logging on
# from its start (a migration at 1 MB/s, which never finishes), beside tandem alone and
# tandem harvesting its dirty log 1 and 10 times a second, in one lab.
# Usage, from the repository (docs/lab.md, "What dirty logging alone costs a boot"):
#   tandem lab --with-qemu --timeout 1500 --with scripts/lab-dirty-log-cost.sh -- sh /with/lab-dirty-log-cost.sh
G="--kernel /images/vmlinuz --initrd /images/guest-initrd.cpio"
W="quiet tandem.workload=ticker tandem.ticks=3"
qemu_arm() {
	rm -f /tmp/q.out
	{
		echo '{"execute":"qmp_capabilities"}'
		if [ "$1" = mig ]; then
			echo '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1048576}}'
			echo '{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null"}}'
		fi
		k=0
		while [ $k -lt 1200 ] && ! grep -q 'TANDEM-GUEST-DONE' /tmp/q.out 2>/dev/null; do sleep 0.1; k=$((k+1)); done
		echo '{"execute":"quit"}'
	} | timeout 150 qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config \
		-display none -serial file:/tmp/q.out -qmp stdio -no-reboot \
		-kernel /images/vmlinuz -initrd /images/guest-initrd.cpio \
		-append "console=ttyS0 quiet reboot=k panic=1 pci=off initcall_blacklist=cmos_init $W" >/tmp/q.qmp 2>&1
	echo "qhz: round=$round arm=qemu-$1 $(grep -m1 '^tick 1 ' /tmp/q.out) migration_errors=$(grep -c '"error"' /tmp/q.qmp)"
}
for round in 1 2 3; do
	qemu_arm solo
	qemu_arm mig
	timeout 120 tandem run $G --append "$W" >/tmp/o 2>/tmp/e
	echo "qhz: round=$round arm=tandem-solo $(grep -m1 '^tick 1 ' /tmp/o)"
	for hz in 1 10; do
		timeout 120 tandem run $G --debug-pause-hz $hz --debug-pause-work dirty-log --append "$W" >/tmp/o 2>/tmp/e
		echo "qhz: round=$round arm=tandem-$hz-hz $(grep -m1 '^tick 1 ' /tmp/o)"
	done
done
