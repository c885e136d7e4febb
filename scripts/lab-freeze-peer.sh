#!/bin/sh
# Runs inside the lab (`tandem lab --with-qemu --timeout 600 --with
# scripts/lab-freeze-peer.sh [--with MICRO_GUEST_TEST_BINARY] -- sh
# /with/lab-freeze-peer.sh qemu|tandem`): creates and destroys KVM VMs in a loop while
# two pipelines keep both lab CPUs switching tasks, until the lab freezes (`tandem lab`
# then prints where its CPUs are and exits 125) or 2000 rounds pass.
# qemu:   QEMU with KVM, 2 vCPUs, which creates its VM and ends (no firmware in the
#         lab): the peer, no tandem code at all.
# tandem: the VMM's micro-guest tests (each creates a VM), one at a time.
(yes | cat >/dev/null) &
(yes | cat >/dev/null) &
i=0
start=$(date +%s)
while [ $i -lt 2000 ]; do
	i=$((i + 1))
	case "$1" in
	qemu) qemu-system-x86_64 -accel kvm -display none -nodefaults -smp 2 -kernel /nonexistent >/dev/null 2>&1 ;;
	tandem) /with/micro_guest-* --test-threads=1 -q >/dev/null 2>&1 ;;
	*) echo "usage: lab-freeze-peer.sh qemu|tandem"; exit 2 ;;
	esac
	[ $((i % 20)) = 0 ] && echo "round $i at $(($(date +%s) - start)) s"
done
echo "no freeze in $i rounds"
