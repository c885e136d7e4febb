//! Replication and takeover of the micro guest on this host's /dev/kvm (PVM here; the
//! micro guest runs on it, Linux does not): the whole product path of two processes
//! over loopback QUIC, in seconds, without the lab. The Linux guest's takeovers are
//! tested in the lab (tests/replication.rs).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::micro::{free_port, keyed_dir, wait_until, Side};
use common::{tandem, TANDEM};

/// A standby and a primary of the micro guest on this host, in a fresh directory.
fn pair(name: &str, primary_extra: &[&str]) -> (PathBuf, Side, Side) {
    let dir = keyed_dir(name, &["primary", "standby"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let p = |rel: &str| dir.join(rel).display().to_string();
    let link = |me: &str, peer: &str| {
        vec![
            "--key".to_string(),
            p(&format!("{me}/key.pem")),
            "--peer-cert".into(),
            p(&format!("{peer}/cert.pem")),
            "--state-dir".into(),
            p(&format!("{me}-state")),
            "--timeout-ms".into(),
            "500".into(),
            "--mem-mib".into(),
            "512".into(),
        ]
    };
    let mut args = vec!["standby".to_string(), "--listen".into(), addr.clone()];
    args.extend(link("standby", "primary"));
    let standby = Side::start(&dir, "standby", &args);
    let mut args = vec!["primary".to_string(), "--standby".into(), addr, "--micro-guest".into()];
    args.extend(link("primary", "standby"));
    args.extend(primary_extra.iter().map(|a| a.to_string()));
    let primary = Side::start(&dir, "primary", &args);
    (dir, standby, primary)
}

#[test]
fn the_standby_takes_over_the_micro_guest_and_its_console_carries_on() {
    let (dir, standby, mut primary) = pair("takeover", &[]);
    wait_until("the primary releases 10 lines", Duration::from_secs(60), || primary.ticks().len() >= 10, &dir);
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    let released = primary.ticks();
    let last = *released.last().unwrap();
    assert_eq!(released, (1..=last).collect::<Vec<_>>(), "the primary's console is not numbered in order");
    wait_until("the standby's guest prints 10 lines past the kill", Duration::from_secs(30), || standby.ticks().contains(&(last + 10)), &dir);

    let after = standby.ticks();
    // Nothing lost: the standby starts at or before the first line the primary had not
    // printed. What it repeats can only be what the primary released in its last epochs
    // (the README's window for a plain stdout reader).
    let first = after[0];
    assert!(first <= last + 1, "lines {}..{first} were lost at the takeover: {after:?}", last + 1);
    assert!(last + 1 - first <= 5, "the standby repeated {} lines: {after:?}", last + 1 - first);
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "the standby's console skips or repeats: {after:?}");
    let events = standby.events();
    let took = events.iter().find(|e| e["event"] == "took_over").expect("no took_over event");
    assert_eq!(took["generation"], 2, "{took}");
    assert!(took["resume_ms"].as_f64().is_some() && took["raise_ms"].as_f64().is_some(), "{took}");
    let generation = std::fs::read_to_string(dir.join("standby-state/generation")).unwrap();
    assert_eq!(generation.trim(), "2");
    drop(standby);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_primary_stopped_by_its_operator_says_goodbye_and_the_standby_does_not_take_over() {
    // In the directory `pair` makes afresh before the primary starts.
    let control = std::env::temp_dir().join(format!("tandem-micro-stop-{}", std::process::id())).join("primary.sock");
    let control = control.display().to_string();
    let (dir, mut standby, mut primary) = pair("stop", &["--control", &control]);
    wait_until("the primary releases 10 lines", Duration::from_secs(60), || primary.ticks().len() >= 10, &dir);
    let run = tandem(&["ctl", &control, "stop"]);
    assert_eq!(run.code, 0, "{}", run.dump());
    assert!(run.stdout.starts_with("ok stopping"), "{}", run.dump());
    let exited = |side: &mut Side| side.child.wait().unwrap().code();
    assert_eq!(exited(&mut primary), Some(0), "the primary did not end cleanly");
    assert_eq!(exited(&mut standby), Some(0), "the standby did not end cleanly");
    let (pe, se) = (primary.events(), standby.events());
    let goodbye = pe.iter().find(|e| e["event"] == "goodbye").expect("the primary said no goodbye");
    assert_eq!(goodbye["confirmed"], true, "{goodbye}");
    assert!(pe.iter().any(|e| e["event"] == "vm_ended" && e["how"] == "stopped"), "{pe:?}");
    assert!(se.iter().any(|e| e["event"] == "primary_left"), "{se:?}");
    assert!(!se.iter().any(|e| e["event"] == "took_over"), "the standby took over a stopped guest: {se:?}");
    // Everything the guest printed is released once the goodbye is confirmed, and the
    // standby, which never ran the guest, printed none of it.
    let released = primary.ticks();
    assert_eq!(released, (1..=released.len() as u64).collect::<Vec<_>>());
    assert!(standby.ticks().is_empty(), "{:?}", standby.ticks());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_cuts_a_quiet_epoch_short() {
    // Epochs 10 s apart while the guest is silent: its ticks, ten a second, must still
    // go out a few at a time, each cut into an epoch within 25 ms, not all together
    // when the quiet epoch ends.
    let (dir, _standby, primary) = pair("quiet", &["--quiet-epoch-ms", "10000"]);
    wait_until("the primary releases 10 lines", Duration::from_secs(30), || primary.ticks().len() >= 10, &dir);
    let releases = primary.events().iter().filter(|e| e["event"] == "released").count();
    assert!(releases >= 5, "10 ticks went out in {releases} releases");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_micro_guest_runs_alone() {
    let mut child = Command::new(TANDEM)
        .args(["run", "--micro-guest", "--mem-mib", "64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let ticks: Vec<u64> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_prefix("tick ")?.parse().ok()).collect();
    // Ten a second: at least a few, whatever the host's load.
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert_eq!(ticks, (1..=ticks.len() as u64).collect::<Vec<_>>());
}
