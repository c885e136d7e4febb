//! `tandem bench`: measurements printed as tables, beside a peer measured in the same
//! run. Each benchmark of a Linux guest runs inside the lab (a hidden `*-in-lab`
//! subcommand), because only there can Linux guests run; the pipeline needs no guest,
//! and takeover uses the micro guest, so both run on this host.

mod boot;
mod disk;
mod encoding;
mod net;
mod pipeline;
mod qmp;
mod replicate;
mod snapshot;
mod takeover;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::lab;

/// Both VMMs' guests get this command line (plus the workload's arguments).
/// `initcall_blacklist=cmos_init` spares QEMU's guest seconds of probing for a CMOS RTC
/// that microvm does not have (tandem's FADT already says there is none), so the race
/// is between the VMMs, not their firmware tables.
const BASE_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 pci=off initcall_blacklist=cmos_init";
const GUEST_KERNEL: &str = "/images/vmlinuz";
/// The same kernel as an ELF booted through PVH: no self-decompression, whose ~50 MB of
/// writes a replicated guest would send to its standby (docs/lab.md).
const GUEST_VMLINUX: &str = "/images/vmlinux";
const GUEST_INITRD: &str = "/images/guest-initrd.cpio";

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Time from process start to the guest's ready marker: tandem vs QEMU microvm on
    /// the same kernel and initramfs, in one lab run.
    Boot(boot::BootArgs),
    /// The part of `bench boot` that runs inside the lab.
    #[command(hide = true)]
    BootInLab(boot::BootArgs),
    /// Snapshot capture (stopped and total time, full and delta) at several dirty rates
    /// and guest sizes, and restore time: tandem vs QEMU's migration to a file and
    /// `-incoming`, on the same guest in one lab run.
    Snapshot(snapshot::SnapshotArgs),
    /// The part of `bench snapshot` that runs inside the lab.
    #[command(hide = true)]
    SnapshotInLab(snapshot::SnapshotArgs),
    /// Throughput of the replication pipeline on this host, no guest needed: pages
    /// dirtied in a memory region, staged, sent as epochs over loopback QUIC with
    /// mutual TLS, verified and applied by a standby; beside memcpy and loopback TCP.
    Pipeline(pipeline::PipelineArgs),
    /// How pages go on the wire: zero markers, LZ4 and zstd side by side (ratio, speed
    /// each way, bytes per page, CPU per page with the cipher's share) on synthetic
    /// mixes and on guests' memory (`--snapshot`, or `--lab` for a Linux guest), beside
    /// AES-128-GCM and memcpy measured in the same run.
    Encoding(encoding::EncodingArgs),
    /// What replication costs a guest: the dirty workload at several rates alone and
    /// as a replicated primary (stopped time per epoch, bytes per epoch, ack latency,
    /// slowdown), in the lab; then the pipeline's throughput natively on this host.
    Replicate(replicate::ReplicateArgs),
    /// The part of `bench replicate` that runs inside the lab.
    #[command(hide = true)]
    ReplicateInLab(replicate::ReplicateArgs),
    /// A guest's network as its clients see it: round-trip time (p50, p99) on one TCP
    /// connection and HTTP download throughput, for QEMU microvm (-netdev tap), tandem
    /// and a replicated tandem primary, in one lab run.
    Net(net::NetArgs),
    /// The part of `bench net` that runs inside the lab.
    #[command(hide = true)]
    NetInLab(net::NetArgs),
    /// A guest's disk: 4 KiB random-write IOPS and latency (p50, p99) and 1 MiB
    /// sequential write throughput, for QEMU microvm (virtio-blk on the same kind of
    /// image), tandem and a replicated tandem primary, in one lab run.
    Disk(disk::DiskArgs),
    /// The part of `bench disk` that runs inside the lab.
    #[command(hide = true)]
    DiskInLab(disk::DiskArgs),
    /// Takeovers on this host with the micro guest on its /dev/kvm, no lab: detection,
    /// resume (and its parts) and the gap a console reader sees, at several guest
    /// sizes; beside building the VM after deciding and copying the image.
    Takeover(takeover::TakeoverArgs),
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(args) => boot::via_lab(&args),
        BenchCmd::BootInLab(args) => boot::in_lab(&args),
        BenchCmd::Snapshot(args) => snapshot::via_lab(&args),
        BenchCmd::SnapshotInLab(args) => snapshot::in_lab(&args),
        BenchCmd::Pipeline(args) => pipeline::run(&args),
        BenchCmd::Encoding(args) => encoding::run(&args),
        BenchCmd::Replicate(args) => replicate::via_lab(&args),
        BenchCmd::ReplicateInLab(args) => replicate::in_lab(&args),
        BenchCmd::Takeover(args) => takeover::run(&args),
        BenchCmd::Net(args) => net::via_lab(&args),
        BenchCmd::NetInLab(args) => net::in_lab(&args),
        BenchCmd::Disk(args) => disk::via_lab(&args),
        BenchCmd::DiskInLab(args) => disk::in_lab(&args),
    }
}

