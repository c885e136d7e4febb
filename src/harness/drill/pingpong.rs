//! `tandem drill --ping-pong N`: N failovers in a row between two hosts, and the guest
//! never restarts. Host A's primary runs the guest, host B's standby follows it; at
//! each round the primary is SIGKILLed, the standby takes over and, having been
//! started with `--then-protect`, dials the dead host's address, where a new standby
//! (on the same state directory, so its generation follows) is started; once it is in
//! sync the next round kills the new primary. A console client follows both hosts
//! throughout, and must see every numbered line once.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::client::Client;
use super::{check, journal, run_dir, DrillArgs};
use crate::harness::proc::Proc;

/// One host of the pair: where it listens, serves its console, keeps its generation
/// and its disk.
struct Host {
    name: &'static str,
    listen: String,
    console: std::net::SocketAddr,
}

/// Runs the ping-pong; returns the verdict line, or why it failed.
pub fn run(args: &DrillArgs, images: &Path, rounds: u32) -> Result<Result<String, String>> {
    let (dir, pkeys, skeys) = run_dir(0)?;
    let path = |p: std::path::PathBuf| p.display().to_string();
    let hosts = [
        Host { name: "a", listen: "127.0.0.1:7190".into(), console: ([127, 0, 0, 1], 7390).into() },
        Host { name: "b", listen: "127.0.0.1:7191".into(), console: ([127, 0, 0, 1], 7391).into() },
    ];
    // Each host's key pair: A's is the primary's of the ordinary drill, B's the standby's.
    let keys = [&pkeys, &skeys];
    let journal = args.workload == "journal";
    // Every round takes a detection, a takeover and a full sync (about 8 s in the
    // lab): the guest must outlast them all, with 10 s of ticks a round.
    let lines = args.lines.max(100 * rounds + 60);
    let workload = if journal {
        format!("quiet tandem.workload=journal tandem.records={lines} tandem.burst=2 tandem.interval_ms=100")
    } else {
        format!("quiet tandem.workload=ticker tandem.ticks={lines}")
    };
    for h in &hosts {
        if journal {
            journal::make_disk(&dir.join(format!("{}.img", h.name)))?;
        }
    }
    let standby = |i: usize, serial: u32| -> Result<Proc> {
        let (me, other) = (&hosts[i], &hosts[1 - i]);
        let mut a = vec![
            "standby".to_string(), "--listen".into(), me.listen.clone(), "--then-protect".into(), other.listen.clone(),
            "--key".into(), path(keys[i].join("key.pem")), "--peer-cert".into(), path(keys[1 - i].join("cert.pem")),
            "--state-dir".into(), path(dir.join(format!("{}-state", me.name))), "--timeout-ms".into(), args.timeout_ms.to_string(),
            "--console-listen".into(), me.console.to_string(), "--mem-mib=256".into(),
        ];
        if journal {
            a.extend(["--disk".into(), path(dir.join(format!("{}.img", me.name)))]);
        }
        Proc::start(&a, &dir, &format!("{}-standby-{serial}", me.name))
    };
    let mut primary_args = vec![
        "primary".to_string(), "--standby".into(), hosts[1].listen.clone(),
        "--key".into(), path(keys[0].join("key.pem")), "--peer-cert".into(), path(keys[1].join("cert.pem")),
        "--state-dir".into(), path(dir.join("a-state")), "--timeout-ms".into(), args.timeout_ms.to_string(),
        "--console-listen".into(), hosts[0].console.to_string(), "--epoch-ms".into(), args.epoch_ms.to_string(),
        "--kernel".into(), path(images.join(&args.kernel)), "--initrd".into(), path(images.join("guest-initrd.cpio")),
        "--append".into(), workload,
    ];
    if journal {
        primary_args.extend(["--disk".into(), path(dir.join("a.img"))]);
    }
    let prefix = if journal { "journal " } else { "tick " };
    let mut procs: [Option<Proc>; 2] = [None, Some(standby(1, 0)?)];
    if !procs[1].as_mut().is_some_and(|p| p.wait_for("standing_by", Duration::from_secs(30))) {
        bail!("host b's standby did not start");
    }
    procs[0] = Some(Proc::start(&primary_args, &dir, "a-primary")?);
    let client = Client::start(hosts.iter().map(|h| h.console).collect(), prefix, args.watch);
    let mut primary = 0;
    if !procs[0].as_mut().is_some_and(|p| p.wait_for("protected", Duration::from_secs(120))) {
        return Ok(Err("the first primary never got its standby in sync".into()));
    }
    let (mut resumes, mut syncs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Output flows before every kill: the guest runs on, protected, at each one.
        let want = client.lines() + 10;
        if !client.wait_lines(want, Duration::from_secs(120)) {
            let logs: Vec<String> = procs.iter().flatten().map(|p| format!("{}\n{}", p.log(), p.events().iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))).collect();
            return Ok(Err(format!("round {round}: no output flowed before the kill ({} lines)\n{}", client.lines(), logs.join("\n---\n"))));
        }
        let dead = primary;
        if let Some(p) = procs[dead].as_mut() {
            let _ = p.child.kill();
            let _ = p.wait_exit(Duration::from_secs(60));
        }
        if args.watch {
            println!("    ======== round {round}: host {} (the primary) is killed; host {} takes over ========", hosts[dead].name, hosts[1 - dead].name);
        }
        primary = 1 - dead;
        let survivor = procs[primary].as_mut().expect("a standby on the other host");
        if !survivor.wait_for("took_over", Duration::from_secs(60)) {
            return Ok(Err(format!("round {round}: host {} did not take over:\n{}", hosts[primary].name, survivor.log())));
        }
        if let Some(e) = survivor.event("took_over") {
            resumes.push(e["resume_ms"].as_f64().unwrap_or(0.0));
        }
        // The dead host comes back as a standby; the survivor protects the guest again.
        let began = Instant::now();
        procs[dead] = Some(standby(dead, round)?);
        let survivor = procs[primary].as_mut().expect("the new primary");
        if !survivor.wait_for("protected", Duration::from_secs(120)) {
            return Ok(Err(format!("round {round}: host {} never got its new standby in sync:\n{}", hosts[primary].name, survivor.log())));
        }
        syncs.push(began.elapsed().as_secs_f64());
    }
    let last = procs[primary].as_mut().expect("the last primary");
    let ended = last.wait_exit(Duration::from_secs(300));
    let (seen, end) = client.finish(Duration::from_secs(60));
    let numbers = check::numbers(&seen, prefix);
    let want: Vec<u32> = (1..=lines).collect();
    if numbers != want {
        let repeats = numbers.windows(2).filter(|w| w[1] <= w[0]).count();
        let gaps = numbers.windows(2).filter(|w| w[1] > w[0] + 1).count();
        return Ok(Err(format!("the console client saw {} numbered lines, {repeats} repeated, {gaps} gaps", numbers.len())));
    }
    if let Err(e) = end {
        return Ok(Err(format!("the console client did not see the console end: {e}")));
    }
    if ended != Some(0) || !seen.contains("TANDEM-GUEST-DONE rc=0") {
        return Ok(Err(format!("the guest did not finish cleanly on host {} (exit {ended:?})", hosts[primary].name)));
    }
    if journal && !seen.contains("TANDEM-JOURNAL-OK") {
        return Ok(Err("the guest found its journal wrong when it read it back".into()));
    }
    let fmt = |v: &[f64], unit: &str| v.iter().map(|x| format!("{x:.1}{unit}")).collect::<Vec<_>>().join(" ");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Ok(format!(
        "ping-pong: {rounds} failovers between hosts a and b, the guest never restarted; the client saw lines 1-{lines} once each; \
         resume {}; re-protection (standby started to in sync) {}",
        fmt(&resumes, " ms"),
        fmt(&syncs, " s")
    )))
}
