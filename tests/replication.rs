//! Replication of a real Linux guest in the lab: a primary and a standby as two
//! processes over loopback QUIC. The primary is killed at many moments and the
//! console must continue on the standby with no line lost or repeated; the standby is
//! killed and the primary must follow its policy; a corrupted frame must be caught.

mod common;

use common::{drill, lab, Run};
use serde_json::Value;

/// The events one host of run `n` wrote (`who`: primary or standby).
fn events(run: &Run, n: u32, who: &str) -> Vec<Value> {
    section(run, n, &format!("{who} events")).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The first event of this kind in `events`.
fn find<'a>(events: &'a [Value], kind: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == kind)
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

/// Checks run `n` of a drill on its consoles: the console client, which followed the
/// primary and then the standby, saw 1..=lines exactly once; the primary's stdout is
/// where that console begins and the standby's where it ends, with nothing lost
/// between them (stdout may repeat what was released just before the kill); the
/// standby's guest finished. Returns how many lines came from the primary.
fn assert_continuity(run: &Run, n: u32, prefix: &str, lines: u32) -> usize {
    let client = section(run, n, "client console");
    let primary = section(run, n, "primary console");
    let standby = section(run, n, "standby console");
    assert_eq!(numbers(client, prefix), (1..=lines).collect::<Vec<_>>(), "run {n}: the console client across the takeover\n{}", run.dump());
    assert!(client.starts_with(primary), "run {n}: the primary's stdout\n{}", run.dump());
    let lost = !client.ends_with(standby) || client.len() - standby.len() > primary.len();
    assert!(!lost, "run {n}: stdout lost output at the takeover\n{}", run.dump());
    assert!(standby.contains("TANDEM-GUEST-DONE rc=0"), "run {n}: the standby's guest did not finish\n{}", run.dump());
    assert!(!client.contains("check=BAD") && !client.contains("TANDEM-CLOCK-BACKWARDS"), "run {n}\n{}", run.dump());
    numbers(primary, prefix).len()
}

/// Ticks the guest of an early kill prints: 5 s of them, past the last kill point.
const LINES: u32 = 50;

/// Ticks the guest prints when a kill waits for released output: 4 s of them past the
/// last kill point, for the release of a tick can lag it by a second or more in the
/// lab, and a guest that had ended before the kill would test no takeover.
const LATE_LINES: u32 = 70;

/// Kills at moments spread over the guest's boot and ticking (ms after the standby
/// first holds an epoch, or in the middle of an epoch's transfer), checked run by run;
/// returns how many ticks each run's primary released.
fn kills(list: &str, lines: u32, check: impl Fn(&[usize])) {
    let runs = list.split(',').count() as u32;
    drill(&[], &["--kill-at", list, "--runs", &runs.to_string(), "--lines", &lines.to_string()], |run| {
        let from_primary: Vec<usize> = (1..=runs).map(|n| assert_continuity(run, n, "tick ", lines)).collect();
        for n in 1..=runs {
            let took_over = find(&events(run, n, "standby"), "took_over").cloned();
            assert_eq!(took_over.map(|e| e["generation"].clone()), Some(2.into()), "run {n}\n{}", run.dump());
        }
        assert!(run.stdout.contains(&format!("drill: {runs}/{runs} runs kept continuity")), "{}", run.dump());
        assert_eq!(run.code, 0, "{}", run.dump());
        check(&from_primary);
    });
}

#[test]
fn the_console_continues_on_the_standby_when_the_primary_is_killed_early() {
    // Right after the first commit, while the standby is still catching up with the
    // boot, and in the middle of a large epoch early in the boot.
    kills("0,mid-epoch", LINES, |from_primary| {
        assert!(from_primary.iter().all(|&p| p < LINES as usize), "{from_primary:?}");
    });
}

#[test]
fn the_console_continues_on_the_standby_when_the_primary_is_killed_while_the_guest_ticks() {
    // Later: as soon as the console client has ticks 3 and 30 (in a burst of
    // releases, when the standby may not yet know of the last one). The primary
    // released those ticks before each kill.
    kills("after-output:3,after-output:30", LATE_LINES, |from_primary| {
        assert!(from_primary[0] >= 3 && from_primary[1] >= 30, "{from_primary:?}");
    });
}

#[test]
fn a_primary_killed_during_the_initial_sync_is_not_taken_over_and_nothing_is_released() {
    drill(&[("RUST_LOG", "off")], &["--kill-at", "initial-sync", "--runs", "1"], |run| {
        assert!(section(run, 1, "primary console").trim().is_empty(), "{}", run.dump());
        assert!(section(run, 1, "standby console").trim().is_empty(), "{}", run.dump());
        let standby = events(run, 1, "standby");
        assert!(find(&standby, "not_promoted").is_some() && find(&standby, "took_over").is_none(), "{}", run.dump());
        assert!(find(&events(run, 1, "primary"), "released").is_none(), "{}", run.dump());
        assert!(run.stdout.contains("the standby refused to take over and nothing was released"), "{}", run.dump());
        assert_eq!(run.code, 0, "{}", run.dump());
    });
}