/// One VMM's processes, killed when dropped.
pub(super) struct Running(pub(super) Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `cmd` with its stdout in `log`.
pub(super) fn spawn(mut cmd: Command, log: &std::path::Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::null()).spawn().with_context(|| format!("starting {cmd:?}"))
}

/// Waits until `log` holds `marker`, or fails after `limit`.
pub(super) fn wait_for(log: &std::path::Path, marker: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).unwrap_or_default().contains(marker) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no {marker} in {} within {limit:?}", log.display())
}

/// Runs `tandem ARGS` inside a lab with QEMU, printing its output as it comes.
fn in_the_lab(images: Option<PathBuf>, timeout: Duration, mem_mib: u32, args: &[String]) -> Result<()> {
    in_the_lab_with(images, timeout, mem_mib, args, &mut |line| println!("{line}"))
}

/// Runs `tandem ARGS` inside a lab with QEMU, handing each line of output to `on_line`.
fn in_the_lab_with(
    images: Option<PathBuf>,
    timeout: Duration,
    mem_mib: u32,
    args: &[String],
    on_line: &mut dyn FnMut(&str),
) -> Result<()> {
    let opts = lab::LabOptions {
        images: images.unwrap_or_else(lab::default_images_dir),
        timeout,
        with: Vec::new(),
        with_qemu: true,
        mem_mib,
        cpus: 2,
    };
    let mut command = vec!["tandem".to_string()];
    command.extend_from_slice(args);
    lab_status(lab::run(&opts, &command, on_line)?, timeout)
}

/// Runs a shell script inside a lab (without QEMU), printing its output as it comes.
fn in_the_lab_sh(script: &str, timeout: Duration) -> Result<()> {
    let opts = lab::LabOptions {
        images: lab::default_images_dir(),
        timeout,
        with: Vec::new(),
        with_qemu: false,
        mem_mib: 2048,
        cpus: 2,
    };
    let command = ["sh".to_string(), "-c".to_string(), script.to_string()];
    lab_status(lab::run(&opts, &command, &mut |line| println!("{line}"))?, timeout)
}

/// A shell script for the lab: boots the test guest with its dirty workload (8 MiB/s
/// over 64 MiB), writes a snapshot `NAME.snap` in /tmp once the workload has printed
/// second N for each `(NAME, N)` of `points`, stops the guest, then runs `then`.
fn snapshots_then(points: &[(&str, u32)], then: &str) -> String {
    let mut script = format!(
        "set -e; cd /tmp; \
         tandem run --kernel {GUEST_KERNEL} --initrd {GUEST_INITRD} --mem-mib 256 --control ctl.sock \
           --append 'console=ttyS0 quiet tandem.workload=dirty tandem.dirty_mib=8 tandem.span_mib=64 tandem.seconds=60' > guest.log 2>&1 & "
    );
    for (name, second) in points {
        script += &format!(
            "until grep -q '^dirty {second} ' guest.log 2>/dev/null; do sleep 0.5; done; tandem ctl ctl.sock snapshot {name}.snap >/dev/null; "
        );
    }
    script + "kill %1; " + then
}

/// Reads every snapshot named before anything is measured, so a bad file fails at once.
fn read_snapshots(paths: &[PathBuf]) -> Result<Vec<(&PathBuf, tandem_vmm::snapshot::Snapshot)>> {
    paths
        .iter()
        .map(|p| Ok((p, tandem_vmm::snapshot::Snapshot::read_from(p).with_context(|| format!("snapshot {}", p.display()))?)))
        .collect()
}

fn lab_status(status: i32, timeout: Duration) -> Result<()> {
    match status {
        0 => Ok(()),
        lab::TIMEOUT_STATUS => bail!("the benchmark ran out of time inside the lab ({timeout:?})"),
        lab::LAB_FAULT_STATUS => bail!("the benchmark was lost to a fault of the lab host itself (see above; run it again)"),
        _ => bail!("the benchmark failed inside the lab (exit status {status})"),
    }
}

/// QEMU inside the lab.
fn lab_qemu() -> Result<PathBuf> {
    lab::find_program("qemu-system-x86_64").context("QEMU is not in the lab (the benchmark appends lab-qemu.cpio.gz)")
}

/// QEMU's microvm with the guest tandem runs, console on stdout.
fn qemu_microvm(qemu: &Path, mem_mib: u64, vcpus: u32, cmdline: &str) -> Command {
    let mut q = Command::new(qemu);
    q.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", &mem_mib.to_string(), "-smp", &vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-kernel", GUEST_KERNEL, "-initrd", GUEST_INITRD, "-append", cmdline]);
    q
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(samples: &mut [Duration]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
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

/// Times of one VMM, and how many attempts failed.
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
                format!("{:.0} ms", ms(t))
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
