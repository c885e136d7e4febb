//! Replication of a real Linux guest in the lab: a primary and a standby as two
//! processes over loopback QUIC. The primary is killed at many moments and the
//! console must continue on the standby with no line lost or repeated; the standby is
//! killed and the primary must follow its policy; a corrupted frame must be caught.

mod common;

use common::{lab, lab_ready, retry_lab_faults, tandem, Run};

/// Runs `tandem drill ARGS --show-consoles` (it starts its own lab), again if the lab
/// itself crashed (see `retry_lab_faults`), or if a run's guest never printed a byte
/// on either host: the lab's start-up hang (see `common::lab`), which the standby
/// inherits with the VM. Up to 3 attempts, each failed one printed; a tandem that
/// silences its guests fails them all.
fn drill(args: &[&str]) -> Run {
    let attempt = || {
        retry_lab_faults(|| {
            let _lab = lab_ready();
            let mut all = vec!["drill", "--show-consoles"];
            all.extend_from_slice(args);
            tandem(&all)
        })
    };
    let mut run = attempt();
    for n in 2..=3 {
        if !run.says("the guest printed nothing at all, on either host") {
            break;
        }
        eprintln!("drill attempt {} met a guest that never printed, trying again:\n{}", n - 1, run.dump());
        run = attempt();
    }
    run
}

/// One run's section of the drill's output.
fn section<'a>(run: &'a Run, n: u32, what: &str) -> &'a str {
    let start = format!("=== run {n} {what}\n");
    let from = run.stdout.find(&start).unwrap_or_else(|| panic!("no {start:?}\n{}", run.dump())) + start.len();
    let rest = &run.stdout[from..];
    &rest[..rest.find("\n=== run ").unwrap_or(rest.len())]
}

/// Numbered lines (`tick N` or `dirty N`) of a console.
fn numbers(text: &str, prefix: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()).collect()
}

/// Checks run `n` of a drill on its consoles: the primary's released console and the
/// standby's, joined byte for byte, count 1..=lines exactly once, and the standby's
/// guest finished. Returns how many lines came from the primary.
fn assert_continuity(run: &Run, n: u32, prefix: &str, lines: u32) -> usize {
    let primary = section(run, n, "primary console");
    let standby = section(run, n, "standby console");
    let joined = format!("{primary}{standby}");
    assert_eq!(numbers(&joined, prefix), (1..=lines).collect::<Vec<_>>(), "run {n}: the console across the takeover\n{}", run.dump());
    assert!(standby.contains("TANDEM-GUEST-DONE rc=0"), "run {n}: the standby's guest did not finish\n{}", run.dump());
    assert!(!joined.contains("check=BAD") && !joined.contains("TANDEM-CLOCK-BACKWARDS"), "run {n}\n{}", run.dump());
    numbers(primary, prefix).len()
}

/// Kills at moments spread over the guest's boot and ticking (ms after the standby
/// first holds an epoch, or in the middle of an epoch's transfer), checked run by run;
/// returns how many ticks each run's primary released.
fn kills(list: &str) -> Vec<usize> {
    let runs = list.split(',').count() as u32;
    let run = drill(&["--kill-at", list, "--runs", &runs.to_string(), "--lines", "80"]);
    let from_primary = (1..=runs).map(|n| assert_continuity(&run, n, "tick ", 80)).collect();
    for n in 1..=runs {
        assert!(section(&run, n, "standby log").contains("took over as primary: generation=2"), "run {n}\n{}", run.dump());
    }
    assert!(run.stdout.contains(&format!("drill: {runs}/{runs} runs kept continuity")), "{}", run.dump());
    assert_eq!(run.code, 0, "{}", run.dump());
    from_primary
}

#[test]
fn the_console_continues_on_the_standby_when_the_primary_is_killed_early() {
    // Right after the first commit, in the middle of a large epoch early in the boot,
    // and while the standby is still catching up with the boot.
    let from_primary = kills("0,mid-epoch,1000,2000,3000");
    assert!(from_primary.iter().all(|&p| p < 80), "{from_primary:?}");
}

#[test]
fn the_console_continues_on_the_standby_when_the_primary_is_killed_while_the_guest_ticks() {
    // Later: while the guest prints, and in the middle of an epoch then.
    let from_primary = kills("6000,9000,12000,15000,mid-epoch:90");
    // Some of the ticks came from the primary and the rest from the standby.
    assert!(from_primary.iter().any(|&p| p > 0), "{from_primary:?}");
}

#[test]
fn a_primary_killed_during_the_initial_sync_is_not_taken_over_and_nothing_is_released() {
    let run = drill(&["--kill-at", "initial-sync", "--runs", "1"]);
    assert!(section(&run, 1, "primary console").trim().is_empty(), "{}", run.dump());
    assert!(section(&run, 1, "standby console").trim().is_empty(), "{}", run.dump());
    assert!(section(&run, 1, "standby log").contains("not promoting"), "{}", run.dump());
    assert!(run.stdout.contains("the standby refused to take over and nothing was released"), "{}", run.dump());
    assert_eq!(run.code, 0, "{}", run.dump());
}

