//! `tandem bench`: measurements printed as tables, beside a peer measured in the same run.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab;

/// Ends the guest right after its ready marker; both VMMs get exactly this command line.
/// `initcall_blacklist=cmos_init` spares QEMU's guest seconds of probing for a CMOS RTC
/// that microvm does not have (tandem's FADT already says there is none), so the race
/// is between the VMMs, not their firmware tables.
const BENCH_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 pci=off initcall_blacklist=cmos_init tandem.workload=none";
const READY: &str = "TANDEM-GUEST-READY";

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Time from process start to the guest's ready marker: tandem vs QEMU microvm on
    /// the same kernel and initramfs, in one lab run.
    Boot(BootArgs),
    /// The part of `bench boot` that runs inside the lab.
    #[command(hide = true)]
    BootInLab(BootArgs),
}

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

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(args) => boot_via_lab(&args),
        BenchCmd::BootInLab(args) => boot_in_lab(&args),
    }
}

fn boot_via_lab(args: &BootArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let opts = lab::LabOptions {
        images: args.images.clone().unwrap_or_else(lab::default_images_dir),
        // Each boot takes seconds of emulated time; allow for slow machines.
        timeout: Duration::from_secs(120 + 60 * u64::from(args.runs)),
        with: Vec::new(),
        with_qemu: true,
        mem_mib: 2048,
        cpus: 2,
    };
    let command: Vec<String> = [
        "tandem", "bench", "boot-in-lab",
        "--runs", &args.runs.to_string(),
        "--mem-mib", &args.mem_mib.to_string(),
        "--vcpus", &args.vcpus.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let status = lab::run(&opts, &command, &mut |line| println!("{line}"))?;
    if status != 0 {
        bail!("the benchmark failed inside the lab (exit status {status})");
    }
    Ok(())
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
    let watchdog = crate::watchdog::Watchdog::new(child.id(), limit);
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

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &mut [Duration]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = samples.len();
    let median = if n % 2 == 1 {
        ms(samples[n / 2])
    } else {
        (ms(samples[n / 2 - 1]) + ms(samples[n / 2])) / 2.0
    };
    Some(Stats {
        median,
        min: ms(samples[0]),
        max: ms(samples[n - 1]),
    })
}

fn boot_in_lab(args: &BootArgs) -> Result<()> {
    let kernel = "/images/vmlinuz";
    let initrd = "/images/guest-initrd.cpio";
    let limit = Duration::from_secs(60);
    let tandem = std::env::current_exe()?;
    let qemu = lab::find_program("qemu-system-x86_64")
        .context("QEMU is not in the lab (the benchmark appends lab-qemu.cpio.gz)")?;
    let mut ours = Sample::default();
    let mut theirs = Sample::default();
    // Interleaved, so drift in the emulated machine's speed hits both alike.
    for run in 1..=args.runs {
        let mut t = Command::new(&tandem);
        t.args(["run", "--kernel", kernel, "--initrd", initrd, "--cmdline", BENCH_CMDLINE])
            .args(["--mem-mib", &args.mem_mib.to_string(), "--vcpus", &args.vcpus.to_string()]);
        let a = ours.record(time_to_ready(t, limit));
        let mut q = Command::new(&qemu);
        q.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
            .args(["-m", &args.mem_mib.to_string(), "-smp", &args.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
            .args(["-kernel", kernel, "-initrd", initrd, "-append", BENCH_CMDLINE]);
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

/// Boot times of one VMM, and how many boots failed.
#[derive(Default)]
struct Sample {
    times: Vec<Duration>,
    failed: u32,
}

impl Sample {
    /// Keeps a result and returns it in words for the progress line.
    fn record(&mut self, result: Result<Duration>) -> String {
        match result {
            Ok(t) => {
                self.times.push(t);
                format!("{:.0} ms", t.as_secs_f64() * 1e3)
            }
            Err(e) => {
                self.failed += 1;
                format!("FAILED ({e:#})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_of_sorted_samples() {
        let mut odd = [3, 1, 2].map(Duration::from_millis);
        let s = stats(&mut odd).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let mut even = [4, 1, 2, 3].map(Duration::from_millis);
        assert_eq!(stats(&mut even).unwrap().median, 2.5);
        assert!(stats(&mut []).is_none());
    }
}
