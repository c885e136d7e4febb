//! `tandem drill --partition FAULT,...`: instead of a kill, a cut link. A primary, a
//! standby and (with `--witness`) a witness, each link through a relay the drill cuts;
//! the guest ticks; once the primary has released some ticks the fault comes, and
//! once it has settled each side's released console is read. A run fails if both sides
//! released output after the cut (unless that is the documented risk: no witness and
//! `--on-standby-loss continue`) or a line is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::check::numbers;
use super::DrillArgs;
use crate::harness::proc::{free_addr, start_witness, Proc};
use crate::harness::relay::Relay;
use crate::replicate::LossPolicy;

/// Printed before each run's JSON verdict, for tools.
pub const PARTITION_PREFIX: &str = "partition-verdict: ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Primary and standby cannot hear each other; both hear the witness.
    PrimaryStandby,
    PrimaryWitness,
    StandbyWitness,
    PrimaryIsolated,
    StandbyIsolated,
}

impl Fault {
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "p-s" => Fault::PrimaryStandby,
            "p-w" => Fault::PrimaryWitness,
            "s-w" => Fault::StandbyWitness,
            "p-isolated" => Fault::PrimaryIsolated,
            "s-isolated" => Fault::StandbyIsolated,
            other => bail!("--partition takes p-s, p-w, s-w, p-isolated or s-isolated, got {other:?}"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Fault::PrimaryStandby => "p-s",
            Fault::PrimaryWitness => "p-w",
            Fault::StandbyWitness => "s-w",
            Fault::PrimaryIsolated => "p-isolated",
            Fault::StandbyIsolated => "s-isolated",
        }
    }

    /// (P-S, P-W, S-W): which links are cut.
    fn cuts(self) -> (bool, bool, bool) {
        match self {
            Fault::PrimaryStandby => (true, false, false),
            Fault::PrimaryWitness => (false, true, false),
            Fault::StandbyWitness => (false, false, true),
            Fault::PrimaryIsolated => (true, true, false),
            Fault::StandbyIsolated => (true, false, true),
        }
    }
}

/// Who released the guest's output once the fault had settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Runner {
    Primary,
    Standby,
    /// Split brain.
    Both,
    /// Neither: the guest waits, safely, for a link or an operator.
    Neither,
}

/// Ticks the primary releases before the fault.
const BEFORE: usize = 10;
/// The witness's lease in the drill: twice the heartbeat timeout.
fn lease_ms(args: &DrillArgs) -> u64 {
    2 * args.timeout_ms
}

pub fn run(args: &DrillArgs, images: &Path) -> Result<u8> {
    let faults: Vec<Fault> = args.partition.iter().map(|f| Fault::parse(f)).collect::<Result<_>>()?;
    let risky = !args.witness && args.on_standby_loss == LossPolicy::Continue;
    let mut bad = 0;
    for (i, fault) in faults.iter().enumerate() {
        let n = i as u32 + 1;
        let (line, verdict) = match one_run(args, images, n, *fault) {
            Ok(v) => v,
            Err(e) => (format!("FAILED: {e:#}"), json!({ "run": n, "fault": fault.name(), "error": format!("{e:#}") })),
        };
        let failed = verdict.get("error").is_some() || verdict["lost"] == true || (verdict["double"] == true && !risky);
        bad += u32::from(failed);
        println!("run {n}: {} cut, witness {}, --on-standby-loss {}: {line}", fault.name(), if args.witness { "yes" } else { "no" }, args.on_standby_loss.as_arg());
        println!("{PARTITION_PREFIX}{verdict}");
    }
    println!(
        "partition drill: {}/{} runs with no double release and no line lost{}",
        faults.len() as u32 - bad,
        faults.len(),
        if risky { " (no witness under continue: a double release is the documented risk, not a failure)" } else { "" }
    );
    Ok(if bad == 0 { 0 } else { 1 })
}