#[test]
fn a_dirtying_guest_finds_its_memory_intact_after_takeover_despite_a_corrupted_frame() {
    // 10 MiB/s of writes, checked by the guest every second; epoch 3 has a frame
    // corrupted on the wire, which the standby must catch and drop.
    let run = drill(&["--workload", "dirty", "--dirty-mib", "10", "--lines", "30", "--kill-at", "15000,mid-epoch", "--runs", "2", "--corrupt-epoch", "3"]);
    for n in 1..=2 {
        assert_continuity(&run, n, "dirty ", 30);
        let joined = format!("{}{}", section(&run, n, "primary console"), section(&run, n, "standby console"));
        assert_eq!(joined.matches("check=OK").count(), 30, "run {n}\n{}", run.dump());
        let standby = section(&run, n, "standby log");
        assert!(standby.contains("frame checksum mismatch"), "run {n}: the corrupt frame went unnoticed\n{}", run.dump());
        assert!(standby.contains("an epoch in transfer, if any, was discarded"), "run {n}\n{}", run.dump());
        assert!(section(&run, n, "primary log").contains("fault injection: corrupting a frame"), "run {n}\n{}", run.dump());
    }
    assert_eq!(run.code, 0, "{}", run.dump());
}

/// The primary runs 200 ticks; its standby is killed after tick 10 and a new one is
/// started 5 s after the primary noticed. Prints the tick counts just after the loss
/// and 4 s later, then the primary's console and both logs.
fn standby_loss(policy: &str) -> Run {
    let script = format!(
        r#"
# Waits for text $2 in file $1 for up to $3 s, or until process $4 (if given) ends.
wait_for() {{ i=0; while ! grep -q "$2" "$1"; do i=$((i+1)); [ $i -gt $(($3*10)) ] && echo "timeout waiting for $2 in $1" && return 1; [ -n "$4" ] && ! kill -0 "$4" 2>/dev/null && echo "gave up waiting for $2 in $1: process $4 ended" && return 1; sleep 0.1; done; }}
tandem keygen --out /tmp/p >/dev/null && tandem keygen --out /tmp/s >/dev/null || exit 1
S="tandem standby --listen 127.0.0.1:7000 --key /tmp/s/key.pem --peer-cert /tmp/p/cert.pem --timeout-ms 3000"
$S --state-dir /tmp/sa >/dev/null 2>/tmp/sa.err & sa=$!
wait_for /tmp/sa.err 'standing by' 30
tandem primary --standby 127.0.0.1:7000 --key /tmp/p/key.pem --peer-cert /tmp/s/cert.pem --timeout-ms 3000 \
  --on-standby-loss {policy} --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio \
  --append 'tandem.workload=ticker tandem.ticks=200' >/tmp/p.out 2>/tmp/p.err & p=$!
wait_for /tmp/p.out '^tick 10 ' 150 $p
kill -9 $sa
wait_for /tmp/p.err 'lost the standby' 30 $p
sleep 1; a=$(grep -c '^tick ' /tmp/p.out); sleep 4; b=$(grep -c '^tick ' /tmp/p.out)
echo "ticks-after-loss $a $b"
$S --state-dir /tmp/sb >/dev/null 2>/tmp/sb.err & sb=$!
wait_for /tmp/p.err 'standby is in sync\|a standby follows again' 60 $p
i=0; while kill -0 $p 2>/dev/null && [ $i -lt 1500 ]; do i=$((i+1)); sleep 0.1; done
wait $p; echo "primary-exit=$?"
i=0; while kill -0 $sb 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done
kill $sb 2>/dev/null; wait $sb; echo "standby-b-exit=$?"
echo '=== console'; cat /tmp/p.out; echo '=== primary log'; cat /tmp/p.err; echo '=== standby b log'; cat /tmp/sb.err
"#
    );
    // A guest lost to the lab's emulation (a triple fault at boot) is tried again.
    retry_lab_faults(|| lab(&[], &["sh", "-c", &script]))
}

fn after_loss(run: &Run) -> (u32, u32) {
    let line = run.stdout.lines().find_map(|l| l.strip_prefix("ticks-after-loss ")).unwrap_or_else(|| panic!("{}", run.dump()));
    let mut it = line.split_whitespace().map(|n| n.parse().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn console(run: &Run) -> &str {
    let from = run.stdout.find("=== console\n").unwrap_or_else(|| panic!("{}", run.dump())) + "=== console\n".len();
    &run.stdout[from..run.stdout.find("=== primary log").unwrap_or(run.stdout.len())]
}

#[test]
fn with_pause_a_primary_that_lost_its_standby_holds_still_until_a_new_one_is_in_sync() {
    let run = standby_loss("pause");
    let (a, b) = after_loss(&run);
    assert!(a >= 10 && a == b, "ticks released while no standby held them: {a} then {b}\n{}", run.dump());
    assert!(run.says("the guest is paused and its output held until a standby is in sync"), "{}", run.dump());
    assert!(run.says("a new standby is in sync; the guest runs again"), "{}", run.dump());
    // Paused, not lost: every tick came out in the end, through the new standby.
    assert_eq!(numbers(console(&run), "tick "), (1..=200).collect::<Vec<_>>(), "{}", run.dump());
    assert!(run.says("primary-exit=0"), "{}", run.dump());
    assert!(run.says("the primary said goodbye (the guest stopped); not taking over"), "{}", run.dump());
}

#[test]
fn with_continue_a_primary_that_lost_its_standby_runs_on_unprotected_until_one_returns() {
    let run = standby_loss("continue");
    let (a, b) = after_loss(&run);
    assert!(b > a, "the guest's output stopped although the policy is continue: {a} then {b}\n{}", run.dump());
    assert!(run.says("the guest runs UNPROTECTED"), "{}", run.dump());
    assert!(run.says("a standby follows again"), "{}", run.dump());
    assert_eq!(numbers(console(&run), "tick "), (1..=200).collect::<Vec<_>>(), "{}", run.dump());
    assert!(run.says("primary-exit=0"), "{}", run.dump());
}
