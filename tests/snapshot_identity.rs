//! A restore rebuilds exactly the VM that was captured: capturing the restored VM again
//! gives the same state, component by component and page by page (`tandem inspect
//! --against`). In the lab, with a real Linux guest.

mod common;

use common::{lab, section};

/// Lab memory for runs that hold several full 256 MiB snapshots in the lab's RAM disk.
const LAB_MEM: &[&str] = &["--lab-mem-mib", "3072"];

/// Starts a restore of `chain`, paused, with control socket /tmp/ctl2, and waits until
/// it answers.
fn restore_paused(chain: &str) -> String {
    format!(
        "tandem restore --paused {chain} --control /tmp/ctl2 > /tmp/out2 2>&1 & pid=$!\n\
         n=0; while ! tandem ctl /tmp/ctl2 status >/dev/null 2>&1; do sleep 0.05; n=$((n+1)); [ $n -lt 1200 ] || exit 1; done\n"
    )
}

/// Asserts `tandem inspect --against` found the two snapshots identical.
fn assert_identical(run: &common::Run, name: &str) {
    let lines = section(run, name);
    assert!(
        lines.iter().any(|l| l.starts_with("identical: ")) && !lines.iter().any(|l| l.starts_with("differs")),
        "{name}: {lines:#?}\n{}",
        run.dump()
    );
}

#[test]
fn save_restore_save_gives_the_same_state_and_only_pages_the_guest_wrote_change() {
    let script = format!(
        "tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio --control /tmp/ctl \
         --append 'quiet tandem.workload=ticker tandem.ticks=300' > /tmp/out 2>&1 & pid=$!\n\
         while ! grep -q '^tick 10 ' /tmp/out; do sleep 0.1; done\n\
         tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/a && tandem ctl /tmp/ctl snapshot /tmp/a2 || exit 1\n\
         echo '=== twice while paused'; tandem inspect /tmp/a2 --against /tmp/a; rm /tmp/a2\n\
         kill -9 $pid; wait $pid\n\
         {restore}\
         tandem ctl /tmp/ctl2 snapshot /tmp/b || exit 1\n\
         echo '=== restored'; tandem inspect /tmp/b --against /tmp/a; rm /tmp/b\n\
         tandem ctl /tmp/ctl2 resume; sleep 1; tandem ctl /tmp/ctl2 pause || exit 1\n\
         tandem ctl /tmp/ctl2 snapshot /tmp/d --delta && tandem ctl /tmp/ctl2 snapshot /tmp/c || exit 1\n\
         echo '=== after running'; tandem inspect /tmp/c --against /tmp/a --written /tmp/d\n\
         tandem ctl /tmp/ctl2 resume; sleep 1; kill $pid\n\
         echo '=== console'; cat /tmp/out2\n",
        restore = restore_paused("--snapshot /tmp/a"),
    );
    lab(LAB_MEM, &["sh", "-c", &script], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        // Two captures of one paused VM agree (the capture itself changes nothing) ...
        assert_identical(run, "twice while paused");
        // ... and so does a capture of the restored VM before it runs: every register, MSR,
        // device and page came back as saved.
        assert_identical(run, "restored");
        // Once it has run, its registers and clock moved on, but memory differs only in the
        // pages the dirty log says the guest wrote.
        let after = section(run, "after running");
        assert!(!after.iter().any(|l| l.starts_with("differs: memory")), "{after:#?}");
        assert!(after.iter().any(|l| l.starts_with("differs: vcpu 0 regs")), "{after:#?}");
        let written: u64 = after
            .iter()
            .find_map(|l| l.split(" pages written by the guest").next()?.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{after:#?}"));
        assert!(written > 0, "{after:#?}");
        // And the restored guest ticked on after the snapshot's tick.
        let console = section(run, "console").join("\n");
        let ticks = common::ticks(&common::Run { code: 0, stdout: console, stderr: String::new() });
        assert!(ticks.first().is_some_and(|&t| t >= 10) && ticks.len() >= 5, "{ticks:?}\n{}", run.dump());
    });
}

#[test]
fn a_full_snapshot_and_three_deltas_restore_to_exactly_the_live_vm() {
    // The dirty workload rewrites a third of its 32 MiB every second, so the deltas
    // overlap: each page must come back from the last delta that holds it.
    let script = format!(
        "tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio --control /tmp/ctl \
         --append 'quiet tandem.workload=dirty tandem.dirty_mib=10 tandem.span_mib=32' > /tmp/out 2>&1 & pid=$!\n\
         while ! grep -q '^dirty 2 ' /tmp/out; do sleep 0.1; done\n\
         tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/s0 || exit 1\n\
         for i in 1 2 3; do tandem ctl /tmp/ctl resume; sleep 1; tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/s$i --delta || exit 1; done\n\
         tandem ctl /tmp/ctl snapshot /tmp/live || exit 1\n\
         kill -9 $pid; wait $pid\n\
         {restore}\
         tandem ctl /tmp/ctl2 snapshot /tmp/r || exit 1\n\
         echo '=== chain against live'; tandem inspect /tmp/r --against /tmp/live\n\
         tandem ctl /tmp/ctl2 resume; sleep 3; kill $pid\n\
         echo '=== console'; cat /tmp/out2\n",
        restore = restore_paused("--snapshot /tmp/s0 --delta /tmp/s1 --delta /tmp/s2 --delta /tmp/s3"),
    );
    lab(LAB_MEM, &["sh", "-c", &script], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        assert!(run.stdout.lines().filter(|l| l.contains("kind=delta")).count() == 3, "{}", run.dump());
        assert_identical(run, "chain against live");
        let console = section(run, "console");
        assert!(console.iter().any(|l| l.starts_with("dirty ") && l.contains("check=OK")), "{}", run.dump());
        assert!(!console.iter().any(|l| l.contains("check=BAD")), "{}", run.dump());
    });
}
