#!/bin/sh
# Runs inside the lab (busybox sh): a drill with the lab kernel tracing KVM's exits,
# stopped by the first shutdown exit (a guest's triple fault), and then the last
# events before it on each lab CPU. For chasing the triple faults of replicated guests
# (see docs/lab.md). Usage, from the repository:
#   tandem lab --timeout 900 --with scripts/lab-trace-triple-fault.sh -- \
#       sh /with/lab-trace-triple-fault.sh --kill-at 15000 --runs 12 --lines 30
T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
echo 4096 > $T/buffer_size_kb
for e in kvm_exit kvm_inj_exception kvm_page_fault kvm_userspace_exit; do
	echo 1 > $T/events/kvm/$e/enable || echo "no trace event kvm/$e"
done
# 127: SVM_EXIT_SHUTDOWN.
echo 'traceoff if exit_reason == 127' > $T/events/kvm/kvm_exit/trigger
echo 1 > $T/tracing_on

tandem drill --here --images /images "$@" > /tmp/drill.out 2>&1 &
drill=$!
shown=0
while kill -0 $drill 2>/dev/null; do
	sleep 5
	grep -E '^run [0-9]+:' /tmp/drill.out | tail -n +$((shown + 1))
	shown=$(grep -c -E '^run [0-9]+:' /tmp/drill.out)
	if [ "$(cat $T/tracing_on)" = 0 ]; then
		echo "=== a shutdown exit stopped the trace; the last events on each CPU:"
		for c in 0 1; do
			echo "--- lab CPU $c"
			tail -n 60 $T/per_cpu/cpu$c/trace
		done
		kill $drill
		exit 0
	fi
done
grep -E '^run [0-9]+:|^drill:' /tmp/drill.out | tail -n +$((shown + 1))
echo "no shutdown exit in this drill"
