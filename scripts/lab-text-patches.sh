#!/bin/sh
# Runs its arguments inside the lab and then lists every live patch of kernel text the
# lab kernel made meanwhile, each with the stack that made it: what to look at when a
# lab run's report has kernel_text_patches above 0 (docs/lab.md, "What froze the lab").
# The command's own output goes to /tmp/cmd.out in the lab; its last lines are shown.
# Usage, from the repository:
#   tandem lab --timeout 400 --with scripts/lab-text-patches.sh -- sh /with/lab-text-patches.sh \
#       tandem drill --here --images /images --workload net --runs 1
P=/sys/kernel/tracing/instances/text-patches
[ -d $P ] || { echo "no $P: this lab counts no text patches"; exit 2; }
# Turning stacks on re-registers the tracer, a patch of its own: made and forgotten
# before the command starts.
echo 1 > $P/options/func_stack_trace
: > $P/trace
"$@" > /tmp/cmd.out 2>&1
echo "command exit $?; its last lines:"
tail -3 /tmp/cmd.out
echo "=== text patches while it ran"
grep -v '^#' $P/trace
exit 0
