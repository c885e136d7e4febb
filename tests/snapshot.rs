//! Snapshot and restore of a real Linux guest (in the lab), and refusal of bad snapshot
//! files (on the host).

mod common;

use common::{lab, tandem, ticks};

/// Marks where the killed VM's console ends and the restored one's begins.
const RESTORED: &str = "@@RESTORED@@";

/// The console as a user saw it: the killed VM's output, then the restored VM's output
/// appended byte for byte; and each of the two parts.
fn consoles(run: &common::Run) -> (String, String, String) {
    let rest = run.stdout.split_once("=== before\n").map(|(_, r)| r);
    let (before, after) = rest
        .and_then(|r| r.split_once(RESTORED))
        .unwrap_or_else(|| panic!("no console sections\n{}", run.dump()));
    (format!("{before}{after}"), before.to_string(), after.to_string())
}

/// A ticker without end: however long the snapshots take on a slow host, the guest
/// cannot run out of ticks before the restore.
const TICKER: &str = "quiet tandem.workload=ticker";

/// How long the restored VM runs.
enum Until {
    /// Until its console has this many ticks, then it is killed (`restore-running`
    /// says it was still running then).
    Ticks(u32),
    /// Until the guest ends (`restore-exit=N`).
    Exit,
}

/// Runs a guest with a control socket and `append`ed kernel arguments; once its output
/// has a line starting with `wait_for`, takes a full snapshot and `deltas` more (each half a
/// second apart), all while paused, kills the VM with SIGKILL and restores the chain in
/// a new process, which runs `until`. Prints `=== before`, the old VM's console,
/// [`RESTORED`] right after its last byte (a pause can fall in the middle of a line),
/// then the new VM's console (ending `<END>`, so that a line the kill cut short does
/// not read as a tick).
fn snapshot_kill_restore(run_args: &str, append: &str, wait_for: &str, deltas: usize, until: Until, check: impl Fn(&common::Run)) {
    let mut script = format!(
        "tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio --control /tmp/ctl {run_args} \
         --append '{append}' > /tmp/out 2>&1 & pid=$!\n\
         while ! grep -q '^{wait_for}' /tmp/out; do sleep 0.1; done\n\
         tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/s0 || exit 1\n",
    );
    let mut chain = String::from("--snapshot /tmp/s0");
    for i in 1..=deltas {
        script.push_str(&format!(
            "tandem ctl /tmp/ctl resume; sleep 0.5; tandem ctl /tmp/ctl pause && tandem ctl /tmp/ctl snapshot /tmp/s{i} --delta || exit 1\n"
        ));
        chain.push_str(&format!(" --delta /tmp/s{i}"));
    }
    // /tmp/after is made before the restore starts: its background job may open it after
    // the loop below first counts ticks there, and a count of nothing ended the wait.
    script.push_str(&format!("kill -9 $pid; wait $pid\n: > /tmp/after\ntandem restore {chain} > /tmp/after 2>&1 & r=$!\n"));
    script.push_str(&match until {
        Until::Ticks(n) => format!(
            "i=0; while [ $(grep -c '^tick ' /tmp/after) -le {n} ] && kill -0 $r 2>/dev/null && [ $i -lt 900 ]; do i=$((i+1)); sleep 0.1; done\n\
             kill -0 $r 2>/dev/null && echo restore-running; kill -9 $r; wait $r\n\
             echo '=== before'; cat /tmp/out; printf '{RESTORED}'; cat /tmp/after; echo '<END>'\n"
        ),
        Until::Exit => format!(
            "wait $r; rc=$?\necho '=== before'; cat /tmp/out; printf '{RESTORED}'; cat /tmp/after; echo; echo restore-exit=$rc\n"
        ),
    });
    lab(&[], &["sh", "-c", &script], check);
}

/// Ticks the restored guest prints before it is killed.
const TICKS_AFTER: u32 = 20;

fn check_continuity(run: &common::Run) {
    assert_eq!(run.code, 0, "{}", run.dump());
    let (joined, before, after) = consoles(run);
    let text = |t: &str| common::Run { code: 0, stdout: t.into(), stderr: String::new() };
    // The old console ended at tick 15 or later. A pause may cut a line short, and the
    // restored guest then finishes that very line: only the old console's whole lines
    // count here ("tick 5" cut from "tick 51" is not tick 5).
    let whole = &before[..before.rfind('\n').map_or(0, |i| i + 1)];
    let last_before = *ticks(&text(whole)).last().unwrap_or_else(|| panic!("no ticks before the snapshot\n{}", run.dump()));
    assert!(last_before >= 15, "{}", run.dump());
    // What the user saw is one sequence, every tick exactly once, and the restored
    // guest printed the rest of it, still running when it was stopped.
    let all = ticks(&text(&joined));
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>(), "console across the restore\n{}", run.dump());
    assert!(ticks(&text(&after)).len() >= TICKS_AFTER as usize, "{}", run.dump());
    assert!(run.says("restore-running"), "{}", run.dump());
    assert!(!run.stdout.contains("TANDEM-CLOCK-BACKWARDS"), "{}", run.dump());
    // The guest's own clock keeps the pace once the restore's start-up is behind it.
    let mono: Vec<u64> = after
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split("mono_ms=").nth(1)?.trim().parse().ok())
        .collect();
    assert!(mono.len() > 6, "only {} ticks with a clock reading after the restore\n{}", mono.len(), run.dump());
    let steady = &mono[5..];
    let span = steady.last().unwrap() - steady[0];
    let per_tick = span as f64 / (steady.len() - 1) as f64;
    assert!((90.0..=110.0).contains(&per_tick), "guest clock per tick after restore: {per_tick} ms\n{}", run.dump());
}

