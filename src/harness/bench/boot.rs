//! `tandem bench boot`: process start to the guest's ready marker, tandem vs QEMU microvm.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{qemu_microvm, stats, Sample, BASE_CMDLINE, GUEST_INITRD, GUEST_KERNEL};

/// Ends the guest right after its ready marker; both VMMs get exactly this command line.
fn cmdline() -> String {
    format!("{BASE_CMDLINE} tandem.workload=none")
}
const READY: &str = "TANDEM-GUEST-READY";

#[derive(clap::Args, Clone)]
pub struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Directory of built images (default: as for `tandem lab`).
    #[arg(long)]
    images: Option<PathBuf>,
}

pub fn via_lab(args: &BootArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let command: Vec<String> = [
        "bench", "boot-in-lab",
        "--runs", &args.runs.to_string(),
        "--mem-mib", &args.mem_mib.to_string(),
        "--vcpus", &args.vcpus.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Each boot takes seconds of emulated time; allow for slow machines.
    let timeout = Duration::from_secs(120 + 60 * u64::from(args.runs));
    super::in_the_lab(args.images.clone(), timeout, 2048, &command)
}

/// Starts `cmd`, returns the time until a stdout line contains [`READY`], then waits
/// for the guest to power off; the process is killed once `limit` has passed.
fn time_to_ready(mut cmd: Command, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let watchdog = crate::harness::watchdog::Watchdog::new(child.id(), limit);
    let stdout = child.stdout.take().context("child stdout")?;
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if ready.is_none() && line.contains(READY) {
            ready = Some(start.elapsed());
        }
    }
    let killed = watchdog.disarm();
    let status = child.wait()?;
    match ready {
        Some(t) => Ok(t),
        None if killed => bail!("no {READY} within {limit:?}; the VMM was killed"),
        None => bail!("exited ({status}) without printing {READY}"),
    }
}

pub fn in_lab(args: &BootArgs) -> Result<()> {
    let cmdline = cmdline();
    let limit = Duration::from_secs(60);
    let tandem = std::env::current_exe()?;
    let qemu = super::lab_qemu()?;
    let mut ours = Sample::default();
    let mut theirs = Sample::default();
    // Interleaved, so drift in the emulated machine's speed hits both alike.
    for run in 1..=args.runs {
        let mut t = Command::new(&tandem);
        t.args(["run", "--kernel", GUEST_KERNEL, "--initrd", GUEST_INITRD, "--cmdline", &cmdline])
            .args(["--mem-mib", &args.mem_mib.to_string(), "--vcpus", &args.vcpus.to_string()]);
        let a = ours.record(time_to_ready(t, limit));
        let q = qemu_microvm(&qemu, args.mem_mib, args.vcpus, &cmdline);
        let b = theirs.record(time_to_ready(q, limit));
        eprintln!("run {run}/{}: tandem {a}, qemu microvm {b}", args.runs);
    }
    println!();
    println!(
        "boot: process start -> {READY}, {} runs each, {} MiB, {} vCPU, same lab run",
        args.runs, args.mem_mib, args.vcpus
    );
    println!("{:<20} {:>10} {:>10} {:>10} {:>7}", "VMM", "median ms", "min ms", "max ms", "failed");
    let mut medians = Vec::new();
    for (name, sample) in [("tandem", &mut ours), ("qemu -M microvm", &mut theirs)] {
        match stats(&mut sample.times) {
            Some(s) => {
                println!("{name:<20} {:>10.0} {:>10.0} {:>10.0} {:>7}", s.median, s.min, s.max, sample.failed);
                medians.push(s.median);
            }
            None => println!("{name:<20} {:>10} {:>10} {:>10} {:>7}", "-", "-", "-", sample.failed),
        }
    }
    if let [a, b] = medians[..] {
        println!("ratio tandem/qemu (median): {:.2}", a / b);
    }
    println!("(times are in the lab, under emulation: compare the ratio, not the absolute figures)");
    if ours.times.is_empty() || theirs.times.is_empty() {
        bail!("every boot of one VMM failed; see the runs above");
    }
    Ok(())
}

