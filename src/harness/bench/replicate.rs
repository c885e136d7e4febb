//! `tandem bench replicate`: what replication costs a guest. In the lab, the `dirty`
//! workload runs at several write rates, once alone (`tandem run`) and once as a
//! primary protected by a standby; the table gives the guest's write rate each way,
//! the stopped time per epoch, bytes per epoch and ack latency. Then, natively on this
//! host, the epoch pipeline's throughput beside memcpy and loopback TCP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{in_the_lab_with, GUEST_INITRD, GUEST_VMLINUX};

#[derive(clap::Args, Clone, Debug)]
pub struct ReplicateArgs {
    /// Guest write rates to measure, in MiB/s.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    rates: Vec<u32>,
    /// Seconds each guest writes.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Directory of built images (default: $TANDEM_IMAGES, else ~/.cache/tandem/images).
    #[arg(long)]
    images: Option<PathBuf>,
}

const ROW_MARKER: &str = "@@BENCH-ROW ";

pub fn via_lab(args: &ReplicateArgs) -> Result<()> {
    if args.rates.is_empty() || args.rates.iter().any(|r| *r > 400) || !(8..=120).contains(&args.seconds) {
        bail!("--rates must be 0..=400 MiB/s each and --seconds 8..=120");
    }
    let mut command = vec!["bench".to_string(), "replicate-in-lab".into(), format!("--seconds={}", args.seconds)];
    command.push(format!("--rates={}", args.rates.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    let mut rows = Vec::new();
    let timeout = Duration::from_secs(120 + 200 * args.rates.len() as u64);
    in_the_lab_with(args.images.clone(), timeout, 2048, &command, &mut |line| match line.strip_prefix(ROW_MARKER) {
        Some(row) => rows.push(row.to_string()),
        None if line.starts_with("bench:") => println!("{line}"),
        None => {}
    })?;
    if rows.len() != args.rates.len() {
        bail!("the lab reported {} of {} rows", rows.len(), args.rates.len());
    }
    println!("replication in the lab (emulated host, loopback QUIC), dirty workload for {} s:", args.seconds);
    println!(
        "{:>9} {:>11} {:>11} {:>9} {:>12} {:>12} {:>12} {:>10} {:>8}",
        "rate", "alone", "replicated", "slowdown", "stopped p50", "stopped p99", "bytes/epoch", "ack ms", "epochs"
    );
    for row in rows {
        println!("{row}");
    }
    println!();
    super::pipeline::run(&super::pipeline::PipelineArgs::default())
}

pub fn in_lab(args: &ReplicateArgs) -> Result<()> {
    let tandem = std::env::current_exe()?;
    for &rate in &args.rates {
        eprintln!("bench: {rate} MiB/s alone");
        let alone = alone(&tandem, rate, args.seconds)?;
        eprintln!("bench: {rate} MiB/s replicated");
        let (replicated, status) = replicated(&tandem, rate, args.seconds)?;
        let num = |k: &str| status.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let epochs = num("epochs");
        let per_epoch = if epochs > 0.0 { num("total_bytes") / epochs } else { 0.0 };
        let rate_text = |r: Option<f64>| r.map(|r| format!("{r:.1} MiB/s")).unwrap_or_else(|| "-".into());
        let slowdown = match (alone, replicated) {
            (Some(a), Some(r)) if r > 0.0 => format!("{:.2}x", a / r),
            _ => "-".into(),
        };
        println!(
            "{ROW_MARKER}{:>4} MiB/s {:>11} {:>11} {:>9} {:>9.2} ms {:>9.2} ms {:>12.0} {:>10.2} {:>8.0}",
            rate,
            rate_text(alone),
            rate_text(replicated),
            slowdown,
            num("stopped_p50_ms"),
            num("stopped_p99_ms"),
            per_epoch,
            num("ack_ms"),
            epochs
        );
    }
    Ok(())
}

fn workload(rate: u32, seconds: u32) -> String {
    format!("quiet tandem.workload=dirty tandem.dirty_mib={rate} tandem.span_mib=64 tandem.seconds={seconds}")
}

/// The guest's own write rate from its per-second lines, past the first two seconds.
fn guest_rate(console: &str) -> Option<f64> {
    let points: Vec<(f64, f64)> = console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("dirty ")?;
            let sec: f64 = rest.split_whitespace().next()?.parse().ok()?;
            let pages: f64 = rest.split("pages=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((sec, pages))
        })
        .collect();
    let (first, last) = (points.get(2)?, points.last()?);
    (last.0 > first.0 && last.1 > first.1).then(|| (last.1 - first.1) * 4096.0 / (1 << 20) as f64 / (last.0 - first.0))
}

fn wait(child: &mut Child, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    bail!("a VM ran past {} s", limit.as_secs())
}

fn alone(tandem: &Path, rate: u32, seconds: u32) -> Result<Option<f64>> {
    let out = Command::new(tandem)
        .args(["run", "--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--append", &workload(rate, seconds)])
        .stdin(Stdio::null())
        .output()
        .context("running the guest alone")?;
    Ok(guest_rate(&String::from_utf8_lossy(&out.stdout)))
}

/// Runs the guest as a primary with a standby; returns its write rate and the last
/// status the primary gave while its standby followed.
fn replicated(tandem: &Path, rate: u32, seconds: u32) -> Result<(Option<f64>, HashMap<String, String>)> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-replicate-{rate}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (p, s) = (dir.join("p"), dir.join("s"));
    tandem_replication::tls::keygen(&p)?;
    tandem_replication::tls::keygen(&s)?;
    let path = |p: PathBuf| p.display().to_string();
    let mut standby = Command::new(tandem)
        .args(["standby", "--listen", "127.0.0.1:7200", "--timeout-ms", "3000", "--state-dir", &path(dir.join("state"))])
        .args(["--key", &path(s.join("key.pem")), "--peer-cert", &path(p.join("cert.pem"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let ctl = dir.join("ctl");
    let console = dir.join("console");
    let mut primary = Command::new(tandem)
        .args(["primary", "--standby", "127.0.0.1:7200", "--timeout-ms", "3000", "--control", &path(ctl.clone())])
        .args(["--key", &path(p.join("key.pem")), "--peer-cert", &path(s.join("cert.pem"))])
        .args(["--kernel", GUEST_VMLINUX, "--initrd", GUEST_INITRD, "--append", &workload(rate, seconds)])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console)?)
        .stderr(Stdio::null())
        .spawn()?;
    let mut status = HashMap::new();
    let start = Instant::now();
    while primary.try_wait()?.is_none() && start.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_secs(1));
        let Ok(out) = Command::new(tandem).arg("ctl").arg(&ctl).arg("status").output() else { continue };
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        if line.contains("standby=following") {
            status = line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
    }
    wait(&mut primary, Duration::from_secs(10))?;
    let _ = standby.kill();
    let _ = standby.wait();
    let rate = guest_rate(&std::fs::read_to_string(&console).unwrap_or_default());
    let _ = std::fs::remove_dir_all(&dir);
    Ok((rate, status))
}