#[test]
fn a_full_snapshot_restored_in_a_new_process_continues_the_ticks() {
    snapshot_kill_restore("", TICKER, "tick 15 ", 0, Until::Ticks(TICKS_AFTER), check_continuity);
}

#[test]
fn a_full_snapshot_and_three_deltas_restore_to_the_last_delta() {
    snapshot_kill_restore("", TICKER, "tick 15 ", 3, Until::Ticks(TICKS_AFTER), check_continuity);
}

#[test]
fn a_two_vcpu_guest_restores_and_continues_the_ticks() {
    snapshot_kill_restore("--vcpus 2", TICKER, "tick 15 ", 0, Until::Ticks(TICKS_AFTER), |run| {
        assert!(run.stdout.contains("TANDEM-GUEST-CPUS=2"), "{}", run.dump());
        check_continuity(run);
    });
}

/// The seconds and memory checks the dirty workload printed, as (second, check passed).
fn dirty_checks(text: &str) -> Vec<(u64, bool)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("dirty "))
        .filter_map(|rest| {
            let second = rest.split_whitespace().next()?.parse().ok()?;
            Some((second, rest.contains("check=OK")))
        })
        .collect()
}

#[test]
fn a_guest_dirtying_memory_finds_all_of_it_intact_after_restore_from_deltas() {
    // 10 MiB/s over a 32 MiB span: every second rewrites a third of it, and every second
    // the guest checks the whole span against what it wrote.
    let check = |run: &common::Run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        let (joined, before, after) = consoles(run);
        assert!(dirty_checks(&before).last().is_some_and(|(s, _)| *s >= 3), "{}", run.dump());
        assert!(dirty_checks(&after).last() == Some(&(12, true)), "{}", run.dump());
        // Across the restore, every second is reported once and every check of the whole
        // span passed.
        let all = dirty_checks(&joined);
        let seconds: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        assert_eq!(seconds, (1..=12).collect::<Vec<_>>(), "{}", run.dump());
        assert!(all.iter().all(|(_, ok)| *ok), "memory check failed\n{}", run.dump());
        assert!(run.stdout.contains("TANDEM-GUEST-DONE rc=0") && run.stdout.contains("restore-exit=0"), "{}", run.dump());
    };
    snapshot_kill_restore(
        "",
        "quiet tandem.workload=dirty tandem.dirty_mib=10 tandem.span_mib=32 tandem.seconds=12",
        "dirty 3 ",
        2,
        Until::Exit,
        check,
    );
}

/// Writes `bytes` to a fresh file and asks `tandem restore` to use it.
fn restore_file(name: &str, bytes: &[u8]) -> common::Run {
    let path = std::env::temp_dir().join(format!("tandem-test-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let run = tandem(&["restore", "--snapshot", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    run
}

use common::assert_refused as refused;

#[test]
fn bad_snapshot_files_are_refused_with_one_line() {
    use tandem_vmm::snapshot::format::{self, Kind};
    let mut good = Vec::new();
    format::write(&mut good, Kind::Full, &[b"not a machine state"]).unwrap();

    refused(&restore_file("empty", b""), "is truncated");
    refused(&restore_file("text", b"hello, this is not a snapshot at all"), "not a tandem snapshot");
    refused(&restore_file("truncated", &good[..good.len() - 3]), "is truncated");
    let mut flipped = good.clone();
    flipped[30] ^= 0x10;
    refused(&restore_file("flipped", &flipped), "checksum mismatch");
    let mut version = good.clone();
    version[8] = 9;
    refused(&restore_file("version", &version), "format version 9 is not supported");
    let mut huge = good.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&restore_file("huge", &huge), "exceeds the limit");
    refused(&restore_file("garbage-state", &good), "corrupt snapshot");
    let run = tandem(&["restore", "--snapshot", "/nonexistent/snap"]);
    refused(&run, "cannot open snapshot /nonexistent/snap");
}

#[test]
fn ctl_without_a_vm_says_so() {
    let run = tandem(&["ctl", "/nonexistent/ctl", "status"]);
    refused(&run, "cannot reach the VM's control socket /nonexistent/ctl");
}