#[test]
fn a_dirtying_guest_finds_its_memory_intact_after_takeover_despite_a_corrupted_frame() {
    // 10 MiB/s of writes, checked by the guest every second; epoch 3 has a frame
    // corrupted on the wire, which the standby must catch and drop. One run: the
    // kill in the middle of an epoch is the early console drill's.
    // Killed 7 s after the first commit, 5 s of the 12 left for the standby.
    let args = ["--workload", "dirty", "--dirty-mib", "10", "--lines", "12", "--kill-at", "7000", "--runs", "1", "--corrupt-epoch", "3"];
    drill(&[("RUST_LOG", "off")], &args, |run| {
        let n = 1;
        assert_continuity(run, n, "dirty ", 12);
        assert_eq!(section(run, n, "client console").matches("check=OK").count(), 12, "run {n}\n{}", run.dump());
        // The standby dropped the connection (and with it the epoch in transfer)
        // on the corrupt frame.
        let standby = events(run, n, "standby");
        let dropped = standby.iter().any(|e| {
            e["event"] == "connection_dropped" && e["reason"].as_str().is_some_and(|r| r.contains("frame checksum mismatch"))
        });
        assert!(dropped, "run {n}: the corrupt frame went unnoticed\n{}", run.dump());
        let injected = find(&events(run, n, "primary"), "fault_injected").cloned();
        assert_eq!(injected.map(|e| (e["fault"].clone(), e["epoch"].clone())), Some(("corrupt_frame".into(), 3.into())), "run {n}\n{}", run.dump());
        // No log was written (only the standby's one-line error), and the verdict
        // did not need one.
        for who in ["primary", "standby"] {
            let log = section(run, 1, &format!("{who} log"));
            assert!(!log.contains(" INFO ") && !log.contains(" WARN "), "{who}: a log with RUST_LOG=off\n{}", run.dump());
        }
        assert_eq!(run.code, 0, "{}", run.dump());
    });
}

/// The primary's guest ticks without end; its standby is killed after tick 10 and a
/// new one is started 3.5 s after the primary noticed. Prints the tick counts just after
/// the loss and 2.5 s later, waits for 20 more ticks once the new standby holds the
/// guest, kills both, then prints the primary's console (complete lines, then `<END>`)
/// and both hosts' events. A guest that never ends cannot finish before the loss is
/// noticed, however far its output lags. Checked by `check` (see `common::checked`).
fn standby_loss(policy: &str, check: impl Fn(&Run)) {
    let script = format!(
        r#"
# Waits for an event of kind $2 in events file $1 for up to $3 s, or until process $4 (if given) ends.
wait_for() {{ i=0; while ! grep -q "\"event\":\"$2\"" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt $(($3*10)) ] && echo "timeout waiting for $2 in $1" && return 1; [ -n "$4" ] && ! kill -0 "$4" 2>/dev/null && echo "gave up waiting for $2 in $1: process $4 ended" && return 1; sleep 0.1; done; }}
# Waits for up to $1 s until the primary's stdout holds $2 ticks.
wait_ticks() {{ i=0; while [ $(grep -c '^tick ' /tmp/p.out) -lt $2 ] && kill -0 $p 2>/dev/null && [ $i -lt $(($1*10)) ]; do i=$((i+1)); sleep 0.1; done; }}
tandem keygen --out /tmp/p >/dev/null && tandem keygen --out /tmp/s >/dev/null || exit 1
S="tandem standby --listen 127.0.0.1:7000 --key /tmp/s/key.pem --peer-cert /tmp/p/cert.pem --timeout-ms 3000"
$S --state-dir /tmp/sa --events /tmp/sa.ev >/dev/null 2>/tmp/sa.err & sa=$!
wait_for /tmp/sa.ev standing_by 30
# Made here, not by the primary's redirection: a background job may open it after
# wait_ticks first counts, and a count of nothing ended the wait at once.
: >/tmp/p.out
tandem primary --standby 127.0.0.1:7000 --key /tmp/p/key.pem --peer-cert /tmp/s/cert.pem --timeout-ms 3000 \
  --on-standby-loss {policy} --events /tmp/p.ev --kernel /images/vmlinux --initrd /images/guest-initrd.cpio \
  --append 'quiet tandem.workload=ticker' >/tmp/p.out 2>/tmp/p.err & p=$!
wait_ticks 150 10
kill -9 $sa
wait_for /tmp/p.ev standby_lost 30 $p
sleep 1; a=$(grep -c '^tick ' /tmp/p.out); sleep 2.5; b=$(grep -c '^tick ' /tmp/p.out)
echo "ticks-after-loss $a $b"
$S --state-dir /tmp/sb --events /tmp/sb.ev >/dev/null 2>/tmp/sb.err & sb=$!
wait_for /tmp/p.ev reprotected 60 $p && wait_ticks 60 $((b + 20))
echo "ticks-at-end $(grep -c '^tick ' /tmp/p.out)"
kill -0 $p 2>/dev/null && echo primary-running
kill -9 $sb $p 2>/dev/null; wait $p $sb
echo '=== console'; cat /tmp/p.out; echo '<END>'; echo '=== primary events'; cat /tmp/p.ev; echo '=== standby b events'; cat /tmp/sb.ev
echo '=== primary log'; cat /tmp/p.err; echo '=== standby b log'; cat /tmp/sb.err
"#
    );
    lab(&[], &["sh", "-c", &script], check);
}