fn one_run(args: &DrillArgs, images: &Path, n: u32, fault: Fault) -> Result<(String, serde_json::Value)> {
    let dir = std::env::temp_dir().join(format!("tandem-partition-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let keys = |who: &str| -> Result<PathBuf> {
        let d = dir.join(who);
        tandem_replication::tls::keygen(&d)?;
        Ok(d)
    };
    let (pk, sk, wk) = (keys("p")?, keys("s")?, keys("w")?);
    let path = |p: PathBuf| p.display().to_string();
    let (s_addr, w_addr) = (free_addr()?, free_addr()?);
    let (ps, pw, sw) = (Relay::start(s_addr)?, Relay::start(w_addr)?, Relay::start(w_addr)?);
    let _witness = args.witness.then(|| start_witness(&dir, w_addr, &wk, [&pk, &sk], Some(lease_ms(args)))).transpose()?;
    let host = |me: &Path, peer: &Path, state: &str, via: &Relay| {
        let mut a = vec![
            "--key".to_string(), path(me.join("key.pem")), "--peer-cert".into(), path(peer.join("cert.pem")),
            "--state-dir".into(), path(dir.join(state)), "--timeout-ms".into(), args.timeout_ms.to_string(),
        ];
        if args.witness {
            a.extend(["--witness".into(), via.addr.to_string(), "--witness-cert".into(), path(wk.join("cert.pem"))]);
        }
        a
    };
    let mem = if args.micro_guest { "64" } else { "256" };
    let mut standby_args = vec!["standby".to_string(), "--listen".into(), s_addr.to_string(), format!("--mem-mib={mem}")];
    standby_args.extend(host(&sk, &pk, "s-state", &sw));
    let mut standby = Proc::start(&standby_args, &dir, "standby")?;
    if !standby.wait_for("standing_by", Duration::from_secs(30)) {
        bail!("the standby did not start: {}", standby.log());
    }
    let mut primary_args = vec![
        "primary".to_string(), "--standby".into(), ps.addr.to_string(), "--on-standby-loss".into(), args.on_standby_loss.as_arg().into(),
        "--epoch-ms".into(), args.epoch_ms.to_string(), format!("--mem-mib={mem}"),
    ];
    primary_args.extend(host(&pk, &sk, "p-state", &pw));
    if args.micro_guest {
        primary_args.push("--micro-guest".into());
    } else {
        primary_args.extend([
            "--kernel".into(), path(images.join(&args.kernel)), "--initrd".into(), path(images.join("guest-initrd.cpio")),
            "--append".into(), "quiet tandem.workload=ticker tandem.ticks=100000".into(),
        ]);
    }
    let mut primary = Proc::start(&primary_args, &dir, "primary")?;
    let ticks = |p: &Proc| numbers(&p.console(), "tick ");
    let limit = Instant::now() + Duration::from_secs(240);
    while ticks(&primary).len() < BEFORE {
        if Instant::now() > limit || matches!(primary.child.try_wait(), Ok(Some(_))) {
            bail!("the primary released fewer than {BEFORE} ticks: {}", primary.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_cut = ticks(&primary).len();
    let (a, b, c) = fault.cuts();
    ps.cut(a);
    pw.cut(b);
    sw.cut(c);
    // Past detection, a question to the witness and a lease, and some running on: a
    // side that may run shows it by then, one that may not has had its chance.
    std::thread::sleep(Duration::from_millis(2 * args.timeout_ms + lease_ms(args) + 2500));
    let _ = primary.end();
    let _ = standby.end();
    let (p, s_text) = (ticks(&primary), standby.console());
    let verdict = judge(&p, at_cut, &s_text, standby.event("took_over"));
    let _ = std::fs::remove_dir_all(&dir);
    verdict.context("judging the consoles")
}

fn judge(p: &[u32], at_cut: usize, standby_console: &str, took: Option<serde_json::Value>) -> Result<(String, serde_json::Value)> {
    let a = p.last().copied().unwrap_or(0);
    if p.iter().enumerate().any(|(i, &t)| t != i as u32 + 1) {
        bail!("the primary's console skips or repeats: {p:?}");
    }
    let ran_on = p.len() > at_cut + 5;
    let Some(took) = took else {
        let runner = if ran_on { Runner::Primary } else { Runner::Neither };
        let line = format!("runs the guest after: {runner:?}; the primary released ticks 1-{a} ({} after the cut), no takeover", p.len() - at_cut);
        return Ok((line, json!({ "runner": runner, "double": false, "lost": false, "primary_last": a })));
    };
    let s = numbers(standby_console, "tick ");
    if s.windows(2).any(|w| w[1] != w[0] + 1) {
        bail!("the standby's console skips or repeats: {s:?}");
    }
    let first = s.first().copied().unwrap_or(a + 1);
    // The standby's image ends where what it printed first (the primary's unreleased
    // output) ends: a primary that printed past it ran the guest on its own.
    let unreleased = took["unreleased_output_bytes"].as_u64().unwrap_or(0) as usize;
    let head = standby_console.get(..unreleased.min(standby_console.len())).unwrap_or("");
    let image_end = numbers(head, "tick ").last().copied().unwrap_or(first.saturating_sub(1));
    let double = a > image_end;
    let lost = first > a + 1;
    let runner = if double { Runner::Both } else { Runner::Standby };
    let line = format!(
        "runs the guest after: {runner:?}; the primary released ticks 1-{a}, the standby took over at generation {} from tick {first} \
         (its image ends at {image_end}){}{}",
        took["generation"],
        if double { "; DOUBLE RELEASE" } else { "" },
        if lost { "; LINES LOST" } else { "" },
    );
    Ok((line, json!({ "runner": runner, "double": double, "lost": lost, "primary_last": a, "standby_first": first, "image_end": image_end })))
}
