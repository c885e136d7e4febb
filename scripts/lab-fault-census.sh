#!/bin/sh
# Runs inside the lab (busybox sh): counts how boots of the same ticker guest end,
# three ways, interleaved round by round so drift in the lab hits all alike:
#   solo     tandem run, unreplicated
#   repl     tandem primary + tandem standby on loopback, no kill
#   qemu     QEMU with KVM (-M microvm), stopped and continued ~40 times a second
#            under a migration that keeps dirty logging on all run long
#   qemu-dr  the same QEMU, stopped and continued ~40 times a second, measuring its
#            dirty rate by bitmap over and over (each measurement syncs and so
#            write-protects the pages the guest dirtied, as an epoch does)
#   pause-nothing, pause-state, pause-dirty-log, pause-capture
#            tandem run, paused 40 times a second as a primary's epochs would pause
#            it, doing that much of an epoch's work at each pause (the bisection)
# A triple fault is KVM's shutdown exit as the lab kernel's tracepoint counts it
# (`tandem lab` sets that up), the same measure for tandem and for QEMU.
# Usage, from the repository (docs/lab.md):
#   tandem lab --with-qemu --timeout 3000 --with scripts/lab-fault-census.sh -- \
#       sh /with/lab-fault-census.sh ROUNDS [TICKS] [ARMS]
ROUNDS=${1:-20}
TICKS=${2:-30}
ARMS=${3:-solo repl qemu}
T=/sys/kernel/tracing
G="--kernel /images/vmlinuz --initrd /images/guest-initrd.cpio"
W="tandem.workload=ticker tandem.ticks=$TICKS"
shutdowns() { grep -c kvm_exit $T/trace; }
# judge ARM ROUND BEFORE CONSOLE [EXTRA]: one result line from the console and the
# lab kernel's count of shutdown exits since BEFORE.
judge() {
	tf=$(( $(shutdowns) - $3 ))
	if [ "$tf" -gt 0 ]; then r=triple_fault
	elif grep -q "tick $TICKS " "$4" && grep -q 'TANDEM-GUEST-DONE rc=0' "$4"; then r=ok
	elif ! grep -q . "$4"; then r=silent
	else r=other; fi
	echo "census: arm=$1 round=$2 result=$r $5"
}
tandem keygen --out /tmp/pk >/dev/null && tandem keygen --out /tmp/sk >/dev/null || exit 1
arm_solo() {
	b=$(shutdowns)
	timeout 120 tandem run $G --append "$W" >/tmp/solo.out 2>/tmp/solo.err
	se=$?
	judge solo $i $b /tmp/solo.out "exit=$se"
	if [ "$r" != ok ]; then
		echo "census: --- console, last 8 lines"; tail -n 8 /tmp/solo.out
		echo "census: --- stderr"; tail -n 5 /tmp/solo.err
	fi
}
arm_repl() {
	b=$(shutdowns)
	rm -rf /tmp/ss /tmp/s.ev /tmp/p.ev
	tandem standby --listen 127.0.0.1:$((7000 + i)) --key /tmp/sk/key.pem --peer-cert /tmp/pk/cert.pem \
		--state-dir /tmp/ss --timeout-ms 3000 --events /tmp/s.ev >/tmp/s.out 2>/tmp/s.err &
	s=$!
	n=0; while ! grep -q standing_by /tmp/s.ev 2>/dev/null && [ $n -lt 300 ]; do n=$((n+1)); sleep 0.1; done
	timeout 180 tandem primary --standby 127.0.0.1:$((7000 + i)) --key /tmp/pk/key.pem --peer-cert /tmp/sk/cert.pem \
		--timeout-ms 3000 --events /tmp/p.ev $G --append "$W" >/tmp/p.out 2>/tmp/p.err
	pe=$?
	n=0; while kill -0 $s 2>/dev/null && [ $n -lt 100 ]; do n=$((n+1)); sleep 0.1; done
	kill -9 $s 2>/dev/null; wait $s 2>/dev/null
	tk=no; grep -q took_over /tmp/s.ev && tk=yes
	judge repl $i $b /tmp/p.out "exit=$pe standby_took_over=$tk"
	if [ "$r" != ok ]; then
		echo "census: --- primary events, last 5"; tail -n 5 /tmp/p.ev
		echo "census: --- standby events, last 5"; tail -n 5 /tmp/s.ev
		echo "census: --- primary log, last 15"; tail -n 15 /tmp/p.err
		echo "census: --- standby log, last 10"; tail -n 10 /tmp/s.err
	fi
}
arm_qemu() {
	b=$(shutdowns)
	rm -f /tmp/q.out
	{
		echo '{"execute":"qmp_capabilities"}'
		if [ "$1" = qemu ]; then
			echo '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1048576}}'
			echo '{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null"}}'
		fi
		k=0
		while [ $k -lt 4000 ] && ! grep -q 'TANDEM-GUEST-DONE' /tmp/q.out 2>/dev/null; do
			echo '{"execute":"stop"}'; sleep 0.012
			echo '{"execute":"cont"}'
			[ "$1" = qemu-dr ] && echo '{"execute":"calc-dirty-rate","arguments":{"calc-time":20,"calc-time-unit":"millisecond","mode":"dirty-bitmap"}}'
			sleep 0.012
			k=$((k+1))
		done
		echo '{"execute":"quit"}'
	} | timeout 180 qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config \
		-display none -serial file:/tmp/q.out -qmp stdio -no-reboot \
		-kernel /images/vmlinuz -initrd /images/guest-initrd.cpio \
		-append "console=ttyS0 quiet reboot=k panic=1 pci=off initcall_blacklist=cmos_init $W" >/tmp/q.qmp 2>&1
	qe=$?
	judge $1 $i $b /tmp/q.out "exit=$qe stops=$(grep -c '"STOP"' /tmp/q.qmp) qmp_errors=$(grep -c '"error"' /tmp/q.qmp)"
	if [ "$r" != ok ]; then
		echo "census: --- console, last 8 lines"; tail -n 8 /tmp/q.out
		echo "census: --- QMP events"; grep -v '"return"' /tmp/q.qmp | grep -v '"STOP"\|"RESUME"' | tail -n 5
	fi
}
arm_pace() {
	b=$(shutdowns)
	timeout 120 tandem run $G --debug-pause-hz 40 --debug-pause-work ${1#pause-} --append "$W" >/tmp/pace.out 2>/tmp/pace.err
	pe=$?
	judge $1 $i $b /tmp/pace.out "exit=$pe"
	if [ "$r" != ok ]; then
		echo "census: --- console, last 8 lines"; tail -n 8 /tmp/pace.out
		echo "census: --- stderr"; tail -n 5 /tmp/pace.err
	fi
}
i=1
while [ $i -le $ROUNDS ]; do
	for arm in $ARMS; do
		case $arm in
		solo) arm_solo ;;
		repl) arm_repl ;;
		qemu|qemu-dr) arm_qemu $arm ;;
		pause-*) arm_pace $arm ;;
		*) echo "census: unknown arm $arm"; exit 2 ;;
		esac
	done
	i=$((i+1))
done
echo "census: done"