/// The ticks on the primary's stdout, which must be 1, 2, 3 ... with none lost or
/// repeated (a line the kill cut short, which runs into `<END>`, is not counted).
fn console_ticks(run: &Run) -> u32 {
    let ticks = numbers(part(run, "console"), "tick ");
    let n = ticks.len() as u32;
    assert_eq!(ticks, (1..=n).collect::<Vec<_>>(), "{}", run.dump());
    n
}

/// `ticks-at-end N`: the primary still ran its guest, and released 20 ticks past `b`
/// once the new standby held it.
fn released_after_reprotection(run: &Run, b: u32) {
    let end: u32 = run.stdout.lines().find_map(|l| l.strip_prefix("ticks-at-end ")?.parse().ok()).unwrap_or(0);
    assert!(run.says("primary-running") && end >= b + 20, "no output once the new standby was in sync: {b} then {end}\n{}", run.dump());
    assert!(console_ticks(run) >= end, "{}", run.dump());
}

fn after_loss(run: &Run) -> (u32, u32) {
    let line = run.stdout.lines().find_map(|l| l.strip_prefix("ticks-after-loss ")).unwrap_or_else(|| panic!("{}", run.dump()));
    let mut it = line.split_whitespace().map(|n| n.parse().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// The text between `=== NAME` and the next `=== ` line.
fn part<'a>(run: &'a Run, name: &str) -> &'a str {
    let start = format!("=== {name}\n");
    let from = run.stdout.find(&start).unwrap_or_else(|| panic!("no {start:?}\n{}", run.dump())) + start.len();
    let rest = &run.stdout[from..];
    &rest[..rest.find("\n=== ").map(|i| i + 1).unwrap_or(rest.len())]
}

fn part_events(run: &Run, name: &str) -> Vec<Value> {
    part(run, name).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn with_pause_a_primary_that_lost_its_standby_holds_still_until_a_new_one_is_in_sync() {
    standby_loss("pause", |run| {
        let (a, b) = after_loss(run);
        assert!(a >= 10 && a == b, "ticks released while no standby held them: {a} then {b}\n{}", run.dump());
        let primary = part_events(run, "primary events");
        assert_eq!(find(&primary, "standby_lost").map(|e| e["policy"].clone()), Some("pause".into()), "{}", run.dump());
        assert!(find(&primary, "reprotected").is_some(), "{}", run.dump());
        // Paused, not lost: the ticks go on where they stopped, through the new standby.
        released_after_reprotection(run, b);
    });
}

#[test]
fn with_continue_a_primary_that_lost_its_standby_runs_on_unprotected_until_one_returns() {
    standby_loss("continue", |run| {
        let (a, b) = after_loss(run);
        assert!(b > a, "the guest's output stopped although the policy is continue: {a} then {b}\n{}", run.dump());
        let primary = part_events(run, "primary events");
        assert_eq!(find(&primary, "standby_lost").map(|e| e["policy"].clone()), Some("continue".into()), "{}", run.dump());
        assert!(find(&primary, "reprotected").is_some(), "{}", run.dump());
        released_after_reprotection(run, b);
    });
}

/// `tandem drill --ping-pong 2`: the primary killed, the standby taking over and
/// protecting the guest again with a new standby on the dead host, then the same the
/// other way (failback); the guest never restarts, and the console client sees every
/// tick once across both failovers.
#[test]
fn two_failovers_in_a_row_fail_back_and_the_guest_never_restarts() {
    common::drill(&[], &["--ping-pong", "2"], |run| {
        assert_eq!(run.code, 0, "{}", run.dump());
        assert!(run.says("ping-pong: 2 failovers between hosts a and b, the guest never restarted; the client saw lines 1-260 once each"), "{}", run.dump());
    });
}
